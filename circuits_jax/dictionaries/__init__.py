"""dictionaries."""

from ._activations import (PYTHON_DOCS as PYTHON_DOCS, CORPORA as CORPORA, read_corpus as read_corpus, pack_contexts as pack_contexts, ActivationStore as ActivationStore, open_store as open_store, check_sites as check_sites, build_store as build_store, site_dim as site_dim, memory_check as memory_check)
from ._dashboard import (feature_activations as feature_activations, FeatureStats as FeatureStats, feature_stats as feature_stats, select_features as select_features, direct_logit_effects as direct_logit_effects, dashboard_data as dashboard_data, write_dashboards as write_dashboards)
from ._eval import (Evaluation as Evaluation, evaluate as evaluate, density_histogram as density_histogram)
from ._io import (save_dictionary as save_dictionary, dictionary_info as dictionary_info, load_dictionary as load_dictionary)
from ._pipeline import (dictionary_spec as dictionary_spec, n_parameters as n_parameters, train_dictionary as train_dictionary, transcoder_sites as transcoder_sites, train_transcoders as train_transcoders, split_contexts as split_contexts)
from ._sae import (ARCHS as ARCHS, LossConfig as LossConfig, Stats as Stats, jumprelu as jumprelu, step as step, check_arch as check_arch, SAE as SAE, gather_xy as gather_xy, init_sae as init_sae, CrossLayerTranscoder as CrossLayerTranscoder, init_clt as init_clt)
from ._train import (TrainConfig as TrainConfig, schedule as schedule, optimizer as optimizer, trainable as trainable, TrainState as TrainState, init_state as init_state, make_step as make_step, TrainResult as TrainResult, train as train, plan_training as plan_training)
