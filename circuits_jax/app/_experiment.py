"""`circuits-jax experiment NAME [args...]`: run one of the experiments (experiments/*.py); each writes a report."""

from __future__ import annotations

import argparse
import sys

# name -> (script in experiments/, what it asks); each script's `main(argv)` writes OUT/report.html
EXPERIMENTS = {
    "ioi": ("ioi_report.py", "IOI on SmolLM2: the main job's study (same as `circuits-jax ioi`)"),
    "induction": ("induction.py", "induction heads in the trained 2-layer attention-only model"),
    "greater-than": ("greater_than.py", "greater-than: which components make SmolLM2 complete a year with a later one"),
    "factual-recall": ("causal_tracing.py", "factual recall: causal tracing of 'The Eiffel Tower is located in the city of'"),
    "steering": ("steering.py", "steering: ActAdd, CAA and SAE-feature steering of sentiment"),
    "attribution-graph": ("attribution_graphs.py", "the attribution graph of a capital-city prompt (needs trained transcoders)"),
    "custom-intervention": ("custom_intervention.py", "a user-defined intervention swept over every head with vmap, against a loop"),
}


def add_experiment(sub) -> None:
    ex = sub.add_parser(
        "experiment", help="run one of the experiments (experiments/*.py); each writes a report",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="experiments:\n" + "\n".join(f"  {k:18s} {v[1]}" for k, v in EXPERIMENTS.items())
        + "\n\nexample:\n  circuits-jax experiment induction --out runs/induction\n"
          "  circuits-jax experiment greater-than -- --help     # the experiment's own options",
    )  # fmt: skip
    ex.add_argument("name", choices=list(EXPERIMENTS), help="which experiment")
    ex.add_argument("rest", nargs=argparse.REMAINDER, help="options passed to the experiment (see its --help)")
    ex.set_defaults(func=run_experiment)


def experiments_dir():
    """experiments/ of the source checkout this package runs from."""
    from pathlib import Path

    return Path(__file__).resolve().parents[2] / "experiments"


def run_experiment(args) -> int:
    """`experiment NAME [args...]`: run experiments/<script>.py's `main(args)`."""
    import importlib.util

    script, _ = EXPERIMENTS[args.name]
    path = experiments_dir() / script
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: experiments live in a source checkout of circuits_jax "
                                "(git clone the repository and install it with scripts/setup.sh)")  # fmt: skip
    spec = importlib.util.spec_from_file_location(f"circuits_jax_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and eqx.Modules look their module up while the script runs
    spec.loader.exec_module(module)
    rc = module.main(list(args.rest))
    return 0 if rc is None else int(rc)
