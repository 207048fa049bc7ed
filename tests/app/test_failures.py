"""Every subcommand against each class of bad input: exit 2, one `circuits-jax: error:` line, nothing written.

The classes: a missing, truncated, garbled or non-finite model file (safetensors, config.json, tokenizer.json,
GGUF, our checkpoint); an `--out` that is an existing file (or, where a file is expected, a folder), that lies
under a file, or that lies in a read-only folder; a bad number (`nan`, `inf`, a zero mesh axis); an empty
prompt. Each case hashes the whole working folder (models and outputs) before and after: a refused run
writes and changes nothing. The `--out` and number cases run with every model loader replaced by a failure
(`no_model`), so they also prove the check comes before any model loads; the model cases load tiny files
and fail at once. As root, where chmod 555 does not stop writes, `os.access` is made to answer for the
read-only folder as for any other user (`read_only_for_root`). `experiment` passes its options to the scripts in experiments/ and is not covered here.
"""

import hashlib
import os
import shutil

import pytest

from circuits_jax.app.cli import main

from test_safety import cut, poison, tiny_hf, tiny_model, write_gguf

# the --out each command writes: a folder of files, or one file (named with its suffix)
DIR_OUT = ("discover", "train-sae", "graph", "steer", "trace-fact", "ioi")
FILE_OUT = {"patch": "r.npz", "attribute": "r.npz", "path-patch": "r.npz", "das": "r.json", "scrub": "r.json",
            "features": "f.html"}  # fmt: skip
WITH_MODEL = ("predict", "patch", "attribute", "path-patch", "discover", "train-sae", "features", "graph", "steer",
              "trace-fact", "das", "ioi")  # fmt: skip
# train-sae's command module (app/_train_sae.py, run folders and resume) is another engineer's: its --out is not
# checked before the model loads yet
OUT_PENDING: set[str] = set()  # commands whose --out is not yet checked before the model loads


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Models (good and damaged), a dictionary and a transcoder folder, a file and a read-only folder."""
    from circuits_jax.dictionaries import init_sae, save_dictionary
    import circuits_jax as cj
    import jax

    w = tmp_path_factory.mktemp("world")
    model = tiny_model()
    good = tiny_hf(w / "models" / "good", model)
    for name in ("half-safetensors", "garbled-header", "garbled-config", "nan-weights", "garbled-tokenizer"):
        shutil.copytree(good, w / "models" / name)
    cut(w / "models" / "half-safetensors" / "model.safetensors")
    data = bytearray((w / "models" / "garbled-header" / "model.safetensors").read_bytes())
    data[8:24] = b"#" * 16
    (w / "models" / "garbled-header" / "model.safetensors").write_bytes(bytes(data))
    cut(w / "models" / "garbled-config" / "config.json")
    poison(w / "models" / "nan-weights")
    cut(w / "models" / "garbled-tokenizer" / "tokenizer.json")
    write_gguf(w / "models" / "cut.gguf", model)
    cut(w / "models" / "cut.gguf", 0.6)
    cj.save_model(w / "models" / "checkpoint", model)
    cut(w / "models" / "checkpoint" / "config.json")
    sae = init_sae(model.cfg.d_model, 8, key=jax.random.key(0), k=2, in_site="blocks.1.hook_resid_post")
    save_dictionary(w / "dictionary", sae, {"model": str(good), "corpus": "pydoc-topics"})
    (w / "transcoders").mkdir()
    (w / "a-file").write_text("not a folder")
    (w / "outs").mkdir()
    (w / "read-only").mkdir()
    os.chmod(w / "read-only", 0o555)
    yield w
    os.chmod(w / "read-only", 0o755)


# model -> what the one line must say besides the file's name
MODELS = {
    "missing": ("missing-dir", "unknown model"),
    "half-safetensors": ("half-safetensors", "is not a readable safetensors file"),
    "garbled-header": ("garbled-header", "is not a readable safetensors file"),
    "garbled-config": ("garbled-config", "config.json is not valid JSON"),
    "nan-weights": ("nan-weights", "weight model.layers.1.mlp.up_proj.weight holds 1 NaN"),
    "garbled-tokenizer": ("garbled-tokenizer", "tokenizer.json is not a readable tokenizer"),
    "cut-gguf": ("cut.gguf", "GGUF"),
    "garbled-checkpoint": ("checkpoint", "config.json is not valid JSON"),
}


def argv(cmd: str, model: str, out: str | None, w) -> list[str]:
    """A command line of `cmd` that would run (on a good model, into a good --out)."""
    pair = ["--model", model, "--clean", "ab", "--corrupt", "ac", "--answer", "b", "--wrong", "c", "--out", out]
    return {
        "predict": ["predict", "--model", model, "--prompt", "ab"],
        "patch": ["patch", *pair, "--quiet"],
        "attribute": ["attribute", "--method", "atp", *pair],
        "path-patch": ["path-patch", *pair, "--receivers", "logits", "--quiet"],
        "discover": ["discover", "--task", "ioi", "--model", model, "--out", out, "--quiet"],
        "train-sae": ["train-sae", "--model", model, "--site", "blocks.1.hook_resid_post", "--out", out, "--quiet"],
        "features": ["features", str(w / "dictionary"), "--html", "--model", model, "--out", out],
        "graph": ["graph", "--model", model, "--transcoders", str(w / "transcoders"), "--prompt", "ab", "--out", out,
                  "--quiet"],  # fmt: skip
        "steer": ["steer", "--model", model, "--positive", "ab", "--negative", "ac", "--layer", "1", "--coeffs=-1,1",
                  "--prompt", "abc", "--out", out],  # fmt: skip
        "trace-fact": ["trace-fact", "--model", model, "--prompt", "abc", "--subject", "ab", "--out", out, "--quiet"],
        "das": ["das", "--model", model, "--out", out, "--quiet"],
        "ioi": ["ioi", "--model", model, "--out", out, "--quiet"],
        "scrub": ["scrub", "--out", out, "--quiet"],
    }[cmd]


def fresh_out(cmd: str, w, case: str) -> str:
    """An --out that does not exist yet (a refused run must not create it)."""
    return str(w / "outs" / case / FILE_OUT.get(cmd, "out"))


def snapshot(root) -> dict[str, str]:
    """Every file and folder under `root`: content hashes and permission bits."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            mode = oct(os.stat(p).st_mode)
            out[os.path.relpath(p, root)] = mode if name in dirs else mode + hashlib.sha1(open(p, "rb").read()).hexdigest()
    return out


def refused(args, w, capsys) -> str:
    """Run `circuits-jax ARGS`: exit 2, exactly one `circuits-jax: error:` line on stderr, nothing under `w` changed."""
    before = snapshot(w)
    try:
        rc = main(args)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, f"exit {rc}: {err}"
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("circuits-jax: error: "), err
    assert snapshot(w) == before, "a refused run wrote or changed files"
    return lines[0]


def read_only_for_root(folder, monkeypatch) -> None:
    """As root, chmod 555 does not stop writes, and `os.access` says so: make `os.access` answer for `folder` (and
    what lies in it) as it would for any other user, so the --out checks meet a read-only folder all the same."""
    real = os.access

    def access(path, mode, *args, **kwargs):
        p = os.path.abspath(path)
        if mode & os.W_OK and (p == str(folder) or p.startswith(str(folder) + os.sep)):
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


# ------------------------------------------------------------------ damaged model files


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("cmd", WITH_MODEL)
def test_damaged_model_is_one_line_naming_the_file(cmd, kind, world, capsys):
    name, needle = MODELS[kind]
    line = refused(argv(cmd, str(world / "models" / name), fresh_out(cmd, world, f"{cmd}-{kind}"), world), world, capsys)
    assert name in line and needle in line, line


# ------------------------------------------------------------------ --out


def _bad_outs() -> list[tuple[str, str, str, str]]:
    """(case, command, --out relative to the world folder, what the line says) for every command with an --out."""
    cases = []
    for cmd in [*DIR_OUT, *FILE_OUT]:
        name = FILE_OUT.get(cmd, "out")
        if cmd in DIR_OUT:
            cases.append(("existing file", cmd, "a-file", "is an existing file"))
        else:
            cases.append(("existing folder", cmd, "outs", "is a folder"))
        cases.append(("under a file", cmd, f"a-file/{name}", "a-file is a file, not a folder"))
        cases.append(("read-only folder", cmd, f"read-only/{name}", "is not writable"))
    return cases


OUT_CASES = _bad_outs()


@pytest.mark.parametrize("case, cmd, out, needle", OUT_CASES, ids=[f"{cmd}-{case}" for case, cmd, _, _ in OUT_CASES])
def test_bad_out_is_refused_before_any_model_loads(case, cmd, out, needle, world, no_model, monkeypatch, capsys):
    if cmd in OUT_PENDING:
        pytest.xfail(f"{cmd}'s --out is checked in its own command module (another engineer's)")
    if case == "read-only folder" and os.access(world / "read-only", os.W_OK):
        read_only_for_root(world / "read-only", monkeypatch)
    line = refused(argv(cmd, str(world / "models" / "good"), str(world / out), world), world, capsys)
    assert "--out" in line and needle in line, line


def test_png_next_to_out_is_checked_too(world, no_model, capsys):
    args = argv("patch", str(world / "models" / "good"), fresh_out("patch", world, "png"), world)
    line = refused([*args, "--png", str(world / "a-file" / "r.png")], world, capsys)
    assert line.startswith("circuits-jax: error: --png") and "is a file, not a folder" in line


# ------------------------------------------------------------------ numbers and empty text

NUMBERS = [
    ("predict", ["--top-k", "nan"], "--top-k"),
    ("patch", ["--memory-gb", "inf"], "--memory-gb"),
    ("patch", ["--memory-gb", "nan"], "--memory-gb"),
    ("patch", ["--mesh", "sweep=0"], "--mesh"),
    ("patch", ["--mesh", "0"], "--mesh"),
    ("attribute", ["--steps", "inf"], "--steps"),
    ("attribute", ["--mesh", "data=0"], "--mesh"),
    ("discover", ["--threshold", "nan"], "--threshold"),
    ("discover", ["--fraction", "inf"], "--fraction"),
    ("train-sae", ["--lr", "inf"], "--lr"),
    ("train-sae", ["--lr", "nan"], "--lr"),
    ("train-sae", ["--mesh", "model=0"], "--mesh"),
    ("features", ["--n", "nan"], "--n"),
    ("graph", ["--node-threshold", "nan"], "--node-threshold"),
    ("graph", ["--edge-threshold", "inf"], "--edge-threshold"),
    ("steer", ["--coeffs=nan,1"], "--coeffs"),
    ("steer", ["--coeffs=1,-inf"], "--coeffs"),
    ("trace-fact", ["--noise", "inf"], "--noise"),
    ("trace-fact", ["--noise", "nan"], "--noise"),
    ("scrub", ["--trees", "inf"], "--trees"),
    ("das", ["--lr", "nan"], "--lr"),
    ("das", ["--lr", "inf"], "--lr"),
    ("ioi", ["--fraction", "nan"], "--fraction"),
    ("ioi", ["--steps", "inf"], "--steps"),
]
EMPTY = [
    ("patch", ["--clean", "", "--corrupt", ""], "--clean is empty"),
    ("attribute", ["--answer", ""], "--answer is empty"),
    ("path-patch", ["--corrupt", ""], "--corrupt is empty"),
    ("steer", ["--prompt", ""], "--prompt is empty"),
    ("steer", ["--positive", ""], "--positive is empty"),
    ("trace-fact", ["--subject", ""], "--subject is empty"),
    ("graph", ["--prompt", " "], "--prompt is empty"),
]


@pytest.mark.parametrize("cmd, extra, needle", NUMBERS + EMPTY, ids=[f"{c}{' '.join(e)}" for c, e, _ in NUMBERS + EMPTY])
def test_bad_number_or_empty_text_is_one_line_before_any_model_loads(cmd, extra, needle, world, no_model, capsys):
    args = argv(cmd, str(world / "models" / "good"), fresh_out(cmd, world, "numbers"), world)
    line = refused([*args, *extra], world, capsys)  # a repeated option: the last one counts
    assert needle in line, line


def test_every_subcommand_with_options_is_covered():
    from test_cli_help import _subcommands

    covered = set(WITH_MODEL) | set(DIR_OUT) | set(FILE_OUT)
    assert set(_subcommands()) - covered == {"experiment"}
    assert {c for c, _, _ in NUMBERS} >= set(_subcommands()) - {"experiment", "path-patch"}  # path-patch takes no number


# ------------------------------------------------------------------ library errors and what main shows


def test_library_errors_become_one_line_and_bugs_keep_their_traceback(world, monkeypatch, capsys):
    """ValueError, OSError and the library's own KeyError / TypeError refusals are one line; a KeyError or
    TypeError that no `raise` of circuits_jax made is a bug, and keeps its traceback."""
    import numpy as np

    import circuits_jax.core as core
    from circuits_jax.app import _patch

    cfg = tiny_model().cfg
    args = argv("patch", str(world / "models" / "good"), fresh_out("patch", world, "lib"), world)

    def fail(exc):
        def prepare(_):
            raise exc

        return prepare

    for prepare, want in [
        (fail(ValueError("metric LogitDiff returns shape (1,);\na metric returns one number")),
         "metric LogitDiff returns shape (1,); a metric returns one number"),
        (lambda _: core.parse_site("blocks.1.hook_resid_prre", cfg), "unknown activation site 'blocks.1.hook_resid_prre'"),
        (lambda _: core.check_tokens(np.zeros((1, 2), np.float32), 31), "tokens must be integer token ids"),
        (fail(PermissionError(13, "Permission denied", "/x/r.npz")),
         "PermissionError: [Errno 13] Permission denied: '/x/r.npz'"),
    ]:
        monkeypatch.setattr(_patch, "prepare_pair", prepare)
        line = refused(args, world, capsys)
        assert line.startswith(f"circuits-jax: error: {want}"), line
    for bug, exc in [(lambda _: {}["no such key"], KeyError), (lambda _: len(None), TypeError)]:
        monkeypatch.setattr(_patch, "prepare_pair", bug)
        with pytest.raises(exc):
            main(args)


def test_a_vector_metric_is_refused_in_one_line(world, monkeypatch, capsys):
    """The library's metric check (one number per batch) reaches the command line as one line."""
    import circuits_jax.core as core

    class PerExample(core.LogitDiff):
        def __call__(self, logits):
            return super().__call__(logits) * jax_ones(logits.shape[0])

    def jax_ones(n):
        import jax.numpy as jnp

        return jnp.ones((n,), jnp.float32)

    monkeypatch.setattr(core, "LogitDiff", PerExample)
    args = argv("patch", str(world / "models" / "good"), fresh_out("patch", world, "vector"), world)
    line = refused(args, world, capsys)
    assert "returns shape (1,)" in line and "one number" in line, line


def test_out_without_suffix_writes_and_prints_the_real_path(world, capsys):
    """`patch --out NAME` writes NAME.npz and says so; no temporary file is left beside it."""
    import numpy as np

    out = world / "outs" / "named"
    args = argv("patch", str(world / "models" / "good"), str(out / "result"), world)
    assert main(args) == 0
    assert f"wrote {out / 'result.npz'}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["result.npz"]
    assert np.load(out / "result.npz")["result"].shape[0] == 3


def test_predict_with_an_empty_prompt_and_no_bos(world, capsys):
    refused(["predict", "--model", str(world / "models" / "good"), "--prompt", ""], world, capsys)
