"""One style for what techniques return: immutable, typed, with the same repr, `to_numpy` and `save`.

A result is a frozen dataclass deriving `Result`:

    @dataclasses.dataclass(frozen=True, repr=False)
    class PatchResult(Result):
        result: np.ndarray  # [layer, pos, head] ...
        clean_metric: float

- `repr(r)` shows shapes and names, never array contents (`_repr.summary`);
- `r.to_numpy()` is a dict of its fields with every array as a NumPy array (nested results too);
- `r.save(path)` writes `path` (`.npz`: every array field, plus the other fields as JSON under
  `__meta__`, arrays inside them as entries `field/key/...`) through a temporary file renamed into
  place, and returns the path it wrote; `cls.load(path)` reads it back (nested results as their
  classes, tuples as tuples);
- `r.replace(**changes)` is a copy with some fields changed (results are never mutated);
- `r["name"]` reads a field, for the results that replaced plain dicts (`faithfulness(...)["cpr"]`);
  with `keys()`, `get` and `in`, `dict(r)` and `{**r}` work as on the dict.

What flows through `jax.jit` (`RunOutput`, `Forward`, `Generation`, the replacement model's
`Trace`) stays a NamedTuple: JAX needs those as pytrees. They use the same `summary` repr.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
import zipfile
from pathlib import Path
from typing import Any

import numpy as np


def _is_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, (np.generic,))


_TYPES: dict[str, type] = {}  # "module.QualName" -> Result subclass: what `load` rebuilds nested results with


def _encode(x: Any, arrays: dict[str, np.ndarray], key: str) -> Any:
    """A JSON-able form of `x`; its arrays go to `arrays` under `key`-derived names, referenced as
    `{"__array__": name}`. Nested results are tagged with their type, tuples kept as tuples; other
    dataclasses (equinox modules, configs) become dicts of their fields; anything else its repr."""
    if isinstance(x, np.generic):
        return x.item()
    if _is_array(x):
        a = np.asarray(x)
        if a.dtype == object:
            return _encode(a.tolist(), arrays, key)
        name = key
        while name in arrays:
            name += "_"
        arrays[name] = a
        return {"__array__": name}
    if isinstance(x, Result):
        return {"__result__": f"{type(x).__module__}.{type(x).__qualname__}",
                "fields": {f.name: _encode(getattr(x, f.name), arrays, f"{key}/{f.name}") for f in dataclasses.fields(x)}}  # fmt: skip
    if isinstance(x, dict):
        return {str(k): _encode(v, arrays, f"{key}/{k}") for k, v in x.items()}
    if isinstance(x, tuple) and not hasattr(x, "_fields"):
        return {"__tuple__": [_encode(v, arrays, f"{key}/{i}") for i, v in enumerate(x)]}
    if isinstance(x, (list, tuple)):
        return [_encode(v, arrays, f"{key}/{i}") for i, v in enumerate(x)]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _encode(getattr(x, f.name), arrays, f"{key}/{f.name}") for f in dataclasses.fields(x)}
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return repr(x)


def _decode(x: Any, arrays) -> Any:
    """Inverse of `_encode` (dataclasses that are not results come back as dicts)."""
    if isinstance(x, list):
        return [_decode(v, arrays) for v in x]
    if not isinstance(x, dict):
        return x
    if set(x) == {"__array__"}:
        return arrays[x["__array__"]]
    if set(x) == {"__tuple__"}:
        return tuple(_decode(v, arrays) for v in x["__tuple__"])
    if set(x) == {"__result__", "fields"}:
        fields = {k: _decode(v, arrays) for k, v in x["fields"].items()}
        cls = _TYPES.get(x["__result__"])
        return fields if cls is None else cls._from_fields(fields)
    return {k: _decode(v, arrays) for k, v in x.items()}


def _numpy(x: Any) -> Any:
    if isinstance(x, Result):
        return x.to_numpy()
    if _is_array(x):
        return np.asarray(x)
    if isinstance(x, dict):
        return {k: _numpy(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
        return type(x)(_numpy(v) for v in x)
    return x


class Result:
    """Base of result dataclasses (see the module docstring). Subclasses are
    `@dataclasses.dataclass(frozen=True, repr=False)`."""

    _compress = False  # `save` deflates the .npz (a class attribute, not a field: e.g. a sparse adjacency matrix)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _TYPES[f"{cls.__module__}.{cls.__qualname__}"] = cls

    def __repr__(self) -> str:
        from ._repr import summary

        return summary(self)

    def __getitem__(self, key: str) -> Any:
        if not isinstance(key, str) or key not in self.keys():
            raise KeyError(f"{type(self).__name__} has no field {key!r}; fields: {', '.join(self.keys())}")
        return getattr(self, key)

    def __contains__(self, key) -> bool:
        return key in self.keys()

    def get(self, key: str, default: Any = None) -> Any:
        """`r[key]` if `key` is a field, else `default` (as `dict.get`)."""
        return getattr(self, key) if key in self.keys() else default

    def keys(self) -> list[str]:
        """Field names (with `__getitem__`, a result reads like the dict it replaced: `dict(r)`, `{**r}`)."""
        return [f.name for f in dataclasses.fields(self)]

    def values(self) -> list[Any]:
        """Field values, in field order."""
        return [getattr(self, k) for k in self.keys()]

    def items(self) -> list[tuple[str, Any]]:
        """`(field, value)` pairs, in field order (as the dict it replaced had them)."""
        return [(k, getattr(self, k)) for k in self.keys()]

    def replace(self, **changes) -> "Result":
        """A copy with `changes` applied (results are frozen)."""
        return dataclasses.replace(self, **changes)

    def to_numpy(self) -> dict[str, Any]:
        """Every field, arrays as NumPy arrays (also inside dicts, lists and tuples; nested results as dicts)."""
        return {f.name: _numpy(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the result to `path` (`.npz` added if missing): array fields as arrays, the rest as
        JSON; written under a temporary name and renamed, so an interruption leaves no half file.
        Returns the path written."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        arrays: dict[str, np.ndarray] = {}
        meta = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            a = np.asarray(v) if _is_array(v) else None
            if a is not None and a.dtype != object:
                arrays[f.name] = a  # top-level arrays under their field's name (`np.load(path)["scores"]`)
            else:
                meta[f.name] = _encode(v, arrays, f.name)  # nested arrays as "field/key/...": never a field's name
        arrays["__meta__"] = np.asarray(json.dumps(dict(type=type(self).__name__, fields=meta)))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # beside it: the rename is atomic
        try:
            compression = zipfile.ZIP_DEFLATED if self._compress else zipfile.ZIP_STORED
            with open(tmp, "xb") as fh, zipfile.ZipFile(fh, "w", compression=compression, allowZip64=True) as zf:
                for name, a in arrays.items():  # what np.savez writes, without its `file=` keyword clashing with a field
                    with zf.open(name + ".npy", "w", force_zip64=True) as out:
                        np.lib.format.write_array(out, a, allow_pickle=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike):
        """Read a result written by `save` (`.npz` added if `path` lacks it and does not exist).
        Arrays come back as NumPy arrays (nested ones too), tuples as tuples, nested results as
        their classes; other non-array values as JSON values (a non-result dataclass as a dict)."""
        path = Path(path)
        if not path.exists() and path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        with np.load(path, allow_pickle=False) as z:
            if "__meta__" not in z.files:
                raise ValueError(f"{path} was not written by Result.save (it has no __meta__ entry)")
            meta = json.loads(str(z["__meta__"]))
            arrays = {k: z[k] for k in z.files if k != "__meta__"}
        if meta.get("type") != cls.__name__:
            raise ValueError(f"{path} holds a {meta.get('type')}, not a {cls.__name__}")
        values = {k: v for k, v in arrays.items() if "/" not in k}
        values.update({k: _decode(v, arrays) for k, v in meta["fields"].items()})
        return cls._from_fields(values)

    @classmethod
    def _from_fields(cls, values: dict[str, Any]):
        """The result from a dict of field values (fields it does not take are ignored)."""
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        return cls(**{k: v for k, v in values.items() if k in names})
