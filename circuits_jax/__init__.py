"""circuits_jax: circuit experiments on transformers that are pure JAX pytrees.

The public surface; implementation lives in private modules.
"""

from .patching._attribution import atp_star, attribution_patch, attribution_patch_all, integrated_gradients
from .patching._shapley import ShapleyResult, shapley_values
from .toolshed._logit_attribution import (
    Decomposition,
    decompose_resid,
    direct_logit_attribution,
    logit_lens,
    neuron_logit_attribution,
)
from .graph._edges import (
    EDGE_METHODS,
    EdgeScores,
    Graph,
    PathPatchResult,
    edge_attribution,
    edge_patch_all,
    patch_edges,
    patch_single_edges,
    path_patch,
)
from .graph._circuit import (
    FAITHFULNESS_KS,
    Circuit,
    ablated_outputs,
    circuit_from_scores,
    circuit_metrics,
    faithfulness,
    node_ranking,
    prune_dangling,
    roc_auc,
    roc_sweep,
    top_edges,
)
from .graph._acdc import acdc, node_chain_losses
from .tasks._tasks import (
    KNOWN_TASKS,
    TASKS,
    ProbMassDiff,
    Task,
    factual_recall_task,
    greater_than_task,
    induction_task,
    ioi_task,
    load_task,
    single_token_ids,
    task,
    task_from_prompts,
)
from .graph._io import load_circuit, save_circuit
from .dictionaries._sae import SAE, CrossLayerTranscoder, LossConfig, init_clt, init_sae
from .dictionaries._activations import ActivationStore, build_store, open_store, pack_contexts, read_corpus
from .dictionaries._train import TrainConfig
from .dictionaries._train import train as train_sae
from .dictionaries._eval import Evaluation
from .dictionaries._eval import evaluate as evaluate_dictionary
from .dictionaries._io import load_dictionary, save_dictionary
from .dictionaries._pipeline import train_dictionary, train_transcoders
from .attribution_graphs._replacement import (
    FeatureEdit,
    Trace,
    Transcoders,
    edit_features,
    evaluate_transcoders,
    inject_features,
    intervene,
    load_transcoders,
    replacement_forward,
    stack_transcoders,
)
from .attribution_graphs._replacement import trace as trace_replacement
from .attribution_graphs._graph import (
    AttributionGraph,
    feature_examples,
    graph_json,
    graph_scores,
    node_influence,
    write_graph,
)
from .attribution_graphs._graph import attribute as attribution_graph
from .attribution_graphs._graph import prune as prune_graph
from .attribution_graphs._html import graph_html
from .core._generate import Generation, generate
from .toolshed._steering import (
    AddAt,
    actadd,
    caa,
    feature_steering,
    perplexity,
    perplexity_sweep,
    steering_hook,
    steering_sweep,
)
from .toolshed._causal_tracing import CausalTrace, causal_trace, default_noise, subject_positions, trace_fact
from .toolshed._rome import (
    RomeInfo,
    apply_rank_one,
    compute_value,
    corpus_tokens,
    evaluate_edit,
    key_covariance,
    rank_one_update,
    rome_edit,
    subject_key,
)
from .graph._scrubbing import (
    Hypothesis,
    NextTokenLoss,
    Node,
    ScrubResult,
    bootstrap_ci,
    build_tree,
    current_token,
    identity_hypothesis,
    induction_hypothesis,
    repeated_dataset,
    sample_trees,
    scrub,
    scrub_losses,
    token_at_match,
    token_before_match,
)
from .toolshed._das import (
    DASParams,
    DASResult,
    Interchange,
    basis_and_weights,
    boundless_mask,
    PositionSearch,
    das_init,
    das_position_search,
    das_search,
    interchange,
    intervened_logits,
    ioi_position_pairs,
    orthonormal_rows,
    random_basis,
)
from .toolshed._concepts import (
    LayerProbes,
    NeuronAttribution,
    Probe,
    PureSplit,
    TCAVResult,
    activation_gradients,
    cav_pairs,
    diff_of_means,
    diff_of_means_accuracy,
    diff_of_means_layers,
    layer_activations,
    logit_diff_target,
    neuron_activations,
    neuron_attributions,
    pca,
    probe_accuracy,
    probe_layers,
    pure_split,
    tcav,
    tcav_scores,
    train_probe,
)
from .dictionaries._dashboard import dashboard_data, feature_activations, write_dashboards
from .tasks import _known as known
from .models._checkpoint import load_model, restore, save, save_model, tree_allclose
from .core._config import Config
from .scale._memory import DoesNotFit, MemoryPlan, device_memory, plan_sweep, plan_training
from .scale._sharding import (
    global_batch,
    init_distributed,
    layout,
    make_mesh,
    model_shardings,
    per_device_bytes,
    process_rows,
    replicate,
    shard_batch,
    shard_dictionary,
    shard_model,
)
from .core._interventions import ALL_LAYERS, PerLayer, Add, Apply, Compose, Hook, Intervention, Mean, Replace, Scale, Zero
from .core._metrics import AnswerProb, CrossEntropy, KLFrom, LogitDiff, next_token_nll, normalise
from .patching._sweep import SITES as PATCH_SITES
from .patching._sweep import PatchResult, patch_every_block, patch_every_head, patch_set, patch_sweep
from .core._model import Blocks, RunOutput, Transformer, init_model, run, run_with_cache, unembed
from .core._sites import Site, all_site_names, parse_site
from .models._tokenizer import Tokenizer
from .models._gguf import load_gguf
from .models._hf import export_hf, load_hf
from .models._penzai import from_penzai
from .models._registry import cache_dir, load, smollm2_path

__all__ = [
    "EDGE_METHODS", "EdgeScores", "Graph", "PathPatchResult", "edge_attribution", "edge_patch_all", "patch_edges",
    "patch_single_edges", "path_patch", "atp_star", "ShapleyResult", "shapley_values",
    "KNOWN_TASKS", "TASKS", "ProbMassDiff", "Task", "factual_recall_task", "greater_than_task", "induction_task",
    "SAE", "CrossLayerTranscoder", "LossConfig", "init_clt", "init_sae", "ActivationStore", "build_store", "open_store",
    "pack_contexts", "read_corpus", "TrainConfig", "train_sae", "Evaluation", "evaluate_dictionary", "load_dictionary",
    "save_dictionary", "train_dictionary", "train_transcoders", "FeatureEdit", "Trace", "Transcoders", "edit_features",
    "evaluate_transcoders", "inject_features", "intervene", "load_transcoders", "replacement_forward", "stack_transcoders",
    "trace_replacement", "AttributionGraph", "attribution_graph", "feature_examples", "graph_json", "graph_scores",
    "node_influence", "prune_graph", "write_graph", "graph_html", "Generation", "generate",
    "AddAt", "actadd", "caa", "feature_steering", "perplexity", "perplexity_sweep", "steering_hook", "steering_sweep",
    "CausalTrace", "causal_trace", "default_noise", "subject_positions", "trace_fact",
    "RomeInfo", "apply_rank_one", "compute_value", "corpus_tokens", "evaluate_edit", "key_covariance", "rank_one_update",
    "rome_edit", "subject_key",
    "LayerProbes", "NeuronAttribution", "Probe", "PureSplit", "TCAVResult", "activation_gradients", "cav_pairs",
    "diff_of_means", "diff_of_means_accuracy", "diff_of_means_layers", "layer_activations", "logit_diff_target",
    "neuron_activations", "neuron_attributions", "pca", "probe_accuracy", "probe_layers", "pure_split", "tcav",
    "tcav_scores", "train_probe",
    "Hypothesis", "NextTokenLoss", "Node", "ScrubResult", "bootstrap_ci", "build_tree", "current_token",
    "identity_hypothesis", "induction_hypothesis", "repeated_dataset", "sample_trees", "scrub", "scrub_losses",
    "token_at_match", "token_before_match",
    "DASParams", "DASResult", "Interchange", "basis_and_weights", "boundless_mask", "das_init", "das_search", "PositionSearch", "das_position_search",
    "interchange", "intervened_logits", "ioi_position_pairs", "orthonormal_rows", "random_basis", "dashboard_data", "feature_activations", "write_dashboards",
    "ioi_task", "load_task", "single_token_ids", "task", "task_from_prompts", "load_circuit", "save_circuit", "known",
    "node_chain_losses", "FAITHFULNESS_KS", "Circuit", "acdc", "ablated_outputs", "circuit_from_scores", "node_ranking", "prune_dangling", "roc_auc", "roc_sweep", "circuit_metrics", "faithfulness", "top_edges",
    "attribution_patch", "attribution_patch_all", "integrated_gradients", "Decomposition", "decompose_resid", "direct_logit_attribution",
    "logit_lens", "neuron_logit_attribution",
    "ALL_LAYERS", "PerLayer", "DoesNotFit", "MemoryPlan", "device_memory", "plan_sweep", "plan_training",
    "global_batch", "init_distributed", "layout", "make_mesh", "model_shardings", "per_device_bytes", "process_rows",
    "replicate", "shard_batch", "shard_dictionary", "shard_model",
    "AnswerProb", "CrossEntropy", "KLFrom", "LogitDiff", "next_token_nll", "normalise", "PATCH_SITES", "PatchResult", "patch_sweep",
    "patch_set", "patch_every_head", "patch_every_block",
    "Add", "Apply", "Blocks", "Compose", "Config", "Hook", "Intervention", "Mean", "Replace", "RunOutput",
    "Scale", "Site", "Tokenizer", "Transformer", "Zero", "all_site_names", "cache_dir", "export_hf", "from_penzai",
    "init_model", "load", "load_gguf", "load_hf", "load_model", "parse_site", "restore", "run",
    "run_with_cache", "unembed", "save", "save_model", "smollm2_path", "tree_allclose",
]  # fmt: skip


def __getattr__(name):
    """`cj.plot` on first use: matplotlib loads only when something is drawn."""
    if name == "plot":
        import importlib

        return importlib.import_module(".plot", __name__)
    raise AttributeError(f"module 'circuits_jax' has no attribute {name!r}")
