"""attribution_graphs."""

from ._graph import (AttributionGraph as AttributionGraph, attribute as attribute, normalize_rows as normalize_rows, influence as influence, node_influence as node_influence, Pruned as Pruned, prune as prune, graph_scores as graph_scores, graph_json as graph_json, feature_examples as feature_examples, write_graph as write_graph)
from ._html import (graph_html as graph_html)
from ._replacement import (Transcoders as Transcoders, mlp_sites as mlp_sites, stack_transcoders as stack_transcoders, load_transcoders as load_transcoders, Frozen as Frozen, FeatureEdit as FeatureEdit, ReplacementTap as ReplacementTap, token_embeddings as token_embeddings, replacement_forward as replacement_forward, linear_forward as linear_forward, Trace as Trace, trace as trace, no_edit as no_edit, edit_features as edit_features, inject_features as inject_features, intervene as intervene, evaluate_transcoders as evaluate_transcoders)
