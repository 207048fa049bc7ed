"""The `circuits-jax` command line."""

from __future__ import annotations

import argparse
import sys

# one module per command: `add_X(sub)` adds its subparser, whose `func` runs it; shared options in options.py
from ._attribute import add_attribute
from ._das import add_das
from ._discover import add_discover
from ._experiment import EXPERIMENTS, add_experiment
from ._features import add_features
from ._graph import add_graph
from ._ioi import add_ioi
from ._patch import add_patch
from ._path_patch import add_path_patch
from ._predict import add_predict
from ._scrub import add_scrub
from ._steer import add_steer
from ._trace_fact import add_trace_fact
from ._train_sae import add_train_sae

__all__ = ["EXPERIMENTS", "build_parser", "main"]

# in the order `circuits-jax --help` lists them
COMMANDS = (add_ioi, add_experiment, add_predict, add_patch, add_attribute, add_discover, add_train_sae, add_features,
            add_graph, add_steer, add_trace_fact, add_scrub, add_das, add_path_patch)  # fmt: skip


class Parser(argparse.ArgumentParser):
    """argparse, with a bad argument reported as one line (`circuits-jax: error: ...`, exit 2) instead of the
    usage block and a line: the line names the flag, and `--help` shows the usage. Subparsers are of this
    class too (argparse makes them of their parent's class)."""

    def error(self, message: str):
        self.exit(2, f"circuits-jax: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="circuits-jax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  circuits-jax ioi                       # the IOI circuit study on SmolLM2 -> runs/ioi/report.html\n"
               "  circuits-jax predict --prompt 'The capital of France is'\n"
               "  circuits-jax patch --help              # each command's options and an example",
    )  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return p


# What `main` reports as one `circuits-jax: error: ...` line (exit 2) rather than a traceback, and why:
# - ValueError: the refusals of bad input, by the commands' checks and by the library's checks at its
#   boundary (models, tokens, layers, metrics; damaged model files, non-finite weights: NonFiniteWeights);
# - KeyError, TypeError: the same boundary checks raise these for an unknown name (a site, an edge:
#   with the closest valid ones) or a value of the wrong kind, but so does a bug; only one raised on
#   purpose (by a `raise` statement in circuits_jax) is reported, any other keeps its traceback;
# - NotImplementedError: a model or option the library does not support (a GGUF architecture, a
#   penzai feature), named;
# - MemoryError: the memory planner's `DoesNotFit`, raised before any compute;
# - OSError: files and folders (a missing model, an --out that cannot be written, a full disk).
# Anything else (RuntimeError, IndexError, AttributeError, an XLA error, ...) is not anticipated: it is
# a bug to report, and its traceback is kept for that.
REPORTED = (ValueError, KeyError, TypeError, NotImplementedError, MemoryError, OSError)


def _raised_on_purpose(e: BaseException) -> bool:
    """Whether `e` was raised by a `raise` statement of circuits_jax itself (not deep inside jax or numpy)."""
    import linecache
    from pathlib import Path

    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    file = Path(tb.tb_frame.f_code.co_filename).resolve()
    package = Path(__file__).resolve().parents[1]
    return package in file.parents and linecache.getline(str(file), tb.tb_lineno).lstrip().startswith("raise")


def error_line(e: BaseException) -> str:
    """The one line `main` prints for `e`: its message with line breaks folded (a KeyError's without quotes)."""
    msg = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
    msg = " ".join(msg.split()) or type(e).__name__
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and type(e).__name__ not in msg:
        msg = f"{type(e).__name__}: {msg}"  # e.g. "PermissionError: [Errno 13] Permission denied: 'x'"
    return f"circuits-jax: error: {msg}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except REPORTED as e:
        if isinstance(e, (KeyError, TypeError)) and not _raised_on_purpose(e):
            raise  # a bug, not a refusal: keep the traceback
        print(error_line(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: every file is written whole (temporary name, then renamed), so nothing is half-written
        print("\ncircuits-jax: interrupted; files already written are complete, nothing was left half-written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
