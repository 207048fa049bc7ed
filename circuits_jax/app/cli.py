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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="circuits-jax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  circuits-jax ioi                       # the IOI circuit study on SmolLM2 -> runs/ioi/report.html\n"
               "  circuits-jax predict --prompt 'The capital of France is'\n"
               "  circuits-jax patch --help              # each command's options and an example",
    )  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError, NotImplementedError, MemoryError) as e:
        print(f"circuits-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
