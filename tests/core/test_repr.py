"""Notebook reprs: result containers print shapes and site names in one short line, never array contents."""

import dataclasses
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import circuits_jax as cj
from circuits_jax.dictionaries import _activations
from circuits_jax.attribution_graphs import _graph as _attribution_graph
from circuits_jax.attribution_graphs import _replacement
from circuits_jax.core import _repr
from circuits_jax.dictionaries import _dashboard
from circuits_jax.dictionaries import _train as _sae_train
from circuits_jax.graph._edges import Graph
from circuits_jax.toolshed import _rome

from conftest import tiny_configs

CFG = tiny_configs()["llamalike"]
BIG = (300, 400)


@pytest.fixture(scope="module")
def model():
    """A tiny model with numpy-random weights (its shapes from `eval_shape`: nothing compiles but the run)."""
    shapes = jax.eval_shape(lambda: cj.init_model(CFG, key=jax.random.key(0)))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.02, s.shape), s.dtype), shapes)  # numpy's own repr of this runs to hundreds of characters even summarised


def _value(name: str, annotation: str, graph):
    """A stand-in value for a field, from its annotation; arrays are large so a content-printing repr would show."""
    a = str(annotation)
    if "Graph" in a:
        return graph
    if "ndarray" in a or "Array" in a:
        shape = graph.mask.shape if graph is not None and name in ("edges", "scores") else BIG
        return np.ones(shape, bool if name == "edges" else np.float32)
    if a.startswith("tuple[int, int]"):
        return (2, 5)
    if a.startswith("tuple"):
        return tuple(f"item{i}" for i in range(50))
    if a.startswith("list"):
        return [f"blocks.{i}.hook_resid_pre" for i in range(30)]
    if a.startswith("dict"):
        return {f"key{i}": np.ones(BIG, np.float32) for i in range(30)}
    if a.startswith("float"):
        return 0.123456789
    if a.startswith("int"):
        return 7
    if a.startswith("str"):
        return "x" * 200
    if a.startswith("Path"):
        return Path("/tmp/store")
    if "Callable" in a:
        return cj.LogitDiff(np.array([1]), np.array([2]))
    return None


def _fake(cls):
    graph = Graph.of(CFG)
    if hasattr(cls, "_fields"):
        return cls(*(_value(f, cls.__annotations__[f], graph) for f in cls._fields))
    return cls(**{f.name: _value(f.name, f.type, graph) for f in dataclasses.fields(cls) if f.init})


RESULTS = [cj.RunOutput, cj.PatchResult, cj.PathPatchResult, cj.EdgeScores, cj.Circuit, cj.CausalTrace, cj.DASResult,
           cj.PositionSearch, cj.Generation, cj.Decomposition, cj.ShapleyResult, cj.AttributionGraph,
           _attribution_graph.Pruned, cj.ScrubResult, cj.Evaluation, cj.RomeInfo, cj.Trace, cj.LayerProbes,
           cj.TCAVResult, cj.NeuronAttribution, cj.PureSplit, _activations.ActivationStore, _sae_train.TrainResult,
           cj.Task, _rome.EditScores, _dashboard.FeatureStats, _attribution_graph.GraphScores,
           _replacement.TranscoderEvaluation]  # fmt: skip


@pytest.mark.parametrize("cls", RESULTS, ids=lambda c: c.__name__)
def test_result_reprs_are_one_short_line_of_shapes(cls):
    r = repr(_fake(cls))
    assert r.startswith(cls.__name__ + "(") and "\n" not in r
    assert len(r) < 700, r
    assert "array(" not in r and "1., 1." not in r and "True, True" not in r  # no contents
    assert "..." not in r  # not numpy's summarised printout either
    notes = cls.__annotations__.values()
    if any(str(a).startswith("float") for a in notes):
        assert "=0.1235" in r  # floats to 4 significant digits
    if any("ndarray" in str(a) or "Array" in str(a) for a in notes):
        assert re.search(r"(?:f32|bool)\[[\d,]+\]", r), f"no array shapes in {r}"


def test_run_output_names_logits_resid_and_every_cached_site_with_shapes(model):
    first = ["blocks.0.hook_resid_pre", "blocks.0.attn.hook_pattern", "blocks.0.mlp.hook_post"]
    rest = [f"blocks.{l}.{k}" for l in (1, 2) for k in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")]
    out = cj.run(model, np.arange(5, dtype=np.int32)[None], cache=first + rest)
    small = out._replace(cache={k: out.cache[k] for k in first})
    r = repr(small)
    assert len(r) < 400, r
    assert "logits=f32[1,5,23]" in r and "resid=f32[1,5,16]" in r
    for site, shape in zip(first, ("[1,5,16]", "[1,4,5,5]", "[1,5,24]")):
        assert f"{site}: f32{shape}" in r
    assert "… +3}" in repr(out) and len(repr(out)) < 600  # a long cache: the first 8 sites and a count
    assert "logits=None" in repr(out._replace(logits=None))  # a run stopped early


def test_short_forms_of_arrays_scalars_and_tracers():
    assert _repr.short(jnp.zeros((2, 3), jnp.bfloat16)) == "bf16[2,3]"
    assert _repr.short(np.zeros((4,), np.int32)) == "i32[4]"
    assert _repr.short(np.float32(0.25)) == "0.25"
    assert _repr.short(jax.ShapeDtypeStruct((7, 1), jnp.float32)) == "f32[7,1]"
    seen = []
    jax.jit(lambda x: seen.append(_repr.short(x)) or x)(jnp.ones((3,), jnp.float32))
    assert seen == ["f32[3]"]  # under jit the value is a tracer: its shape still prints
    assert _repr.short(list(range(10))) == "[0, 1, 2, 3, … +6]"


def test_circuit_graph_and_edge_scores_count_edges_instead_of_listing_nodes():
    g = Graph.of(CFG)
    assert repr(g) == f"Graph(3 layers, {len(g.sources)} sources, {len(g.destinations)} destinations, {g.n_edges} edges)"
    edges = np.zeros(g.mask.shape, bool)
    edges[0, :3] = True
    c = cj.Circuit(g, edges, method="eap")
    assert f"edges={c.n_edges} of {g.n_edges} kept" in repr(c) and "a0.h0" not in repr(c)
    e = cj.EdgeScores(np.zeros(g.mask.shape, np.float32), g, 1.5, -0.25, "eap-ig", 2.0)
    assert repr(e) == (f"EdgeScores(scores=f32[{len(g.sources)},{len(g.destinations)}], clean_metric=1.5, corrupt_metric=-0.25, "
                       f"method='eap-ig', seconds=2, ablation='resample', noising=False, degenerate=False, graph={g!r})")  # fmt: skip


def test_model_repr_and_treescope_show_shapes(model):
    r = repr(model)  # equinox's own
    assert "W_E=f32[23,16]" in r and "W_Q=f32[3,4,16,4]" in r and len(r) < 1000
    treescope = pytest.importorskip("treescope")
    text = treescope.render_to_text(model)
    assert "float32(23, 16)" in text and "W_gate" in text


@pytest.mark.smollm2
def test_ioi_task_repr_on_smollm2(smollm2):
    _, tok = smollm2
    task = cj.ioi_task(tok, n=8)
    r = repr(task)
    assert r.startswith("Task(name='ioi'") and len(r) < 700, r
    T = task.clean.shape[1]
    assert f"clean=i32[8,{T}]" in r and "metric=LogitDiff" in r and "prompts=[" in r and "… +4]" in r
    if task.attention_mask is None:
        assert "attention_mask" not in r  # None fields are left out
    assert repr(tok) == ("Tokenizer(vocab_size=49152, bos_token_id=1, eos_token_id=2, pad_token_id=2, "
                         "default_prepend_bos=False)")
