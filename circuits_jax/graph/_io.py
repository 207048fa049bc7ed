"""Saving and loading circuits: a readable JSON file, or a directory that adds the dense arrays.

`save_circuit(circuit, "ioi.json")` writes one JSON file: the model's config, the method, level and
meta, the kept edges as `{"source", "destination", "score"}` (largest |score| first, one per line)
and, under `other_scores`, the score of every edge that was scored but not kept (ACDC's removed
edges). Scores that are NaN are written as null. Any other path is a directory holding the same
`circuit.json` (kept edges only) and an orbax checkpoint `arrays/` of the dense `edges` and `scores`.

`load_circuit` reads either back into an equal `Circuit`, its `Graph` rebuilt from the config. Only
real edges carry a score in the JSON file: entries off the graph's mask come back as NaN there and
exactly from a directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ..core import Config, Result, Graph
from ..models import restore, save, write_text
from ._circuit import Circuit

FORMAT = "circuits_jax.circuit/1"


def _jsonable(x: Any) -> Any:
    """`x` as plain JSON values: numpy scalars and arrays to numbers and lists, NaN to null, tuples to lists."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, Result):  # a result kept in a circuit's meta (e.g. its ROC AUC): its fields
        return _jsonable(x.to_numpy())
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, jax.Array)):
        return _jsonable(np.asarray(x).tolist())
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    if isinstance(x, float):
        return _score(x)
    if x is None or isinstance(x, (str, int, bool)):
        return x
    return str(x)


def _score(x) -> float | str | None:
    """A score as JSON: the shortest decimal that reads back to the same value in its own dtype (float32's
    `0.1` rather than `0.10000000149011612`), NaN as null, infinities as "inf" / "-inf" (not JSON numbers)."""
    if math.isnan(x):
        return None
    if not math.isfinite(x):
        return "inf" if x > 0 else "-inf"
    return float(str(x)) if isinstance(x, np.floating) else float(x)


def _unscore(v: float | str | None) -> float:
    return math.nan if v is None else float(v)


def _edge_rows(graph: Graph, which: np.ndarray, scores: np.ndarray | None) -> list[dict]:
    """`{"source", "destination", "score"}` of the edges marked in `which`, largest |score| first."""
    s, d = np.nonzero(which)
    sc = np.full(len(s), np.nan) if scores is None else np.asarray(scores)[s, d]
    order = np.argsort(-np.nan_to_num(np.abs(sc.astype(np.float64)), nan=-1.0), kind="stable")
    g = graph
    return [{"source": g.sources[s[i]], "destination": g.destinations[d[i]], "score": _score(sc[i])} for i in order]


def _document(circuit: Circuit, other_scores: bool) -> dict:
    g = circuit.graph
    doc = {
        "format": FORMAT,
        "method": circuit.method,
        "level": circuit.level,
        "n_edges": circuit.n_edges,
        "scores_dtype": None if circuit.scores is None else np.asarray(circuit.scores).dtype.name,
        "meta": _jsonable(circuit.meta),
        "config": dataclasses.asdict(g.cfg),
        "edges": _edge_rows(g, circuit.edges, circuit.scores),
    }
    if other_scores and circuit.scores is not None:
        scored = g.mask & ~circuit.edges & ~np.isnan(np.asarray(circuit.scores, np.float64))
        doc["other_scores"] = _edge_rows(g, scored, circuit.scores)
    return doc


def _dumps(doc: dict) -> str:
    """JSON with one edge per line: diffs and `grep` read a circuit edge by edge."""
    items = []
    for k, v in doc.items():
        if isinstance(v, list) and v and all(isinstance(r, dict) for r in v):
            val = "[\n" + ",\n".join("    " + json.dumps(r, allow_nan=False) for r in v) + "\n  ]"
        else:
            val = json.dumps(v, indent=2, allow_nan=False).replace("\n", "\n  ")
        items.append(f"  {json.dumps(k)}: {val}")
    return "{\n" + ",\n".join(items) + "\n}\n"


def save_circuit(circuit: Circuit, path: str | Path) -> Path:
    """Write `circuit` to `path`: a JSON file if it ends in `.json`, else a directory with `circuit.json`
    and the dense `[S, D]` arrays as an orbax checkpoint. Every file is written whole (the JSON under a
    temporary name, then renamed; orbax commits its checkpoint the same way). Returns the path written."""
    path = Path(path).absolute()
    if path.suffix == ".json":
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, _dumps(_document(circuit, other_scores=True)))
        return path
    path.mkdir(parents=True, exist_ok=True)
    arrays = {"edges": np.asarray(circuit.edges, bool)}
    if circuit.scores is not None:
        arrays["scores"] = np.asarray(circuit.scores)
    save(path / "arrays", arrays)
    write_text(path / "circuit.json", _dumps(_document(circuit, other_scores=False)))  # last: its presence means whole
    return path


def _read_edges(graph: Graph, rows: list[dict], scores: np.ndarray | None, keep: np.ndarray | None) -> None:
    """Mark (`keep`) and score the named edges; an unknown name raises the graph's nearest-name KeyError."""
    for r in rows:
        i, j = graph.edge_index(f"{r['source']}->{r['destination']}")
        if keep is not None:
            keep[i, j] = True
        if scores is not None:
            scores[i, j] = _unscore(r.get("score"))


def load_circuit(path: str | Path) -> Circuit:
    """Read a circuit written by `save_circuit` (a `.json` file or a directory)."""
    path = Path(path).absolute()
    file = path / "circuit.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"no circuit at {path} (expected a .json file or a directory with circuit.json)")
    doc = json.loads(file.read_text())
    if doc.get("format") != FORMAT:
        raise ValueError(f"{file} is not a circuits_jax circuit (format {doc.get('format')!r}, expected {FORMAT!r})")
    graph = Graph.of(Config(**doc["config"]))
    dtype = doc["scores_dtype"]
    if path.is_dir():
        like = {"edges": jax.ShapeDtypeStruct(graph.mask.shape, np.bool_)}
        if dtype is not None:
            like["scores"] = jax.ShapeDtypeStruct(graph.mask.shape, np.dtype(dtype))
        arrays = restore(path / "arrays", like)
        edges, scores = np.asarray(arrays["edges"]), None if dtype is None else np.asarray(arrays["scores"])
    else:
        edges = np.zeros(graph.mask.shape, bool)
        scores = None if dtype is None else np.full(graph.mask.shape, np.nan, np.dtype(dtype))
        _read_edges(graph, doc["edges"], scores, edges)
        _read_edges(graph, doc.get("other_scores", []), scores, None)
    circuit = Circuit(graph, edges, scores, doc["method"], doc["level"], doc["meta"])
    if circuit.n_edges != doc["n_edges"]:
        raise ValueError(f"{path}: {circuit.n_edges} kept edges read, but the file says {doc['n_edges']}")
    return circuit
