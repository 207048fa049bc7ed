"""The ecosystem's dictionary formats, read into (and written from) our `SAE`.

Each reader maps a format's parameters onto `SAE`'s one layout (`W_enc [D_in, F]`, `b_enc`, `W_dec [F, D_out]`,
`b_dec`, `threshold`, optional `W_skip [D_in, D_out]`) by exact algebra, never by a second forward:

- **SAELens** (`cfg.json` + `sae_weights.safetensors`; architectures standard, topk, jumprelu, gated, transcoder,
  skip_transcoder, jumprelu_transcoder, jumprelu_skip_transcoder, and batchtopk / matryoshka_batchtopk, which
  SAELens runs as JumpReLU at inference). `apply_b_dec_to_input` (x - b_dec before encoding) is folded into
  `b_enc`; a topk SAE's `rescale_acts_by_decoder_norm` into the encoder and decoder columns. Sites are its
  `metadata.hook_name` / `hook_name_out`, TransformerLens names like ours.
- **EleutherAI sparsify** (`cfg.json` + `sae.safetensors`: `encoder.weight [F, D]`, `encoder.bias`,
  `W_dec [F, D]`, `b_dec`, optional `W_skip [D, D]` applied as `x @ W_skip.T`; TopK; an autoencoder subtracts
  `b_dec` from its input, folded into `b_enc`).
- **Gemma Scope 2** (a folder with `config.json` + `params.safetensors`: lowercase `w_enc [D, F]`, `b_enc`,
  `w_dec [F, D]`, `b_dec`, `threshold`, optional `affine_skip_connection [D_in, D_out]`; JumpReLU).
- **circuit-tracer** per-layer transcoders (`layer_{l}.safetensors`: `W_enc [F, D]`, `W_dec [F, D]`, `b_enc`,
  `b_dec`, optional `activation_function.threshold` (JumpReLU) or `k` (TopK), optional `W_skip` applied as
  `x @ W_skip.T`).

A JumpReLU threshold below zero is stored as zero: `relu(z) * [z > t]` (theirs) equals `z * [z > max(t, 0)]`
(ours) for every z. Writers exist for SAELens and sparsify, so our dictionaries load in those libraries.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from ..models import atomic_path, read_json, write_text
from ._sae import SAE

FORMATS = (
    "circuits_jax (dictionary.json + params/)",
    "SAELens (cfg.json + sae_weights.safetensors)",
    "EleutherAI sparsify (cfg.json + sae.safetensors)",
    "Gemma Scope 2 (config.json + params.safetensors with w_enc, w_dec)",
    "Gemma Scope 1 (a .npz / .safetensors file with W_enc, b_enc, W_dec, b_dec[, threshold])",
    "circuit-tracer (layer_N.safetensors with W_enc [F, D], W_dec, b_enc, b_dec)",
)
# SAELens architecture -> (our arch, transcoder, skip)
SAELENS_ARCHS = {
    "standard": ("relu", False, False), "topk": ("topk", False, False), "jumprelu": ("jumprelu", False, False),
    "batchtopk": ("jumprelu", False, False), "matryoshka_batchtopk": ("jumprelu", False, False),
    "gated": ("gated", False, False), "transcoder": ("relu", True, False), "skip_transcoder": ("relu", True, True),
    "jumprelu_transcoder": ("jumprelu", True, False), "jumprelu_skip_transcoder": ("jumprelu", True, True),
}  # fmt: skip
_NORMALIZATIONS = ("none", "expected_average_only_in")  # no effect on a dictionary loaded from disk


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return {k: np.asarray(v, np.float32) for k, v in load_file(str(path)).items()}
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None


def _write(path, weights: dict[str, np.ndarray], name: str, cfg: dict, indent=None) -> Path:
    """A folder of one safetensors file and `cfg.json`, each written whole (a temporary name, then a rename), as
    every file the project writes."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path / name) as tmp:
        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in weights.items()}, str(tmp))
    write_text(path / "cfg.json", json.dumps(cfg, indent=indent))
    return path


def _need(arrays: dict, keys, where: Path, fmt: str) -> None:
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise ValueError(f"{where} lacks {missing} for the {fmt} format; it has {sorted(arrays)}")


def _sae(W_enc, b_enc, W_dec, b_dec, *, arch, threshold=None, k=None, W_skip=None, in_site="", out_site="",
         where: Path) -> SAE:  # fmt: skip
    """Our `SAE` from arrays in our orientation, their shapes checked against each other."""
    d_in, width = W_enc.shape
    d_out = W_dec.shape[1]
    shapes = {"W_enc": (d_in, width), "b_enc": (width,), "W_dec": (width, d_out), "b_dec": (d_out,)}
    got = {"W_enc": W_enc.shape, "b_enc": b_enc.shape, "W_dec": W_dec.shape, "b_dec": b_dec.shape}
    if W_skip is not None:
        shapes["W_skip"], got["W_skip"] = (d_in, d_out), W_skip.shape
    if threshold is not None:
        threshold = np.broadcast_to(np.asarray(threshold, np.float32), (width,))
    bad = {n: got[n] for n in shapes if tuple(got[n]) != shapes[n]}
    if bad:
        raise ValueError(f"{where}: inconsistent shapes {bad}; expected {({n: shapes[n] for n in bad})} "
                         f"(D_in={d_in}, F={width}, D_out={d_out})")  # fmt: skip
    if arch == "topk" and not (k and 0 < k <= width):
        raise ValueError(f"{where}: a topk dictionary needs k in 1..{width}, got {k!r}")
    t = np.zeros(width, np.float32) if threshold is None else np.maximum(threshold, 0.0)
    f32 = lambda a: jnp.asarray(np.asarray(a, np.float32))  # noqa: E731
    return SAE(
        W_enc=f32(W_enc), b_enc=f32(b_enc), W_dec=f32(W_dec), b_dec=f32(b_dec), threshold=f32(t),
        in_scale=jnp.ones((), jnp.float32), out_scale=jnp.ones((), jnp.float32), arch=arch,
        k=int(k) if arch == "topk" else None, in_site=in_site, out_site=out_site or in_site,
        W_skip=None if W_skip is None else f32(W_skip),
    )  # fmt: skip


# ---------------------------------------------------------------- SAELens


def read_saelens(path: Path, *, site: str | None = None, out_site: str | None = None) -> SAE:
    path = Path(path)
    cfg = read_json(path / "cfg.json")
    w = _read_safetensors(path / "sae_weights.safetensors")
    kind = cfg.get("architecture", "standard")
    if kind not in SAELENS_ARCHS:
        raise ValueError(f"{path}: SAELens architecture {kind!r} is not supported; supported: "
                         f"{', '.join(SAELENS_ARCHS)}")  # fmt: skip
    arch, transcoder, skip = SAELENS_ARCHS[kind]
    for key, ok in (("normalize_activations", _NORMALIZATIONS), ("reshape_activations", ("none",))):
        if cfg.get(key, "none") not in ok:
            raise ValueError(f"{path}: SAELens {key}={cfg[key]!r} is not supported; supported: {', '.join(ok)}")
    if "topk_threshold" in w and "threshold" not in w:  # a batchtopk training checkpoint: its inference threshold
        w["threshold"] = np.full(w["b_enc"].shape, float(np.asarray(w["topk_threshold"]).reshape(-1)[0]), np.float32)
    gated = arch == "gated"
    if gated:  # the gate's bias is our b_enc
        _need(w, ["b_gate", "r_mag", "b_mag"], path / "sae_weights.safetensors", "SAELens 'gated'")
        w["b_enc"] = w["b_gate"]
    _need(w, ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if arch == "jumprelu" else []) +
          (["W_skip"] if skip else []), path / "sae_weights.safetensors", f"SAELens {kind!r}")  # fmt: skip
    W_enc, b_enc, W_dec, b_dec = w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"]
    b_mag = w.get("b_mag")
    if not transcoder and cfg.get("apply_b_dec_to_input", True):  # (x - b_dec) @ W_enc + b_enc
        shift = b_dec @ W_enc
        b_enc = b_enc - shift
        if gated:  # the magnitude path reads x - b_dec through W_enc * exp(r_mag)
            b_mag = b_mag - shift * np.exp(w["r_mag"])
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):  # pre * |W_dec[f]|, decoded by W_dec[f] / |.|
        n = np.linalg.norm(W_dec, axis=-1)
        W_enc, b_enc, W_dec = W_enc * n, b_enc * n, W_dec / n[:, None]
    meta = cfg.get("metadata") or {}
    in_site = site or meta.get("hook_name") or cfg.get("hook_name") or ""
    out = out_site or (meta.get("hook_name_out") or cfg.get("hook_name_out") if transcoder else None) or in_site
    d = _sae(W_enc, b_enc, W_dec, b_dec, arch=arch, threshold=w.get("threshold"), k=cfg.get("k"),
             W_skip=w["W_skip"].T if skip else None, in_site=in_site, out_site=out, where=path)  # fmt: skip
    if gated:
        d = dataclasses.replace(d, r_mag=jnp.asarray(w["r_mag"]), b_mag=jnp.asarray(b_mag, jnp.float32))
    return d


def _unscaled(d: SAE) -> tuple[np.ndarray, ...]:
    """`d`'s parameters with `in_scale` / `out_scale` folded in: raw units in, raw units out."""
    a = lambda x: np.asarray(x, np.float32)  # noqa: E731
    s_in, s_out = a(d.in_scale), a(d.out_scale)
    return a(d.W_enc) * s_in, a(d.b_enc), a(d.W_dec) / s_out, a(d.b_dec) / s_out, a(d.threshold)


def save_saelens(d: SAE, path, *, model_name: str = "") -> Path:
    """Write `d` as SAELens saves an inference SAE (`SAE.load_from_disk` reads it). Our batchtopk and matryoshka
    run as JumpReLU at inference, which is how SAELens stores its own; a topk transcoder has no SAELens form."""
    if not isinstance(d, SAE):
        raise TypeError(f"save_saelens writes an SAE or per-layer transcoder, got {type(d).__name__}")
    transcoder, skip = d.is_transcoder or d.W_skip is not None, d.W_skip is not None
    jump = d.arch in ("jumprelu", "batchtopk", "matryoshka")
    if d.arch == "topk" and transcoder:
        raise NotImplementedError("SAELens has no topk transcoder architecture; export refused")
    if transcoder:
        kind = ("jumprelu_" if jump else "") + ("skip_transcoder" if skip else "transcoder")
    else:
        kind = {"relu": "standard", "topk": "topk", "gated": "gated"}.get(d.arch, "jumprelu")
    if d.arch == "gated" and transcoder:
        raise NotImplementedError("SAELens has no gated transcoder architecture; export refused")
    W_enc, b_enc, W_dec, b_dec, t = _unscaled(d)
    weights = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if d.arch == "gated":  # in_scale is folded into W_enc, and with it into both paths
        weights = {"W_enc": W_enc, "b_gate": b_enc, "r_mag": np.asarray(d.r_mag, np.float32),
                   "b_mag": np.asarray(d.b_mag, np.float32), "W_dec": W_dec, "b_dec": b_dec}  # fmt: skip
    if jump:
        weights["threshold"] = t
    if skip:
        weights["W_skip"] = np.ascontiguousarray(np.asarray(d.W_skip, np.float32).T)
    meta = {"hook_name": d.in_site, "model_name": model_name}
    if transcoder:
        meta["hook_name_out"] = d.out_site
    cfg = {"architecture": kind, "d_in": int(W_enc.shape[0]), "d_sae": d.width, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": meta}  # fmt: skip
    if transcoder:
        cfg["d_out"] = int(W_dec.shape[1])
    if d.arch == "topk":
        cfg.update(k=d.k, rescale_acts_by_decoder_norm=False)
    return _write(path, weights, "sae_weights.safetensors", cfg, indent=1)


# ---------------------------------------------------------------- EleutherAI sparsify


def _sparsify_site(name: str) -> str | None:
    """A sparsify hookpoint (a Hugging Face module name) as our site, where the two are the same activation."""
    m = re.fullmatch(r"(?:model\.|gpt_neox\.|transformer\.)?(?:layers|h)\.(\d+)", name)
    return f"blocks.{m.group(1)}.hook_resid_post" if m else None


def read_sparsify(path: Path, *, site: str | None = None, out_site: str | None = None) -> SAE:
    path = Path(path)
    cfg = read_json(path / "cfg.json")
    w = _read_safetensors(path / "sae.safetensors")
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(f"{path}: sparsify activation {cfg['activation']!r} is not supported; supported: topk")
    _need(w, ["encoder.weight", "encoder.bias", "W_dec", "b_dec"], path / "sae.safetensors", "sparsify")
    W_enc, b_enc, b_dec = w["encoder.weight"].T, w["encoder.bias"], w["b_dec"]
    if not cfg.get("transcode", False):  # it encodes x - b_dec
        b_enc = b_enc - b_dec @ W_enc
    in_site = site or _sparsify_site(path.name) or ""
    if not in_site:
        raise ValueError(f"{path}: which site does sparsify's hookpoint {path.name!r} read? pass site= (a "
                         "TransformerLens name such as blocks.6.hook_resid_post)")  # fmt: skip
    W_skip = w["W_skip"].T if "W_skip" in w else None
    return _sae(W_enc, b_enc, w["W_dec"], b_dec, arch="topk", k=cfg.get("k"), W_skip=W_skip, in_site=in_site,
                out_site=out_site or in_site, where=path)  # fmt: skip


def save_sparsify(d: SAE, path) -> Path:
    """Write a topk `d` as sparsify's `SparseCoder.save_to_disk` does (`SparseCoder.load_from_disk` reads it)."""
    if not isinstance(d, SAE) or d.arch != "topk":
        raise NotImplementedError(f"sparsify stores TopK dictionaries only; this one is {getattr(d, 'arch', d)!r}")
    W_enc, b_enc, W_dec, b_dec, _ = _unscaled(d)
    transcode = d.is_transcoder
    if W_enc.shape[0] != W_dec.shape[1]:
        raise NotImplementedError(f"sparsify needs d_in == d_out; this dictionary maps {W_enc.shape[0]} -> {W_dec.shape[1]}")
    if not transcode:  # sparsify subtracts b_dec from an autoencoder's input: undo it in b_enc
        b_enc = b_enc + b_dec @ W_enc
    weights = {"encoder.weight": W_enc.T, "encoder.bias": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if d.W_skip is not None:
        weights["W_skip"] = np.asarray(d.W_skip, np.float32).T
    cfg = {"activation": "topk", "expansion_factor": max(1, d.width // W_enc.shape[0]), "normalize_decoder": True,
           "num_latents": d.width, "k": d.k, "multi_topk": False, "skip_connection": d.W_skip is not None,
           "transcode": transcode, "d_in": int(W_enc.shape[0])}  # fmt: skip
    return _write(path, weights, "sae.safetensors", cfg)


# ---------------------------------------------------------------- Gemma Scope 2, circuit-tracer


def _gemma_scope_2_sites(folder: str) -> tuple[str, str]:
    """SAELens's reading of a Gemma Scope 2 folder name (`resid_post/layer_5_width_16k_l0_small`, ...)."""
    m = re.search(r"layer_(\d+)", folder)
    if m is None:
        return "", ""
    l = m.group(1)
    for part, site in (("resid_post", "hook_resid_post"), ("attn_out", "attn.hook_z"), ("mlp_out", "hook_mlp_out")):
        if part in folder:
            return f"blocks.{l}.{site}", f"blocks.{l}.{site}"
    if "transcoder" in folder:
        return f"blocks.{l}.hook_mlp_in", f"blocks.{l}.hook_mlp_out"
    return "", ""


def read_gemma_scope_2(path: Path, *, site: str | None = None, out_site: str | None = None) -> SAE:
    """A Gemma Scope 2 folder (or its `params.safetensors`); sites from the folder's name as SAELens reads it."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    cfg = read_json(path / "config.json") if (path / "config.json").exists() else {}
    if cfg.get("architecture", "jump_relu") != "jump_relu":
        raise ValueError(f"{path}: Gemma Scope 2 architecture {cfg['architecture']!r}; only jump_relu is published")
    w = _read_safetensors(path / "params.safetensors")
    _need(w, ["w_enc", "b_enc", "w_dec", "b_dec", "threshold"], path / "params.safetensors", "Gemma Scope 2")
    if w["w_dec"].ndim != 2:
        raise NotImplementedError(f"{path}: a cross-layer transcoder's w_dec {w['w_dec'].shape}; only per-layer "
                                  "Gemma Scope 2 dictionaries load for now")  # fmt: skip
    s_in, s_out = _gemma_scope_2_sites("/".join(path.parts[-2:]))
    skip = w.get("affine_skip_connection")
    return _sae(w["w_enc"], w["b_enc"], w["w_dec"], w["b_dec"], arch="jumprelu", threshold=w["threshold"],
                W_skip=skip, in_site=site or s_in, out_site=out_site or (s_out if site is None else site),
                where=path)  # fmt: skip


def read_circuit_tracer(path: Path, *, site: str | None = None, out_site: str | None = None) -> SAE:
    """One of circuit-tracer's per-layer transcoder files (`layer_{l}.safetensors`); sites default to the
    layer's `ln2.hook_normalized` -> `hook_mlp_out` when the name gives the layer."""
    path = Path(path)
    w = _read_safetensors(path)
    _need(w, ["W_enc", "W_dec", "b_enc", "b_dec"], path, "circuit-tracer")
    m = re.fullmatch(r"layer_(\d+)", path.stem)
    in_site = site or (f"blocks.{m.group(1)}.ln2.hook_normalized" if m else "")
    out = out_site or (f"blocks.{m.group(1)}.hook_mlp_out" if m and site is None else in_site)
    if "k" in w:
        arch, k, t = "topk", int(np.asarray(w["k"]).reshape(-1)[0]), None
    elif "activation_function.threshold" in w:
        arch, k, t = "jumprelu", None, w["activation_function.threshold"]
    else:
        arch, k, t = "relu", None, None
    W_skip = w["W_skip"].T if "W_skip" in w else None
    return _sae(w["W_enc"].T, w["b_enc"], w["W_dec"], w["b_dec"], arch=arch, threshold=t, k=k, W_skip=W_skip,
                in_site=in_site, out_site=out, where=path)  # fmt: skip


def detect(path: Path) -> str | None:
    """Which format a path is in: "circuits_jax", "saelens", "sparsify", "gemma_scope_2", "gemma_scope",
    "circuit_tracer", or None."""
    path = Path(path)
    if path.is_dir():
        if (path / "dictionary.json").exists():
            return "circuits_jax"
        if (path / "sae_weights.safetensors").exists():
            return "saelens"
        if (path / "sae.safetensors").exists():
            return "sparsify"
        if (path / "params.safetensors").exists():
            return "gemma_scope_2"
        if (path / "params.npz").exists():
            return "gemma_scope"
        return None
    if path.suffix == ".npz":
        return "gemma_scope"
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                keys = set(f.keys())
        except Exception as e:
            raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
        if {"w_enc", "w_dec"} <= keys:
            return "gemma_scope_2_file"
        if "W_enc" in keys and ({"activation_function.threshold", "k"} & keys):
            return "circuit_tracer"
        if "W_enc" in keys and "b_enc" in keys:
            with safe_open(str(path), framework="numpy") as f:
                enc, dec = f.get_slice("W_enc").get_shape(), f.get_slice("b_dec").get_shape()
            # circuit-tracer stores W_enc as [F, D] (its b_dec is [D]); Gemma Scope 1 as [D, F]
            return "circuit_tracer" if len(enc) == 2 and enc[1] == dec[0] and enc[0] != dec[0] else "gemma_scope"
    return None
