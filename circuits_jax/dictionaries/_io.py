"""Saving and loading sparse dictionaries.

Ours: a directory with `dictionary.json` (class, architecture, k, sites, shapes, and any
`info` such as the model and the training run) and `params/` written by the orbax module
(`_checkpoint`). External formats (`_formats`): SAELens, EleutherAI sparsify, Gemma Scope 2,
circuit-tracer, and Gemma Scope 1's `.npz` / `.safetensors` layout (`W_enc [D, F]`, `b_enc [F]`,
`W_dec [F, D]`, `b_dec [D]`, optional `threshold [F]`), which loads as a JumpReLU SAE when a
threshold is present and a ReLU SAE otherwise. `load_dictionary` recognises each.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..models import restore, save
from ._formats import FORMATS, detect, read_circuit_tracer, read_gemma_scope_2, read_saelens, read_sparsify
from ._run import write_json
from ._sae import ARCHS, SAE, CrossLayerTranscoder, init_clt, init_sae

_GEMMA_SCOPE = ("W_enc", "b_enc", "W_dec", "b_dec")


def save_dictionary(path: str | os.PathLike, d, info: dict | None = None) -> Path:
    """Write `d` (an `SAE` or `CrossLayerTranscoder`) to directory `path`; `info` is kept verbatim.

    `dictionary.json` is what makes the directory a saved dictionary: it is removed first and
    written (whole) last, so an interrupted save never leaves a dictionary that loads half-written."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "dictionary.json").unlink(missing_ok=True)
    if isinstance(d, CrossLayerTranscoder):
        spec = dict(kind="clt", arch=d.arch, k=d.k, layers=list(d.layers), in_kind=d.in_kind, out_kind=d.out_kind,
                    d_model=int(d.W_enc.shape[1]), width=d.width)  # fmt: skip
    else:
        spec = dict(kind="sae", arch=d.arch, k=d.k, in_site=d.in_site, out_site=d.out_site, d_in=int(d.W_enc.shape[0]),
                    d_out=int(d.W_dec.shape[1]), width=d.width, skip=d.W_skip is not None)  # fmt: skip
    save(path / "params", d)
    write_json(path / "dictionary.json", dict(spec, info=info or {}), indent=1)
    return path


def _like(spec: dict):
    key = jax.random.key(0)
    if spec["kind"] == "clt":
        return jax.eval_shape(lambda: init_clt(spec["d_model"], spec["width"], tuple(spec["layers"]), key=key, arch=spec["arch"],
                                               k=spec["k"], in_kind=spec["in_kind"], out_kind=spec["out_kind"]))  # fmt: skip
    return jax.eval_shape(lambda: init_sae(spec["d_in"], spec["width"], key=key, arch=spec["arch"], k=spec["k"], d_out=spec["d_out"],
                                           in_site=spec["in_site"], out_site=spec["out_site"], skip=spec.get("skip", False)))  # fmt: skip


def dictionary_info(path: str | os.PathLike) -> dict:
    """The `dictionary.json` of a saved dictionary (spec and `info`)."""
    f = Path(path) / "dictionary.json"
    if not f.exists():
        raise FileNotFoundError(f"{path} is not a saved dictionary (no dictionary.json)")
    return json.loads(f.read_text())


def load_dictionary(
    path: str | os.PathLike,
    *,
    site: str | None = None,
    out_site: str | None = None,
    arch: str | None = None,
    k: int | None = None,
):
    """Load a dictionary in any format `_formats.FORMATS` lists: saved by `save_dictionary` (a
    directory), SAELens's or sparsify's folders, a Gemma Scope 2 folder, a circuit-tracer layer
    file, or a Gemma Scope 1 `.npz` / `.safetensors` file. `site` / `out_site` name where it reads
    and writes when the files do not say (or to override them); for Gemma Scope 1, `arch` defaults
    to jumprelu/relu by whether a threshold is present."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no dictionary at {path}")
    kind = detect(path)
    if kind == "circuits_jax" or (kind is None and (path / "params").is_dir()):  # the latter: an interrupted save
        return restore(path / "params", _like(dictionary_info(path)))
    readers = {"saelens": read_saelens, "sparsify": read_sparsify, "gemma_scope_2": read_gemma_scope_2,
               "gemma_scope_2_file": read_gemma_scope_2, "circuit_tracer": read_circuit_tracer}  # fmt: skip
    if kind in readers:
        return readers[kind](path, site=site, out_site=out_site)
    if kind is None:
        raise ValueError(f"{path} is in no dictionary format known here; checked: " + "; ".join(FORMATS))
    if path.is_dir():
        path = path / "params.npz"
    if path.suffix == ".npz":
        with np.load(path) as f:
            arrays = {k: np.asarray(f[k]) for k in f.files}
    elif path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        arrays = load_file(str(path))
    else:
        raise ValueError(f"{path}: expected a saved dictionary directory, a .npz or a .safetensors file")
    missing = [k for k in _GEMMA_SCOPE if k not in arrays]
    if missing:
        raise ValueError(f"{path} lacks {missing} (the Gemma Scope layout has W_enc, b_enc, W_dec, b_dec, threshold); it has {sorted(arrays)}")
    W_enc, b_enc, W_dec, b_dec = (np.asarray(arrays[k], np.float32) for k in _GEMMA_SCOPE)
    shapes = f"W_enc {W_enc.shape}, b_enc {b_enc.shape}, W_dec {W_dec.shape}, b_dec {b_dec.shape}"
    if W_enc.ndim != 2 or W_dec.ndim != 2:
        raise ValueError(f"{path}: W_enc and W_dec must be matrices ([D, F] and [F, D]); got {shapes}")
    d_in, width = W_enc.shape
    if W_dec.shape[0] != width or b_enc.shape != (width,) or b_dec.shape != (W_dec.shape[1],):
        raise ValueError(
            f"{path}: inconsistent shapes W_enc {W_enc.shape}, b_enc {b_enc.shape}, W_dec {W_dec.shape}, b_dec {b_dec.shape} "
            "(expected [D, F], [F], [F, D], [D])"
        )
    has_t = "threshold" in arrays
    arch = arch or ("jumprelu" if has_t else "relu")
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if arch == "gated":
        raise ValueError(f"{path}: the Gemma Scope layout holds no gated parameters (b_gate, r_mag, b_mag); give "
                         "another arch, or a SAELens folder of a gated SAE")  # fmt: skip
    threshold = np.asarray(arrays["threshold"], np.float32) if has_t else np.zeros(width, np.float32)
    if threshold.shape not in ((), (1,), (width,)):
        raise ValueError(f"{path}: threshold has shape {threshold.shape}; expected [{width}] (one per latent) or a scalar")
    site = site or ""
    return SAE(
        W_enc=jnp.asarray(W_enc), b_enc=jnp.asarray(b_enc), W_dec=jnp.asarray(W_dec), b_dec=jnp.asarray(b_dec),
        threshold=jnp.broadcast_to(jnp.asarray(threshold), (width,)), in_scale=jnp.ones((), jnp.float32),
        out_scale=jnp.ones((), jnp.float32), arch=arch, k=k, in_site=site, out_site=out_site or site,
    )  # fmt: skip
