"""One result style (`core/_results.py`): results are frozen, print shapes not contents, save and load
through an atomic .npz (nested arrays, results and tuples included), and the ones that replaced
plain dicts still read like them (`r["key"]`, `dict(r)`)."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from conftest import tiny_configs

import circuits_jax as cj
from circuits_jax.attribution_graphs import AttributionGraph, GraphScores, Pruned, TranscoderEvaluation, graph_scores, prune
from circuits_jax.core import Result, Task
from circuits_jax.dictionaries import Evaluation, FeatureStats, TrainResult, select_features
from circuits_jax.toolshed import (
    CausalTrace,
    DASResult,
    Decomposition,
    EditScores,
    LayerProbes,
    NeuronAttribution,
    PositionSearch,
    PureSplit,
    RomeInfo,
    TCAVResult,
    causal_trace,
    pure_split,
)

BIG = (300, 400)


def _graph() -> AttributionGraph:
    """A two-feature graph (S=2, L=2, T=2, one logit): features, errors, tokens, logit."""
    S, L, T = 2, 2, 2
    N = S + L * T + T + 1
    A = np.zeros((N, N), np.float32)
    A[0, S + L * T] = 1.0  # token 0 -> feature 0
    A[1, 0] = 2.0  # feature 0 -> feature 1
    A[N - 1, 1] = 1.0  # feature 1 -> logit
    A[N - 1, S + 3] = 0.5  # an error -> logit
    return AttributionGraph(prompt="ab", tokens=np.array([0, 1]), token_strs=["a", "b"], features=np.array([[0, 1, 3], [1, 1, 4]]),
                            activations=np.ones(2, np.float32), logit_tokens=np.array([5]), logit_strs=["x"],
                            logit_probs=np.array([1.0], np.float32), logit_values=np.array([1.0], np.float32), adjacency=A,
                            n_layers=L, error_norms=np.zeros((L, T), np.float32), info=dict(seconds=0.5, model="toy"))  # fmt: skip


def _das(k: int = 2) -> DASResult:
    rng = np.random.default_rng(k)
    L, n = 2, 6
    return DASResult(kind="hook_resid_post", layers=[0, 1], k=k, method="rotation", iia=rng.random(L), iia_random=rng.random(L),
                     iia_full=rng.random(L), iia_train=rng.random(L), correct=rng.random((L, n)) > 0.5,
                     correct_random=rng.random((L, n)) > 0.5, correct_full=rng.random((L, n)) > 0.5, base_accuracy=0.25,
                     losses=rng.random((L, 5)).astype(np.float32), basis=rng.random((L, k, 4)), weights=np.ones((L, k)),
                     n_train=12, n_test=n)  # fmt: skip


@pytest.fixture(scope="module")
def trace():
    model = cj.init_model(tiny_configs()["llamalike"], key=jax.random.key(0), std=0.4)
    return causal_trace(model, np.array([3, 7, 1, 12, 5], np.int32), (1, 3), 4, samples=2, chunk=8)


def _same(a, b):
    """Equal values, arrays by content (dtype too), tuples as tuples, nested results field by field."""
    if isinstance(a, Result):
        assert type(b) is type(a)
        for f in dataclasses.fields(a):
            _same(getattr(a, f.name), getattr(b, f.name))
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and b.dtype == a.dtype
        np.testing.assert_array_equal(b, a)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(b) == list(a)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(b) is type(a) and len(b) == len(a)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        assert b == a or (a != a and b != b), (a, b)  # NaN == NaN here


@pytest.mark.slow
def test_real_results_round_trip_through_save_and_load(tmp_path, trace):
    rng = np.random.default_rng(0)
    A = np.abs(rng.normal(size=(12, 5)))
    A[:6, :2] += 3.0
    split = pure_split(A, rng.random(12), [f"c{i}" for i in range(5)], k=2, top=2)
    g = _graph()
    search = PositionSearch(["a", "b"], [0, 1], rng.random((2, 2)), rng.random((2, 2)), rng.random((2, 2)),
                            {"a": _das(1), "b": _das(2)})  # fmt: skip
    for r in (trace, split, g, prune(g), graph_scores(g), search):
        path = r.save(tmp_path / type(r).__name__)  # ".npz" added
        assert path == tmp_path / f"{type(r).__name__}.npz" and path.exists()
        back = type(r).load(path)
        _same(r, back)
        assert repr(back) == repr(r)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{type(r).__name__}.npz" for r in
                                                                 (trace, split, g, prune(g), graph_scores(g), search))  # no temporaries
    # what the round trip keeps: tuples (a span, a PURE circuit's (name, score)),
    # nested results as their class, top-level arrays readable by name with NumPy alone
    assert CausalTrace.load(tmp_path / "CausalTrace.npz").subject_span == (1, 3)
    assert isinstance(PositionSearch.load(tmp_path / "PositionSearch.npz").results["b"], DASResult)
    assert PositionSearch.load(tmp_path / "PositionSearch.npz").best() == search.best()
    assert Pruned.load(tmp_path / "Pruned").node_threshold == 0.8  # the suffix is optional
    assert isinstance(PureSplit.load(tmp_path / "PureSplit.npz").circuits[0][0], tuple)
    with np.load(tmp_path / "CausalTrace.npz") as z:
        np.testing.assert_array_equal(z["scores"], trace.scores)
        assert json.loads(str(z["__meta__"]))["type"] == "CausalTrace"
    with pytest.raises(ValueError, match="holds a CausalTrace, not a PureSplit"):
        PureSplit.load(tmp_path / "CausalTrace.npz")


def test_save_is_atomic_and_takes_any_field_name(tmp_path, monkeypatch):
    @dataclasses.dataclass(frozen=True, repr=False)
    class Odd(Result):
        file: np.ndarray  # np.savez(file, **arrays) would clash with this name
        allow_pickle: np.ndarray
        nested: dict

    r = Odd(np.arange(3), np.ones(2), {"file": np.zeros(2), "span": (1, 2)})
    _same(r, Odd.load(r.save(tmp_path / "odd.npz")))
    before = (tmp_path / "odd.npz").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(np.lib.format, "write_array", boom)
    with pytest.raises(OSError, match="disk full"):
        r.replace(file=np.arange(5)).save(tmp_path / "odd.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["odd.npz"]  # no half file, no temporary left
    assert (tmp_path / "odd.npz").read_bytes() == before  # the old file untouched


def test_attribution_graphs_are_compressed_and_old_files_still_load(tmp_path):
    g = _graph()
    big = g.replace(adjacency=np.zeros((400, 400), np.float32))
    assert big.save(tmp_path / "g.npz").stat().st_size < 400 * 400 * 4 / 20  # deflated: the adjacency is sparse
    # a graph written before graphs were results: arrays and JSON under "meta"
    meta = dict(prompt=g.prompt, token_strs=g.token_strs, logit_strs=g.logit_strs, n_layers=g.n_layers, info=g.info)
    arrays = {f: getattr(g, f) for f in ("tokens", "features", "activations", "logit_tokens", "logit_probs", "logit_values",
                                         "adjacency", "error_norms")}  # fmt: skip
    np.savez_compressed(tmp_path / "old.npz", meta=np.asarray(json.dumps(meta)), **arrays)
    _same(g, AttributionGraph.load(tmp_path / "old.npz"))


RESULT_CLASSES = [CausalTrace, Decomposition, RomeInfo, EditScores, LayerProbes, TCAVResult, NeuronAttribution, PureSplit, DASResult,
                  PositionSearch, Evaluation, TrainResult, FeatureStats, AttributionGraph, Pruned, GraphScores,
                  TranscoderEvaluation]  # fmt: skip


@pytest.mark.parametrize("cls", RESULT_CLASSES, ids=lambda c: c.__name__)
def test_results_are_frozen_typed_results(cls):
    assert issubclass(cls, Result) and dataclasses.is_dataclass(cls)
    assert cls.__dataclass_params__.frozen and not cls.__dataclass_params__.repr  # frozen, and the summary repr
    assert (cls.__doc__ or "").strip() and not cls.__doc__.startswith(cls.__name__ + "(")  # a docstring of its own


def test_results_cannot_be_changed_in_place_and_replace_copies(trace):
    with pytest.raises(dataclasses.FrozenInstanceError):
        trace.scores = np.zeros(3)
    other = trace.replace(answer_id=5)
    assert other.answer_id == 5 and trace.answer_id == 4 and other.scores is trace.scores
    g = _graph()
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.info = {}
    with pytest.raises(KeyError, match="no field 0"):  # a former NamedTuple is not unpacked by position
        scores, *_ = trace


def test_tasks_are_frozen():
    t = Task("toy", [1, 2, 3], [1, 2, 4], metric=None)
    assert t.clean.shape == (1, 3) and t.clean.dtype == np.int32  # still normalised on construction
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.clean = np.zeros((1, 3), np.int32)
    u = dataclasses.replace(t, name="other", corrupt=[[1, 2, 5]])
    assert u.name == "other" and u.corrupt.tolist() == [[1, 2, 5]] and t.corrupt.tolist() == [[1, 2, 4]]


def test_repr_shows_shapes_never_contents(trace):
    big = np.ones(BIG, np.float32)
    for r in (trace.replace(scores=big), _graph().replace(adjacency=big), FeatureStats(big, big, big, 7),
              PositionSearch(["a"], [0], big, big, big, {"a": _das()})):
        s = repr(r)
        assert s.startswith(type(r).__name__ + "(") and "\n" not in s and len(s) < 700, s
        assert "array(" not in s and "1., 1." not in s and "..." not in s
    assert "scores=f32[300,400]" in repr(trace.replace(scores=big))
    assert "subject_span=(1, 3)" in repr(trace)


def test_results_that_replaced_dicts_read_like_them():
    fs = FeatureStats(density=np.array([0.0, 0.5]), n_active=np.array([0, 3]), max_act=np.array([0.0, 2.0], np.float32), n_tokens=6)
    ev = TranscoderEvaluation(fve=[0.9, 0.8], l0=[3.0, 4.0], ce_clean=2.0, ce_replaced=2.5, ce_zero=4.0, ce_recovered=0.75)
    sc = EditScores(pre=dict(p_new=0.1), post=dict(p_new=0.9), neighborhood_dp_true=0.0, essence_kl=0.01, efficacy=1.0,
                    paraphrase=1.0, neighborhood=0.5)  # fmt: skip
    gs = graph_scores(_graph())
    assert fs["n_tokens"] == 6 and ev["ce_recovered"] == 0.75 and sc["post"]["p_new"] == 0.9 and 0 < gs["replacement"] < 1
    assert list(ev.keys()) == ["fve", "l0", "ce_clean", "ce_replaced", "ce_zero", "ce_recovered"]  # the dict's keys, in order
    assert json.loads(json.dumps(dict(ev))) == dict(fve=[0.9, 0.8], l0=[3.0, 4.0], ce_clean=2.0, ce_replaced=2.5, ce_zero=4.0,
                                                    ce_recovered=0.75)  # fmt: skip
    assert {**gs, "extra": 1}.keys() == {"replacement", "completeness", "extra"}
    assert "max_act" in fs and "nope" not in fs and fs.get("nope", 3) == 3 and fs.get("n_tokens") == 6
    with pytest.raises(KeyError, match="no field 'cpr'"):
        ev["cpr"]
    assert select_features(fs, "top_max", n=1) == select_features(dict(fs), "top_max", n=1) == [1]
    assert sorted(fs.to_numpy()) == ["density", "max_act", "n_active", "n_tokens"]
