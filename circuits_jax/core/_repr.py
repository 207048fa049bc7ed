"""Short reprs for result containers: shapes and names, never array contents.

A notebook cell that ends in `run(...)`, `patch_sweep(...)` or `task` prints the value's repr.
The defaults of NamedTuple and dataclass print every array element (and a `Graph` prints
thousands of node names), which buries what one wants to see: which arrays, of which shapes,
at which sites. `summary(obj)` renders a result class as one line such as

    RunOutput(logits=f32[1,5,23], resid=f32[1,5,16], cache={blocks.0.hook_resid_pre: f32[1,5,16]})

Arrays (numpy, jax, tracers) become `dtype[shape]` (0-d arrays their value), floats 4 significant
digits, long strings, lists and dicts the first few items and a count. The classes that use it
define `def __repr__(self): return summary(self)` (or pass `skip`/`extra`), so behaviour is unchanged.
"""

from __future__ import annotations

import dataclasses
import re

_DTYPE = re.compile(r"^(bfloat|float|int|uint|complex)(\d+)$")
_ABBREV = {"bfloat": "bf", "float": "f", "int": "i", "uint": "u", "complex": "c"}


def dtype_str(dtype) -> str:
    """`float32` -> `f32`, `bfloat16` -> `bf16`, `int32` -> `i32`, `bool` -> `bool` (jax's notation)."""
    name = getattr(dtype, "name", str(dtype))
    m = _DTYPE.match(name)
    return f"{_ABBREV[m.group(1)]}{m.group(2)}" if m else name


def short(x, depth: int = 0, items: int = 4) -> str:
    """A value in a few characters: arrays as `f32[B,T,D]`, scalars to 4 significant digits,
    strings up to 40 characters, containers as their first `items` entries and a count."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):  # numpy / jax arrays and tracers
        shape = tuple(x.shape)
        if shape == () and type(x).__module__.startswith("numpy"):
            return short(x.item(), depth, items)
        return f"{dtype_str(x.dtype)}[{','.join(map(str, shape))}]"
    if isinstance(x, bool) or x is None:
        return repr(x)
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, str):
        return repr(x) if len(x) <= 40 else repr(x[:37]) + "…"
    if isinstance(x, dict):
        if depth > 2:
            return f"dict[{len(x)}]"
        body = [f"{k if isinstance(k, str) else short(k, depth + 1)}: {short(v, depth + 1)}" for k, v in list(x.items())[:items]]
        more = f", … +{len(x) - items}" if len(x) > items else ""
        return "{" + ", ".join(body) + more + "}"
    if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
        if depth > 2:
            return f"{type(x).__name__}[{len(x)}]"
        open_, close = ("[", "]") if isinstance(x, list) else ("(", ")")
        body = ", ".join(short(v, depth + 1) for v in x[:items])
        more = f", … +{len(x) - items}" if len(x) > items else ""
        return f"{open_}{body}{more}{close}"
    if type(x).__repr__ is not object.__repr__ and type(x).__module__.startswith("circuits_jax") and depth == 0:
        return repr(x)
    return type(x).__name__  # modules (metrics, interventions), functions, configs: their name is enough


def summary(obj, skip: tuple[str, ...] = (), extra: dict | None = None, drop_none: bool = False, items: int = 4) -> str:
    """`Name(field=short(value), ...)` over a NamedTuple's or dataclass's fields, less `skip`, plus
    `extra` (already-formatted strings) at the end; `drop_none` leaves out fields that are None."""
    if hasattr(obj, "_fields"):
        pairs = [(f, getattr(obj, f)) for f in obj._fields]
    else:
        pairs = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    parts = [f"{k}={short(v, 1, items)}" for k, v in pairs if k not in skip and not (drop_none and v is None)]
    parts += [f"{k}={v}" for k, v in (extra or {}).items()]
    return f"{type(obj).__name__}({', '.join(parts)})"
