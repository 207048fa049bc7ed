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
    abstract = jax.tree.map(_abstract, params)
    with ocp.StandardCheckpointer() as ckpt:
        loaded = ckpt.restore(path, abstract)
    return eqx.combine(loaded, static)


def save_model(path: str | Path, model) -> Path:
    """Checkpoint a `Transformer` with its config, restorable by `load_model(path)` alone."""
    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    save(path / "params", model)
    write_text(path / "config.json", json.dumps(dataclasses.asdict(model.cfg)))
    return path


def load_model(path: str | Path, *, mesh=None):
    """A model saved by `save_model`; with `mesh`, each weight is read straight into its shards
    (`_sharding.shard_model`'s layout), so no device ever holds the whole model."""
    from ..core import init_model

    path = Path(path).absolute()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a circuits_jax model checkpoint (no config.json)")
    cfg = Config(**json.loads((path / "config.json").read_text()))
    like = jax.eval_shape(lambda: init_model(cfg, key=jax.random.key(0)))
    if mesh is not None:
        from ..scale import model_shardings

        like = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), like, model_shardings(like, mesh))
    model = restore(path / "params", like)
    check_finite(model, str(path))  # a NaN or Inf weight is refused here, named, not found later as NaN logits
    return model


def tree_allclose(a, b, *, rtol=1e-6, atol=1e-6) -> bool:
    """Same structure and every array close."""
    la, ta = jax.tree.flatten(_arrays(a))
    lb, tb = jax.tree.flatten(_arrays(b))
    return ta == tb and all(np.allclose(x, y, rtol=rtol, atol=atol) for x, y in zip(la, lb))
