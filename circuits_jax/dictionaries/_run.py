"""Run folders: a training run's directory knows what it is, who is using it, and what it holds.

    out/run.json    the record, written before the first output: `kind` ("train_dictionary" or
                    "train_transcoders"), `settings` (everything that changes the result: the model's
                    config and a fingerprint of its weights, the tokenizer's and the corpus's sha256,
                    sites, architecture, k, width, tokens, epochs, context length, held-out contexts,
                    seed and the whole train config but `checkpoint_every`) and `labels` (names for
                    people: the model and corpus as given, an outside store's path; never compared)
    out/run.lock    `{"pid", "host", "started", "command"}` of the process using the folder, created
                    atomically (a complete file linked into place), removed when the run ends

A run with other settings in a folder that holds outputs is refused (`RunMismatch`, naming each
differing key with both values) before anything is computed or written; `overwrite=True` deletes the
old run's outputs (only the files a run writes, never anything else in the folder) and starts
afresh; `resume=True` insists on continuing (the settings must match, or the folder holds outputs of
a run that recorded no settings, which it then adopts). With neither, a matching run is resumed,
and the resume is announced with what was found (`describe_run`). A second process on a locked
folder is refused (`RunLocked`, naming the owner's pid and host); a lock whose process is gone (same
host, pid not running, or running but started later) is removed, with a line saying so.

`deferred_interrupt` holds Ctrl-C back while a checkpoint is written; `save_array` writes a `.npy`
whole. The record's identities come from `model_identity`, `tokenizer_identity`, `corpus_identity`.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import equinox as eqx
import jax
import numpy as np

from ..models import atomic_path, write_text

RUN_FILE = "run.json"
LOCK_FILE = "run.lock"
RECORD_FORMAT = 1


class RunFolderError(ValueError):
    """A run folder cannot be used as asked (another run's files, or another process using it)."""


class RunMismatch(RunFolderError):
    """The folder holds another run: `diffs` lists `(key, recorded value, value now)`; `unrecorded`
    names the outputs of a run that recorded no settings (then `diffs` is empty)."""

    def __init__(self, path: Path, diffs=(), *, labels=(), unrecorded=(), resuming: bool = False):
        self.path, self.diffs, self.labels, self.unrecorded, self.resuming = Path(path), list(diffs), list(labels), list(unrecorded), resuming
        super().__init__(self.describe())

    def describe(self, names: dict[str, str] | None = None, *, resume: str = "resume=True", overwrite: str = "overwrite=True") -> str:
        """The message; `names` renames settings keys (the command line passes its flags)."""
        names = names or {}
        if self.unrecorded:
            return (f"{self.path} holds files of a run that recorded no settings ({', '.join(self.unrecorded)}); nothing was "
                    f"changed: {resume} continues it as this run, {overwrite} deletes them and starts afresh")  # fmt: skip
        shown = [f"{names.get(k, k)} was {_show(a)}, now {_show(b)}" for k, a, b in self.diffs[:6]]
        if len(self.diffs) > 6:
            shown.append(f"and {len(self.diffs) - 6} more (see {self.path / RUN_FILE})")
        shown += [f"{names.get(k, k)} was {_show(a)}, now {_show(b)}" for k, a, b in self.labels]
        shown = list(dict.fromkeys(shown))  # one mention each (two keys may share a name)
        head = f"cannot resume the run in {self.path}: its settings differ" if self.resuming else f"{self.path} holds another run"
        return f"{head}: {'; '.join(shown)}. Nothing was changed: {overwrite} deletes it and starts afresh, or use another directory"


class RunLocked(RunFolderError):
    """Another live process holds the folder's lock; `owner` is its lock record (pid, host, started, command)."""

    def __init__(self, path: Path, owner: dict):
        self.path, self.owner = Path(path), owner
        if not owner:
            super().__init__(f"{path} is in use by another run whose lock file {path / LOCK_FILE} is being written or unreadable; "
                             "if no run uses the folder, delete that file")  # fmt: skip
            return
        pid, host = owner.get("pid"), owner.get("host")
        who = "this process" if pid == os.getpid() and host == socket.gethostname() else f"pid {pid}"
        super().__init__(f"{path} is in use by another run: {who} on {host}, since {owner.get('started')} ({path / LOCK_FILE}); "
                         "wait for it to end, or use another directory")  # fmt: skip


def _show(v) -> str:
    if isinstance(v, str) and len(v) >= 16 and all(c in "0123456789abcdef" for c in v):
        return v[:12] + "…"  # a digest
    return "(absent)" if v is _ABSENT else json.dumps(v)


_ABSENT = object()


# ---------------------------------------------------------------- identities


def model_identity(model, *, sample: int = 4096) -> str:
    """A hex digest of a model's (any pytree's) arrays: each array's path, shape, dtype and up to `sample`
    evenly spaced elements (all of a small array). The same weights give the same digest on any
    device; other weights (another checkpoint, another seed) differ. Only the samples leave the device."""
    h = hashlib.sha256()
    for path, a in jax.tree_util.tree_flatten_with_path(eqx.filter(model, eqx.is_array))[0]:
        h.update(f"{jax.tree_util.keystr(path)}:{tuple(a.shape)}:{np.dtype(a.dtype).name};".encode())
        if a.size > sample:
            a = a.reshape(-1)[:: a.size // sample]
        h.update(np.ascontiguousarray(jax.device_get(a)).tobytes())
    return h.hexdigest()[:16]


def tokenizer_identity(tok) -> str:
    """sha256 of the tokenizer's definition (its `tokenizers` JSON) and special tokens."""
    inner = getattr(tok, "tok", None)
    text = inner.to_str() if hasattr(inner, "to_str") else repr(tok)
    specials = [getattr(tok, a, None) for a in ("bos_token_id", "eos_token_id")]
    return hashlib.sha256(f"{text}\0{specials}".encode()).hexdigest()


def corpus_identity(docs: Sequence[str]) -> str:
    """sha256 of a corpus's documents, in order."""
    h = hashlib.sha256()
    for d in docs:
        b = d.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()


# ---------------------------------------------------------------- writing whole, Ctrl-C held back


def save_array(path: str | os.PathLike, array) -> Path:
    """`np.save` to exactly `path`, written whole (temporary name, then rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "xb") as f:
            np.save(f, np.asarray(array))
    return Path(path)


def write_json(path: str | os.PathLike, obj, **kw) -> Path:
    """JSON to `path`, written whole."""
    return write_text(path, json.dumps(obj, **kw))


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) back until the block ends, then raise `KeyboardInterrupt`, so writes that
    belong together (a checkpoint and its `done` marker) complete. A second Ctrl-C raises at once.
    Outside the main thread, or where someone else handles SIGINT, the block runs as it is."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    got = []

    def held(signum, frame):
        if got:
            raise KeyboardInterrupt
        got.append(signum)

    signal.signal(signal.SIGINT, held)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if got:
        raise KeyboardInterrupt


def checkpoint_steps(root: str | os.PathLike) -> list[int]:
    """The steps of the complete checkpoints under `root` (those whose `done` marker was written)."""
    return sorted(int(p.name.split("_")[1]) for p in Path(root).glob("step_*") if (p / "done").exists())


# ---------------------------------------------------------------- the lock


def _process_start(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, Linux), to tell a reused pid from the owner."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(owner: dict) -> bool:
    """Whether the lock's owner may still run: another host's process is assumed alive."""
    if owner.get("host") != socket.gethostname():
        return True
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    start = owner.get("process_start")
    now = _process_start(pid)
    return start is None or now is None or start == now


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _read_lock(lock: Path) -> dict | None:
    try:
        owner = json.loads(lock.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


class RunLock:
    """The lock of a run folder, held from construction to `release()` (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, *, log: Callable[[str], Any] = print):
        self.path = Path(path)
        self.file = self.path / LOCK_FILE
        self.token = uuid.uuid4().hex
        self.path.mkdir(parents=True, exist_ok=True)
        me = dict(pid=os.getpid(), host=socket.gethostname(), started=_now(), command=" ".join(sys.argv),
                  process_start=_process_start(os.getpid()), token=self.token)  # fmt: skip
        tmp = self.path / f".{LOCK_FILE}.{os.getpid()}.{self.token[:8]}"
        tmp.write_text(json.dumps(me))
        try:
            for _ in range(5):
                try:
                    os.link(tmp, self.file)  # atomic, and the lock appears with its contents
                    return
                except FileExistsError:
                    pass
                except OSError:  # no hard links here: exclusive creation instead
                    try:
                        fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                    except FileExistsError:
                        pass
                    else:
                        with os.fdopen(fd, "w") as f:
                            f.write(json.dumps(me))
                        return
                owner = _read_lock(self.file)
                if owner is None:  # released meanwhile
                    continue
                if owner or _age(self.file) < 10:  # an unreadable lock may still be being written (no hard links)
                    if _alive(owner):
                        raise RunLocked(self.path, owner)
                self._clear_stale(owner, log)
            raise RunLocked(self.path, _read_lock(self.file) or {})
        finally:
            tmp.unlink(missing_ok=True)

    def _clear_stale(self, owner: dict, log) -> None:
        grabbed = self.path / f".{LOCK_FILE}.stale.{self.token[:8]}"
        try:
            os.replace(self.file, grabbed)  # one process wins the rename
        except FileNotFoundError:
            return
        if _read_lock(grabbed) != owner:  # a live lock taken meanwhile: put it back
            with contextlib.suppress(OSError):
                os.link(grabbed, self.file)
            grabbed.unlink(missing_ok=True)
            return
        grabbed.unlink(missing_ok=True)
        who = f"pid {owner.get('pid')} on {owner.get('host')}" if owner else "an unreadable lock file"
        log(f"removed a stale lock of {self.path}: {who} is no longer running")

    def release(self) -> None:
        """Remove the lock if it is still this one's."""
        owner = _read_lock(self.file)
        if owner is not None and owner.get("token") == self.token:
            self.file.unlink(missing_ok=True)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- the record


def plain(obj) -> Any:
    """`obj` as JSON would give it back (tuples as lists, other objects as strings)."""
    return json.loads(json.dumps(obj, default=str))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def settings_diff(then: dict, now: dict) -> list[tuple[str, Any, Any]]:
    """`(key, then, now)` for each setting (nested keys dotted, as `train.lr`) that differs."""
    a, b = _flat(plain(then)), _flat(plain(now))
    return [(k, a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in list(a) + [k for k in b if k not in a] if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


def read_record(path: str | os.PathLike) -> dict | None:
    """The folder's `run.json`, or None."""
    f = Path(path) / RUN_FILE
    if not f.exists():
        return None
    try:
        rec = json.loads(f.read_text())
    except ValueError as e:
        raise RunFolderError(f"{f} is not a run record ({e}); delete it, or use another directory") from None
    if not isinstance(rec, dict) or "settings" not in rec:
        raise RunFolderError(f"{f} is not a run record (no settings); delete it, or use another directory")
    return rec


def _present(path: Path, outputs: Sequence[str]) -> list[str]:
    """The names of `outputs` (names, or glob patterns) that exist in `path`, in `outputs`' order."""
    found = []
    for pattern in outputs:
        if any(c in pattern for c in "*?["):
            found += sorted(p.name for p in path.glob(pattern))
        elif (path / pattern).exists() or (path / pattern).is_symlink():
            found.append(pattern)
    return found


class RunFolder:
    """A run folder opened by `open_run`: checked, locked; `commit()` records the run before its first output."""

    def __init__(self, path: Path, kind: str, settings: dict, labels: dict, outputs: Sequence[str], *, resume: bool,
                 overwrite: bool, log: Callable[[str], Any]):  # fmt: skip
        self.path, self.kind, self.settings, self.labels, self.outputs, self.log = path, kind, settings, labels, tuple(outputs), log
        self.overwrite = overwrite
        record = read_record(path)
        self.present = _present(path, self.outputs)
        computed = [p for p in self.present if p != RUN_FILE]
        self.created = _now() if record is None or overwrite else record.get("created", _now())
        if record is None:
            if computed and not (resume or overwrite):
                raise RunMismatch(path, unrecorded=computed)
            if resume and not computed:
                raise FileNotFoundError(f"nothing to resume in {path}: it holds no run")
            self.state = "overwrite" if overwrite and computed else ("resume" if computed else "new")
            return
        diffs = settings_diff(dict(kind=record.get("kind")), dict(kind=kind)) + settings_diff(record["settings"], settings)
        if diffs and not overwrite and (computed or resume):
            labels = [d for d in settings_diff(record.get("labels", {}), labels) if d[1] is not _ABSENT and d[2] is not _ABSENT]
            raise RunMismatch(path, diffs, labels=labels, resuming=resume)
        # other settings on a record whose run never wrote anything: it protects nothing, this run replaces it
        self.state = "overwrite" if overwrite else ("new" if diffs else "resume")

    def commit(self, status: Callable[[], str] | None = None) -> None:
        """Record the run (`run.json`) before its first output is written: under `overwrite`, delete the
        previous run's outputs first; announce what happens (a new run, or where a run resumes)."""
        if self.state == "overwrite":
            (self.path / RUN_FILE).unlink(missing_ok=True)  # first: the folder no longer claims the old run
            for name in _present(self.path, self.outputs):
                p = self.path / name
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            self.log(f"overwrite: deleted the previous run in {self.path} ({', '.join(self.present)}); starting afresh "
                     f"(settings in {self.path / RUN_FILE})")  # fmt: skip
        write_json(self.path / RUN_FILE, dict(format=RECORD_FORMAT, kind=self.kind, settings=self.settings, labels=self.labels,
                                              created=self.created, updated=_now()), indent=1)  # fmt: skip
        if self.state == "resume":
            self.log(f"resuming the run in {self.path}: {status() if status else describe_run(self.path)}")
        elif self.state == "new":
            self.log(f"new run in {self.path} (settings in {self.path / RUN_FILE})")


@contextlib.contextmanager
def open_run(
    path: str | os.PathLike,
    kind: str,
    settings: dict,
    *,
    labels: dict | None = None,
    outputs: Sequence[str] = (),
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], Any] = print,
) -> Iterator[RunFolder]:
    """Lock the run folder `path` and check it can hold this run (see the module docstring), then
    yield a `RunFolder`; call its `commit()` just before the first output is written. `outputs`:
    the names (or glob patterns) the run writes, all `overwrite` may delete. The lock is released
    when the block ends, however it ends; a folder this call created is removed if left empty.
    With several JAX processes, process 0 alone locks, checks and records."""
    if resume and overwrite:
        raise ValueError("resume (continue the run) and overwrite (delete it and start afresh) exclude each other")
    path = Path(path)
    existed = path.exists()
    if existed and not path.is_dir():
        raise RunFolderError(f"{path} is a file, not a run folder")
    lead = jax.process_index() == 0
    lock = RunLock(path, log=log) if lead else None
    try:
        yield RunFolder(path, kind, plain(settings), plain(labels or {}), (RUN_FILE, *outputs), resume=resume, overwrite=overwrite,
                        log=log) if lead else _Follower()  # fmt: skip
    finally:
        if lock is not None:
            lock.release()
        if not existed:
            with contextlib.suppress(OSError):
                path.rmdir()  # only when empty


class _Follower:
    def commit(self, status=None) -> None:
        pass


# ---------------------------------------------------------------- what a folder holds


def _store_status(store: Path, n_tokens: int) -> str:
    try:
        meta = json.loads((store / "store.json").read_text())
    except (OSError, ValueError):
        return "no activations stored yet"
    want = max(1, n_tokens // meta["chunk_tokens"])
    have = meta["n_chunks"]
    return f"the activation store complete ({want} chunks)" if have >= want else f"activation store {have} of {want} chunks"


def _steps(train: dict) -> int:
    return max(1, int(train["n_tokens"]) // int(train["batch_size"]))


def _train_status(root: Path, total: int) -> str:
    steps = checkpoint_steps(root)
    if not steps:
        return "no checkpoint yet"
    if steps[-1] >= total:
        return f"training finished (step {total} of {total})"
    return f"checkpoint at step {steps[-1]} of {total}"


def describe_run(path: str | os.PathLike) -> str:
    """What the run folder `path` holds, in words: stored chunks, the last checkpoint, finished parts."""
    path = Path(path)
    rec = read_record(path)
    if rec is None:
        return "nothing of this run yet"
    s = rec["settings"]
    if rec.get("kind") not in ("train_dictionary", "train_transcoders"):
        names = sorted(p.name for p in path.iterdir() if p.name not in (RUN_FILE, LOCK_FILE) and not p.name.startswith("."))
        return ", ".join(names) or "nothing yet"
    store = Path(rec.get("labels", {}).get("store") or path / "store")
    parts = [_store_status(store, int(s["n_tokens"]))]
    if rec.get("kind") == "train_transcoders":
        total = _steps(s["train"])
        done = [l for l in s["layers"] if (path / f"layer_{l:02d}" / "dictionary" / "dictionary.json").exists()]
        if done:
            parts.append(f"layers {', '.join(map(str, done))} trained")
        for l in s["layers"]:
            if l not in done and checkpoint_steps(path / f"layer_{l:02d}" / "checkpoints"):
                parts.append(f"layer {l}: {_train_status(path / f'layer_{l:02d}' / 'checkpoints', total)}")
        if len(done) == len(s["layers"]):
            parts.append("every layer done")
        return ", ".join(parts)
    total = _steps(s["train"])
    parts.append(_train_status(path / "checkpoints", total))
    if (path / "eval.json").exists() and (path / "dictionary" / "dictionary.json").exists():
        parts.append("evaluated (dictionary/ and eval.json written)")
    elif parts[-1].startswith("training finished"):
        parts.append("not evaluated yet")
    return ", ".join(parts)
