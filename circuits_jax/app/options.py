"""What the `circuits-jax` commands share: argument types and checks, outputs, the prompt-pair and mesh options.

Argument types (`count`, `positive`, `finite`, `share`, `chunk`, `site_kind`) fail inside argparse, so
a bad value exits 2 with `circuits-jax: error: argument --flag: ...`; the checks (`layer_list`,
`number_list`, `nonempty`, `check_site_name`, `mesh_of`, `out_file`, `out_dir`) raise ValueError, which
`main` prints as one `circuits-jax: error: ...` line. Everything here runs before any model loads:
a command checks its `--out` (`out_file` / `out_dir`: a file or a folder as it expects, writable, its
parent creatable) after its other arguments and before its model, and writes every file whole through
`circuits_jax.models.atomic_path` (`write_text`, `write_npz`), so a refused or interrupted run leaves
nothing behind. Numbers are finite: `nan` and `inf` are refused wherever a number is read. Site names
and kinds come from core's site table (`circuits_jax.core`).
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from ..core import PATCH_SITES

EDGE_METHODS = ("eap", "eap-ig", "eap-ig-activations")

MODEL_HELP = "'smollm2' (default), 'gemma3-270m', a .gguf path, or an HF-format directory"  # every command's --model
DTYPE_HELP = ("weights and activations in this dtype (default: as stored; float32 for GGUF); norms, attention softmax, "
              "logits and metrics stay float32")  # fmt: skip


def model_arguments(pa, *, default: str | None = "smollm2", help: str = MODEL_HELP) -> None:
    """`--model` and `--dtype`, the options of every command that loads a model."""
    from ..core import DTYPES

    pa.add_argument("--model", default=default, help=help)
    pa.add_argument("--dtype", default=None, choices=DTYPES, help=DTYPE_HELP)


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
    """argparse `type`: a finite number > 0 (nan and inf refused)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"need a number > 0, got {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"need a finite number > 0, got {text}")
    return v


def finite(text: str) -> float:
    """argparse `type`: any finite number (nan and inf refused)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"need a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"need a finite number, got {text}")
    return v


def listof(parse):
    """argparse `type`: comma-separated values, each read by `parse` (`count(1)`, `finite`, `str`), as a tuple:
    `--k 16,32,64` is three values, `--k 32` one."""

    def read(text: str) -> tuple:
        parts = [p.strip() for p in text.split(",")]
        if not all(parts):
            raise argparse.ArgumentTypeError(f"need comma-separated values, got {text!r}")
        return tuple(parse(p) for p in parts)

    return read


def number_list(text: str, flag: str) -> list[float]:
    """'-5,0,5' -> [-5.0, 0.0, 5.0]: comma-separated finite numbers; errors name `flag`."""
    try:
        values = [float(c) for c in text.split(",") if c.strip()]
    except ValueError:
        values = []
    if not values:
        raise ValueError(f"{flag} needs comma-separated numbers, got {text!r}")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{flag} {text!r}: {bad[0]} is not a finite number; give finite numbers")
    return values


def nonempty(**texts: str) -> None:
    """Refuse an empty text option: `nonempty(prompt=args.prompt)` names `--prompt`."""
    for name, text in texts.items():
        if text is not None and not text.strip():
            raise ValueError(f"--{name.replace('_', '-')} is empty ({text!r}); give some text")


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
    """Configs that between them have every kind of core's site table (rotary and learned positions; q/k norms
    and post-norms as in Gemma 3)."""
    from ..core import Config

    base = dict(d_model=2, n_layers=n_layers, n_heads=1, d_head=2, d_vocab=2, d_mlp=2, normalization="rmsnorm")
    rotary = dict(act="silu", gated_mlp=True, positional="rotary")
    return (Config(**base, **rotary), Config(**base, positional="learned"),
            Config(**base, **rotary, qk_norm=True, post_attn_norm=True, post_mlp_norm=True))  # fmt: skip


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


def _writable_place(p: Path, given, flag: str) -> None:
    """Refuse a path that cannot be created: its nearest existing ancestor must be a writable folder."""
    up = p.parent
    while not up.exists() and up != up.parent:
        up = up.parent
    if not up.is_dir():
        raise ValueError(f"{flag} {given}: cannot be created, {up} is a file, not a folder")
    if not os.access(up, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {given}: cannot write there, the folder {up} is not writable")


def out_file(path, flag: str = "--out", *, suffix: str | None = None, like: str = "result") -> Path:
    """The file a command writes for `flag`, checked before any model loads, and returned as it will be written.

    `suffix` (e.g. ".npz") is appended when the name lacks it, so the path printed is the path written.
    Refused: a folder (give a file name), a read-only file, a place that cannot be created (an ancestor
    is a file, or the nearest existing folder is not writable). An existing file is replaced, whole,
    once the run has finished. `like`: the file name the message suggests inside a folder given by mistake."""
    p = Path(path).expanduser()
    if p.is_dir():
        example = p / (like + (suffix or ""))
        raise ValueError(f"{flag} {path}: is a folder; give a file name, e.g. {example}")
    if suffix and p.suffix != suffix:
        p = p.with_name(p.name + suffix)
        if p.is_dir():
            raise ValueError(f"{flag} {path}: {p} (with {suffix} added) is a folder; give another file name")
    if p.exists():
        if not os.access(p, os.W_OK):
            raise ValueError(f"{flag} {path}: {p} exists and is read-only")
        if not os.access(p.parent, os.W_OK | os.X_OK):
            raise ValueError(f"{flag} {path}: cannot write there, the folder {p.parent} is not writable")
        return p
    _writable_place(p, path, flag)
    return p


def out_dir(path, flag: str = "--out") -> Path:
    """The folder a command writes its files into for `flag`, checked before any model loads.

    Refused: an existing file, a folder that is not writable, a place that cannot be created. Nothing is
    created here: the folder is made when the first file is written."""
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ValueError(f"{flag} {path}: is an existing file; this command writes a folder of files, give a "
                             "folder name")  # fmt: skip
        if not os.access(p, os.W_OK | os.X_OK):
            raise ValueError(f"{flag} {path}: the folder is not writable")
        return p
    _writable_place(p, path, flag)
    return p


def place(path) -> Path:
    """`path` (a file about to be written) with its folder created; checked writable before the run."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def make_parents(*paths) -> None:
    """Create the folders that output files will be written into (`--out runs/x.npz` on a fresh checkout)."""
    from pathlib import Path

    for p in paths:
        if p:
            Path(p).parent.mkdir(parents=True, exist_ok=True)


def pair_arguments(pa) -> None:
    """A model, a clean/corrupt prompt pair and the answers of the logit-difference metric."""
    model_arguments(pa)
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


def load_with_tokenizer(name, dtype=None):
    """`models.load(name, dtype=dtype)`, refusing a model without a tokenizer (every command that reads text needs one)."""
    from ..models import load

    model, tok = load(name, dtype=dtype)
    if tok is None:
        raise ValueError(f"model {str(name)!r} has no tokenizer (no tokenizer.json beside it)")
    return model, tok


def check_pair_outputs(args) -> None:
    """`--out` (an .npz, the suffix added when missing) and `--png` of the prompt-pair commands, and the prompts
    themselves, before any model loads; `args.out` becomes the path that will be written."""
    args.out = str(out_file(args.out, suffix=".npz"))
    if args.png:
        out_file(args.png, "--png")
        if Path(args.png).expanduser().resolve() == Path(args.out).resolve():
            raise ValueError(f"--png {args.png} is the --out file; give them different names")
    nonempty(clean=args.clean, corrupt=args.corrupt, answer=args.answer, wrong=args.wrong)


def prepare_pair(args):
    """Model, tokenizer, token arrays and the logit-difference metric of a clean/corrupt pair."""
    import numpy as np

    from ..core import LogitDiff

    model, tok = load_with_tokenizer(args.model, args.dtype)
    clean, corrupt = tok.to_tokens(args.clean, args.bos), tok.to_tokens(args.corrupt, args.bos)
    for flag, t in (("--clean", clean), ("--corrupt", corrupt)):
        if t.shape[1] == 0:
            raise ValueError(f"{flag} tokenizes to nothing; give some text or --bos")
    if clean.shape != corrupt.shape:
        raise ValueError(f"clean prompt has {clean.shape[1]} tokens {tok.to_str_tokens(clean)} and corrupt has "
                         f"{corrupt.shape[1]} {tok.to_str_tokens(corrupt)}; patching needs prompts of equal token length")  # fmt: skip
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

    sizes = {}
    if spec.strip().isdigit():
        sizes["sweep"] = int(spec)
    else:
        for part in spec.split(","):
            name, _, value = part.partition("=")
            name = name.strip()
            if name not in AXES or not value.strip().isdigit():
                raise ValueError(f"--mesh {spec!r}: give axis=size pairs with axes {', '.join(AXES)}, e.g. sweep=4,data=2")
            sizes[name] = int(value)
    for name, size in sizes.items():
        if size < 1:
            raise ValueError(f"--mesh {spec!r}: the {name} axis needs at least 1 device, got {size}")
    try:
        return make_mesh(sizes.get("sweep", 1), sizes.get("data", 1), sizes.get("model", 1))
    except ValueError as e:  # more devices asked for than there are
        raise ValueError(f"--mesh {spec!r}: {e}") from None
