"""core."""

from ._config import (Normalization as Normalization, Activation as Activation, Positional as Positional, ACTIVATIONS as ACTIVATIONS, NORMALIZATIONS as NORMALIZATIONS, POSITIONALS as POSITIONALS, Config as Config)
from ._forward import (Tap as Tap, NO_TAP as NO_TAP, Taps as Taps, HookTap as HookTap, CacheTap as CacheTap, add_bias as add_bias, norm as norm, activation as activation, rope as rope, positions_from_mask as positions_from_mask, embed as embed, final as final, unembed as unembed, block as block, layers as layers, Forward as Forward, forward as forward, HookSpec as HookSpec, normalize_hooks as normalize_hooks, RunOutput as RunOutput, run as run, run_with_cache as run_with_cache)
from ._generate import (Generation as Generation, KVCacheTap as KVCacheTap, generate as generate)
from ._graph import (INPUT_KINDS as INPUT_KINDS, Graph as Graph, source_sites as source_sites, source_outputs as source_outputs, dest_kinds as dest_kinds, dest_stack as dest_stack, outputs_of as outputs_of)
from ._interventions import (Intervention as Intervention, Replace as Replace, Add as Add, Scale as Scale, Zero as Zero, Mean as Mean, Apply as Apply, Compose as Compose, PerLayer as PerLayer, ALL_LAYERS as ALL_LAYERS, Hook as Hook)
from ._metrics import (LogitDiff as LogitDiff, AnswerProb as AnswerProb, CrossEntropy as CrossEntropy, KLFrom as KLFrom, next_token_nll as next_token_nll, normalise as normalise, ProbMassDiff as ProbMassDiff)
from ._model import (Blocks as Blocks, Transformer as Transformer, init_model as init_model, expected_shapes as expected_shapes, check_shapes as check_shapes)
from ._repr import (dtype_str as dtype_str, short as short, summary as summary)
from ._results import (Result as Result)
from ._rows import (ABLATIONS as ABLATIONS, at_positions as at_positions, IG_BATCH as IG_BATCH, Pairs as Pairs, Source as Source, answer_positions as answer_positions, as_task as as_task, auto_chunk as auto_chunk, check_ablation as check_ablation, check_site_axes as check_site_axes, flat as flat, hit_mask as hit_mask, hooked_metric as hooked_metric, in_chunks as in_chunks, metric_of as metric_of, per_patch_bytes as per_patch_bytes, progress_bar as progress_bar, rows_changed as rows_changed, score_chunk as score_chunk, score_resid as score_resid, source_metric as source_metric, takes_task as takes_task)
from ._sites import (SiteKind as SiteKind, SITE_KINDS as SITE_KINDS, KIND as KIND, LAYER_KINDS as LAYER_KINDS, GLOBAL_KINDS as GLOBAL_KINDS, SHORTHANDS as SHORTHANDS, SPLIT_INPUTS as SPLIT_INPUTS, PATCH_SITES as PATCH_SITES, Site as Site, layer_kinds as layer_kinds, global_kinds as global_kinds, all_site_names as all_site_names, parse_site as parse_site, site_shape as site_shape)
from ._task import (Task as Task)
