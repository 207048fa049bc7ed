"""IOI on SmolLM2, the main job's study as an experiment (`circuits-jax experiment ioi`).

    .venv/bin/python experiments/ioi_report.py [--n 16] [--seed 0] [--out runs/ioi]

The same as `circuits-jax ioi`: baselines, residual and head patching, AtP beside the exact
sweep, path patching into the logits, EAP-IG circuit and its faithfulness, attention patterns;
writes OUT/report.html.
"""

import sys

from circuits_jax.app import cli


def main(argv=None) -> int:
    return cli.main(["ioi", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
