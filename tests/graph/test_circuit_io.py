"""Circuit files (JSON and directory) round-trip exactly; the graph figure and the HTML page are written."""

import json
from html.parser import HTMLParser

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from circuits_jax import Config, Graph
from circuits_jax.graph._circuit import Circuit
from circuits_jax.graph._io import load_circuit, save_circuit
from circuits_jax.plot import circuit_graph, circuit_html

BASE = dict(d_model=16, n_layers=3, n_heads=4, d_head=4, d_vocab=23, n_ctx=32, d_mlp=32)
CONFIGS = {"mha": Config(**BASE), "gqa": Config(**BASE, n_kv_heads=2)}


def _circuit(cfg, *, seed=0, scored=True, dtype=np.float32, n=30):
    """A random circuit: `n` kept edges, scores on every real edge (some NaN, some negative), zero off the mask."""
    g = Graph.of(cfg)
    rng = np.random.default_rng(seed)
    s, d = np.nonzero(g.mask)
    pick = rng.choice(len(s), n, replace=False)
    edges = np.zeros(g.mask.shape, bool)
    edges[s[pick], d[pick]] = True
    scores = None
    if scored:
        scores = np.where(g.mask, rng.normal(size=g.mask.shape), 0.0).astype(dtype)
        scores[s[pick[:3]], d[pick[:3]]] = np.nan  # untested kept edges
        scores[s[pick[-1]], d[pick[-1]]] = np.inf
        scores[g.mask & ~edges & (rng.random(g.mask.shape) < 0.3)] = np.nan
    meta = {"task": "ioi", "threshold": 0.01, "ks": [1, 2, 3], "nested": {"ok": True, "none": None}}
    return Circuit(g, edges, scores, method="acdc", level="edge", meta=meta)


def _assert_same(a: Circuit, b: Circuit, off_mask_nan=False):
    assert a.graph.cfg == b.graph.cfg and a.graph is b.graph
    np.testing.assert_array_equal(a.edges, b.edges)
    assert (a.method, a.level, a.meta) == (b.method, b.level, b.meta)
    if a.scores is None:
        assert b.scores is None
        return
    assert a.scores.dtype == b.scores.dtype
    expect = np.where(a.graph.mask, a.scores, np.nan) if off_mask_nan else a.scores
    np.testing.assert_array_equal(expect, b.scores)  # NaN equals NaN here


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_json_round_trip_is_exact(tmp_path, name, dtype):
    c = _circuit(CONFIGS[name], dtype=dtype)
    path = save_circuit(c, tmp_path / "c.json")
    doc = json.loads(path.read_text())  # strict JSON: no NaN / Infinity tokens
    assert all(doc["config"][k] == v for k, v in BASE.items()) and doc["n_edges"] == 30 and len(doc["edges"]) == 30
    assert [e["source"] + "->" + e["destination"] for e in doc["edges"]] == [f"{s}->{d}" for s, d, _ in c.edge_list()]
    assert sum(e["score"] is None for e in doc["edges"]) == 3
    _assert_same(c, load_circuit(path), off_mask_nan=True)


@pytest.mark.parametrize("name", CONFIGS)
def test_directory_round_trip_is_exact(tmp_path, name):
    c = _circuit(CONFIGS[name], seed=1)
    save_circuit(c, tmp_path / "circ")
    assert (tmp_path / "circ" / "circuit.json").exists()
    _assert_same(c, load_circuit(tmp_path / "circ"))  # off-mask zeros kept too
    unscored = _circuit(CONFIGS[name], seed=2, scored=False)
    for p in (tmp_path / "u", tmp_path / "u.json"):
        _assert_same(unscored, load_circuit(save_circuit(unscored, p)))


def test_unknown_edge_names_the_nearest(tmp_path):
    path = save_circuit(_circuit(CONFIGS["mha"]), tmp_path / "c.json")
    doc = json.loads(path.read_text())
    doc["edges"][0]["destination"] = "a2.h9<q>"
    path.write_text(json.dumps(doc))
    with pytest.raises(KeyError, match="nearest valid"):
        load_circuit(path)
    with pytest.raises(FileNotFoundError):
        load_circuit(tmp_path / "missing.json")


def test_meta_is_made_json_safe(tmp_path):
    c = _circuit(CONFIGS["mha"])
    c = c.replace(meta={"arr": np.arange(3), "x": np.float32(0.5), "t": (1, 2), "nan": float("nan"), 3: "int key"})
    back = load_circuit(save_circuit(c, tmp_path / "c.json"))
    assert back.meta == {"arr": [0, 1, 2], "x": 0.5, "t": [1, 2], "nan": None, "3": "int key"}


@pytest.mark.parametrize("name", CONFIGS)
def test_graph_png_written(tmp_path, name):
    c = _circuit(CONFIGS[name])
    fig = circuit_graph(c, tmp_path / "c.png", title="a <title>")
    assert fig is not None and (tmp_path / "c.png").stat().st_size > 5000
    circuit_graph(c, tmp_path / "top.png", max_edges=5)
    circuit_graph(_circuit(CONFIGS[name], scored=False), tmp_path / "u.png")
    empty = Circuit(c.graph, np.zeros_like(c.edges))
    circuit_graph(empty, tmp_path / "empty.png")
    assert (tmp_path / "top.png").stat().st_size > 0 and (tmp_path / "empty.png").stat().st_size > 0


class _Collect(HTMLParser):
    """Every text node and attribute value, unescaped, and every src / href."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.text, self.links, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.text += [v for _, v in attrs if v]
        self.links += [v for k, v in attrs if k in ("src", "href")]

    def handle_data(self, data):
        self.text.append(data)


@pytest.mark.parametrize("name", CONFIGS)
def test_html_is_standalone_and_names_every_edge(tmp_path, name):
    c = _circuit(CONFIGS[name])
    path = circuit_html(c, tmp_path / "c.html", title="<b>ioi & co</b>")
    page = path.read_text()
    p = _Collect()
    p.feed(page)
    p.close()
    assert not p.links and "http" not in page
    assert not any(f"<{k}>" in page for k in "qkv")  # `a0.h1<q>` never reaches the page unescaped
    assert "<b>ioi" not in page and "&lt;b&gt;ioi &amp; co" in page
    text = "\n".join(p.text)
    for s, d, _ in c.edge_list():
        assert f"{s}->{d}" in text
    assert p.tags.count("path") == c.n_edges and "script" in p.tags and "svg" in p.tags
    circuit_html(Circuit(c.graph, c.edges), tmp_path / "u.html")  # no scores: slider disabled, still written
