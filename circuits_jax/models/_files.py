"""Writing files whole: under a temporary name beside the target, then one rename.

`atomic_path(path)` yields a temporary path in the target's folder (so the rename is atomic on
POSIX) with the target's suffix (so a writer that reads the suffix, such as matplotlib's `savefig`,
writes the same format); when the block ends normally the file is renamed to `path`, and when it
raises (an error, Ctrl-C, a full disk) the temporary file is removed. An interruption leaves the old
file or the new one, never half a file. `write_text` and `write_npz` are the two writers built on
it that the command line, the reports and the circuit and graph writers share.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write `path` through: renamed to `path` when the block succeeds, removed if it raises."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` whole (temporary name, then rename); returns `path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_npz(path: str | os.PathLike, **arrays) -> Path:
    """`np.savez` to exactly `path` (no `.npz` appended), written whole; returns `path`."""
    import numpy as np

    with atomic_path(path) as tmp:
        with open(tmp, "xb") as f:
            np.savez(f, **arrays)
    return Path(path)
