"""Saving and restoring with orbax-checkpoint: the one place the project writes pytrees to disk.

`save(path, tree)` / `restore(path, like)` for any pytree of arrays (models,
SAEs, optimiser states); `save_model` / `load_model` add the model's config so
a model restores with no template.

Nothing is left half-written: a new checkpoint is written by orbax under a temporary name and
renamed into place, and one that replaces an existing checkpoint is written complete beside it
and then swapped in (an interruption during the swap puts the old one back).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np
import orbax.checkpoint as ocp

from ..core import Config
from ._finite import check_finite
from ._files import write_text


def _arrays(tree):
    return eqx.filter(tree, eqx.is_array)


def save(path: str | Path, tree: Any) -> Path:
    """Write the arrays of `tree` to directory `path`. An existing checkpoint there is replaced only
    once the new one is complete (written beside it, then renamed over it)."""
    path = Path(path).absolute()
    if not path.exists():
        with ocp.StandardCheckpointer() as ckpt:  # orbax writes a temporary directory and renames it
            ckpt.save(path, _arrays(tree))
        return path
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    old = path.with_name(f".{path.name}.{os.getpid()}.old")
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp, _arrays(tree))
    try:
        os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C between the two renames: the old checkpoint goes back
        if not path.exists() and old.exists():
            os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return path


def _abstract(a) -> jax.ShapeDtypeStruct:
    sharding = getattr(a, "sharding", None)
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)


def restore(path: str | Path, like: Any) -> Any:
    """Read arrays saved by `save` into the structure of `like` (real or `jax.eval_shape` arrays).

    Each array lands with the sharding of its `like` leaf when it has one, so a checkpoint written
    from one device mesh restores onto another (a 4x2 mesh's state onto 8x1, or onto one device).
    """
    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    params, static = eqx.partition(like, lambda x: eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(jax.tree.map(_abstract, params))
    wanted = {tuple(_name(k) for k in key): leaf for key, leaf in leaves}
    # Restored by name, not by tree structure: a field added to a module since the checkpoint was written
    # (None where a model does not use it, such as `Blocks.q_norm_w`) must not orphan the checkpoints of
    # models that never had it. Every array `like` needs must still be on disk.
    with ocp.StandardCheckpointer() as ckpt:
        on_disk = ckpt.metadata(path).item_metadata.tree
        seen: set = set()

        def target(node, prefix=()):
            if isinstance(node, dict):
                return {k: target(v, (*prefix, k)) for k, v in node.items()}
            if isinstance(node, (list, tuple)):
                return type(node)(target(v, (*prefix, i)) for i, v in enumerate(node))
            if prefix in wanted:
                seen.add(prefix)
                return wanted[prefix]
            return None  # on disk but not wanted (or saved as None): skipped

        item = target(on_disk)
        missing = [".".join(map(str, k)) for k in wanted if k not in seen]
        if missing:
            raise ValueError(f"checkpoint {path} lacks {', '.join(missing)}: it was written for another model")
        loaded = ckpt.restore(path, item)
    values = []
    for key in wanted:
        node = loaded
        for k in key:
            node = node[k]
        values.append(node)
    return eqx.combine(jax.tree_util.tree_unflatten(treedef, values), static)


def _name(k) -> str | int:
    """The name of one step of a pytree key path (an attribute, dict key or sequence index)."""
    for attr in ("name", "key", "idx"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return str(k)


def save_model(path: str | Path, model) -> Path:
    """Checkpoint a `Transformer` with its config, restorable by `load_model(path)` alone."""
    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    save(path / "params", model)
    write_text(path / "config.json", json.dumps(dataclasses.asdict(model.cfg)))
    return path


def load_model(path: str | Path, *, mesh=None, dtype=None):
    """A model saved by `save_model`; with `mesh`, each weight is read straight into its shards
    (`_sharding.shard_model`'s layout), so no device ever holds the whole model; with `dtype`, each weight is
    read straight into that dtype (`core.cast`'s rule), so no float32 copy of the model is ever made."""
    from ..core import cast, init_model

    path = Path(path).absolute()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a circuits_jax model checkpoint (no config.json)")
    cfg = Config(**{k: _tuples(v) for k, v in json.loads((path / "config.json").read_text()).items()})
    like = jax.eval_shape(lambda: init_model(cfg, key=jax.random.key(0)))
    if dtype is not None:
        like = cast(like, dtype)
    if mesh is not None:
        from ..scale import model_shardings

        like = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), like, model_shardings(like, mesh))
    model = restore(path / "params", like)
    check_finite(model, str(path))  # a NaN or Inf weight is refused here, named, not found later as NaN logits
    return model


def _tuples(v):
    """JSON's lists back to the tuples a (hashable) `Config` holds: `layer_types`, `rope_scaling`'s items."""
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def tree_allclose(a, b, *, rtol=1e-6, atol=1e-6) -> bool:
    """Same structure and every array close."""
    la, ta = jax.tree.flatten(_arrays(a))
    lb, tb = jax.tree.flatten(_arrays(b))
    return ta == tb and all(np.allclose(x, y, rtol=rtol, atol=atol) for x, y in zip(la, lb))
