"""What the `circuits-jax` commands share: argument types and checks, the prompt-pair and mesh options.

Argument types (`count`, `positive`, `share`, `chunk`, `site_kind`) fail inside argparse, so a bad
value exits 2 with `argument --flag: ...`; the checks (`layer_list`, `check_site_name`, `mesh_of`)
raise ValueError, which `main` prints as one `circuits-jax: error: ...` line. Everything here runs
before any model loads. Site names and kinds come from core's site table (`circuits_jax.core`).
"""

from __future__ import annotations

import argparse
import sys

from ..core import PATCH_SITES

EDGE_METHODS = ("eap", "eap-ig", "eap-ig-activations")


def count(low: int = 1):
    """argparse `type`: an integer >= `low`; a bad value exits 2 with `argument --flag: ...`."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"need an integer >= {low}, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"need an integer >= {low}, got {v}")
        return v

    return parse


def chunk(text: str):
    """argparse `type` of --chunk-size: an integer >= 1 or 'plan'."""
    return "plan" if text == "plan" else count(1)(text)


def positive(text: str) -> float:
    """argparse `type`: a number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"need a number > 0, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"need a number > 0, got {text}")
    return v


def share(text: str) -> float:
    """argparse `type`: a share in (0, 1]."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"need a number in (0, 1], got {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"need a number in (0, 1], got {text}")
    return v


def site_kind(text: str) -> str:
    """argparse `type`: a per-layer site kind such as hook_resid_pre (checked against every architecture's kinds)."""
    import difflib

    from ..core import LAYER_KINDS as kinds

    if text not in kinds:
        close = difflib.get_close_matches(text, kinds, n=3, cutoff=0.5)
        raise argparse.ArgumentTypeError(f"unknown site kind {text!r}" + (f"; closest: {', '.join(close)}" if close else
                                         f"; valid kinds: {', '.join(kinds)}"))  # fmt: skip
    return text


def layer_list(text: str, flag: str = "--clt-layers") -> list[int]:
    """'0-3' or '0,1,2,3' -> [0, 1, 2, 3]; errors name `flag`."""
    try:
        if "-" in text:
            a, b = text.split("-")
            layers = list(range(int(a), int(b) + 1))
        else:
            layers = [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} takes a range '0-3' or a list '0,1,2,3', got {text!r}") from None
    if not layers:
        raise ValueError(f"{flag} {text!r} names no layer (a range is low-high, e.g. 0-3)")
    return layers


def _table_configs(n_layers: int):
    """Configs that between them have every kind of core's site table (rotary and learned positions)."""
    from ..core import Config

    base = dict(d_model=2, n_layers=n_layers, n_heads=1, d_head=2, d_vocab=2, d_mlp=2, normalization="rmsnorm")
    return Config(**base, act="silu", gated_mlp=True, positional="rotary"), Config(**base, positional="learned")


def check_site_name(name: str, flag: str) -> None:
    """Refuse a site name that no architecture has (before any model loads), naming the closest valid ones.

    The name is read by core's `parse_site` against configs that hold every kind of the site table and
    as many layers as the name's largest number asks for; the layer is checked against the model once it
    has loaded (so is a name past 512 layers, which would make the closest-name search slow here)."""
    import re

    from ..core import parse_site

    n_layers = 1 + max((int(d) for d in re.findall(r"\d+", name)), default=0)
    if n_layers > 512:
        return
    errors = []
    for cfg in _table_configs(n_layers):
        try:
            parse_site(name, cfg)
            return
        except KeyError as e:
            errors.append(e.args[0])
    raise ValueError(f"{flag}: {errors[0]}")


def make_parents(*paths) -> None:
    """Create the folders that output files will be written into (`--out runs/x.npz` on a fresh checkout)."""
    from pathlib import Path

    for p in paths:
        if p:
            Path(p).parent.mkdir(parents=True, exist_ok=True)


def pair_arguments(pa) -> None:
    """A model, a clean/corrupt prompt pair and the answers of the logit-difference metric."""
    pa.add_argument("--model", default="smollm2")
    pa.add_argument("--clean", required=True, help="clean prompt")
    pa.add_argument("--corrupt", required=True, help="corrupt prompt (same token length)")
    pa.add_argument("--answer", required=True, help="the clean answer (one token, e.g. ' Mary')")
    pa.add_argument("--wrong", required=True, help="the corrupt answer (one token)")
    pa.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None)
    pa.add_argument("--noising", action="store_true", help="patch corrupt into clean instead")
    pa.add_argument("--out", required=True, help="output .npz")
    pa.add_argument("--png", default=None, help="also draw a labelled heatmap")


def sweep_arguments(pa) -> None:
    """Arguments shared by `patch` and `attribute`: the pair, a mesh, the site and the swept axes."""
    pair_arguments(pa)
    mesh_argument(pa)
    pa.add_argument("--site", default="resid_pre", choices=list(PATCH_SITES))
    pa.add_argument("--by", default="layer,pos", help="comma list of axes, 'layer' first, e.g. layer,pos,head")


def prepare_pair(args):
    """Model, tokenizer, token arrays and the logit-difference metric of a clean/corrupt pair (or an exit code)."""
    import numpy as np

    from ..core import LogitDiff
    from ..models import load

    model, tok = load(args.model)
    if tok is None:
        print(f"model {args.model!r} has no tokenizer (no tokenizer.json beside it)", file=sys.stderr)
        return 2
    clean, corrupt = tok.to_tokens(args.clean, args.bos), tok.to_tokens(args.corrupt, args.bos)
    if clean.shape != corrupt.shape:
        print(
            f"circuits-jax: error: clean prompt has {clean.shape[1]} tokens {tok.to_str_tokens(clean)} and corrupt has "
            f"{corrupt.shape[1]} {tok.to_str_tokens(corrupt)}; patching needs prompts of equal token length",
            file=sys.stderr,
        )
        return 2
    metric = LogitDiff(np.array([tok.to_single_token(args.answer)]), np.array([tok.to_single_token(args.wrong)]))
    return model, tok, clean, corrupt, metric


def mesh_argument(p) -> None:
    """The `--mesh SPEC` option (read by `mesh_of`)."""
    p.add_argument("--mesh", default=None, metavar="SPEC",
                   help="run on a device mesh: 'sweep=4,data=2,model=1' (sizes of the axes; unnamed ones are 1), or a "
                        "number N for N devices on the sweep axis; default: one device")  # fmt: skip


def mesh_of(args):
    """The `--mesh` argument as a `make_mesh` mesh (None without it)."""
    spec = getattr(args, "mesh", None)
    if not spec:
        return None
    from ..scale import AXES, make_mesh

    if spec.strip().isdigit():
        return make_mesh(int(spec), 1, 1)
    sizes = {}
    for part in spec.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in AXES or not value.strip().isdigit():
            raise ValueError(f"--mesh {spec!r}: give axis=size pairs with axes {', '.join(AXES)}, e.g. sweep=4,data=2")
        sizes[name] = int(value)
    return make_mesh(sizes.get("sweep", 1), sizes.get("data", 1), sizes.get("model", 1))
