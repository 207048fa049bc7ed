"""`circuits-jax train-sae` run folders end to end, on a tiny model: what a careless user found (issue 21, "Runs
know what they are") and what stops it now.

- another run in the same `--out` (other corpus, lr, width, ...) is refused before any compute with one line
  naming each differing flag with both values, and the old run's files stay byte-identical; `--overwrite`
  starts afresh (the old code reused the store and the finished checkpoint, or died inside orbax);
- a second command on a folder in use is refused naming the first one's pid, its files untouched (the old
  code ran both);
- Ctrl-C (a real SIGINT, sent by the process to itself at a chosen call) at store building, training,
  checkpointing and evaluation stops with one line (what was kept, the command that resumes) and no
  traceback; each printed command resumes, says where from, and the last one ends at exactly the
  parameters, history and eval numbers of an uninterrupted run (the old code printed a traceback and
  resumed silently).

The runs are subprocesses of a small driver (`DRIVER`) that installs the Ctrl-C trigger and calls the
command line's `main`; they share a persistent JAX compilation cache so that only the first compiles.
"""

import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import circuits_jax as cj
from circuits_jax.app.cli import main
from circuits_jax.dictionaries import LOCK_FILE, dictionary_info, load_dictionary, read_record

from conftest import tiny_configs
from test_sae_pipeline import BOS, EOS, WORDS, _key, make_tok

ROOT = Path(__file__).resolve().parents[2]

DRIVER = '''
"""`circuits-jax ARGV` with Ctrl-C (a real SIGINT to this process) at the N-th call of STAGE."""
import os, signal, sys, time
from pathlib import Path

from circuits_jax.app.cli import main
from circuits_jax.dictionaries import _activations, _pipeline, _train

stage, n, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
calls = [0]
# A terminal's Ctrl-C: Python's own handler, even where the parent ignored SIGINT (pytest-xdist's workers do, and an
# ignored signal stays ignored across exec, so Python would not install its handler at start-up).
signal.signal(signal.SIGINT, signal.default_int_handler)


def trip():
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGINT)


def wrap(module, name, before=False):
    real = getattr(module, name)

    def wrapped(*a, **k):
        if before:
            trip()
        out = real(*a, **k)
        if not before:
            trip()
        return out

    setattr(module, name, wrapped)


if stage == "store":  # after the N-th chunk file is written, before store.json counts its chunk
    wrap(_activations, "save_array")
elif stage == "train":  # before the N-th training step
    make_step = _train.make_step
    _train.make_step = lambda cfg: (lambda step: (lambda *a: (trip(), step(*a))[1]))(make_step(cfg))
elif stage == "checkpoint":  # inside the N-th checkpoint: its state written, its history and done marker not yet
    wrap(_train, "save")
elif stage == "eval":  # as evaluation starts
    wrap(_pipeline, "evaluate", before=True)
elif stage == "pause":  # before training: say so, then wait for the test's word
    train, folder = _pipeline.train, Path(os.environ["PAUSE_DIR"])

    def paused(*a, **k):
        (folder / "ready").write_text("")
        t0 = time.time()
        while not (folder / "go").exists() and time.time() - t0 < 300:
            time.sleep(0.05)
        return train(*a, **k)

    _pipeline.train = paused
sys.exit(main(argv))
'''


def tree_hash(path: Path) -> dict:
    """{relative path: sha256} of every file under `path`."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = dataclasses.replace(tiny_configs()["gpt2like"], d_vocab=len(WORDS), bos_token_id=BOS, eos_token_id=EOS)
    d = tmp_path_factory.mktemp("model")
    cj.save_model(d, cj.init_model(cfg, key=_key(0), std=0.2))
    make_tok().tok.save(str(d / "tokenizer.json"))
    return d


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    d = tmp_path_factory.mktemp("driver")
    (d / "driver.py").write_text(DRIVER)
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(d / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")  # fmt: skip

    def cli(argv, stage="none", n=0, **kw):
        return subprocess.run([sys.executable, str(d / "driver.py"), stage, str(n), *argv], env=dict(env, **kw), cwd=ROOT,
                              capture_output=True, text=True, timeout=600)  # fmt: skip

    cli.command = lambda argv, stage="none", n=0: [sys.executable, str(d / "driver.py"), stage, str(n), *argv]
    cli.env = env
    return cli


def args(model_dir, out, *extra):
    """16 steps of 64 tokens from a store of 4 chunks, a checkpoint every 4 steps."""
    return ["train-sae", "--model", str(model_dir), "--site", "blocks.1.hook_resid_post", "--k", "4", "--width", "32",
            "--tokens", "1024", "--corpus", "pydoc-topics", "--ctx-len", "9", "--batch-size", "64", "--lr", "1e-2",
            "--eval-contexts", "4", "--checkpoint-every", "4", "--out", str(out), "--quiet", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def baseline(model_dir, driver, tmp_path_factory):
    """An uninterrupted run."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    r = driver(args(model_dir, out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"new run in {out} (settings in {out / 'run.json'})\n")
    return out


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


METRICS = ("l0", "fve", "ce_clean", "ce_splice", "ce_zero", "ce_recovered", "kl_recovered", "dead", "dense", "n_tokens", "eval_tokens")


@pytest.mark.slow
def test_another_run_in_the_same_out_is_refused_and_changes_nothing(baseline, model_dir, driver, tmp_path, capsys):
    """The old code re-ran with another --corpus or --lr reusing the old store and finished checkpoint (exit 0,
    a dictionary.json claiming the new settings, eval.json overwritten), and died in orbax with another --width."""
    out = tmp_path / "run"
    shutil.copytree(baseline, out)
    before = tree_hash(out)
    other = tmp_path / "other.txt"
    other.write_text("the class of a value is the object that is not a value . " * 50)
    cases = [
        (["--corpus", str(other)], ["--corpus (its contents' sha256) was ", f'--corpus was "pydoc-topics", now "{other}"']),
        (["--lr", "0.02"], ["--lr was 0.01, now 0.02"]),
        (["--width", "64"], ["--width was 32, now 64"]),
        (["--k", "2", "--seed", "3"], ["--k was 4, now 2", "--seed was 0, now 3"]),
        (["--tokens", "2048"], ["--tokens was 1024, now 2048", "training tokens (--tokens x --epochs) was 1024, now 2048"]),
    ]  # fmt: skip
    for extra, named in cases:
        assert main(args(model_dir, out, *extra)) == 2
        err = _one_line(capsys.readouterr().err)
        assert err.startswith(f"circuits-jax: error: {out} holds another run: ")
        assert all(n in err for n in named), err
        assert err.endswith("Nothing was changed: --overwrite deletes it and starts afresh, or use another directory")
        assert tree_hash(out) == before
        assert err.count("--seed") == ("--seed" in extra)  # the train config's seed is the same flag: named once
    assert main(args(model_dir, out, "--lr", "0.02", "--resume")) == 2
    err = _one_line(capsys.readouterr().err)
    assert err.startswith(f"circuits-jax: error: cannot resume the run in {out}: its settings differ: --lr was 0.01, now 0.02")
    assert tree_hash(out) == before

    # --overwrite: the old run's files go (the user's own stay), the new run starts from nothing
    (out / "notes.txt").write_text("mine")
    r = driver(args(model_dir, out, "--lr", "0.02", "--overwrite"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"overwrite: deleted the previous run in {out} (run.json, checkpoints, dictionary, eval.json, "
                               "history.json, density.npy, density.png, store); starting afresh")  # fmt: skip
    ev, old = (json.loads((p / "eval.json").read_text()) for p in (out, baseline))
    assert ev["resumed_from"] == 0 and ev["fve"] != old["fve"]
    assert dictionary_info(out / "dictionary")["info"]["train"]["lr"] == 0.02 == read_record(out)["settings"]["train"]["lr"]
    assert (out / "notes.txt").read_text() == "mine" and not (out / LOCK_FILE).exists()


def test_resume_needs_a_run_and_excludes_overwrite(model_dir, tmp_path, capsys):
    assert main(args(model_dir, tmp_path / "none", "--resume")) == 2
    assert _one_line(capsys.readouterr().err) == f"circuits-jax: error: nothing to resume in {tmp_path / 'none'}: it holds no run"
    assert not (tmp_path / "none").exists()
    with pytest.raises(SystemExit) as e:
        main(args(model_dir, tmp_path / "none", "--resume", "--overwrite"))
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    # a folder of an older version (a store, no run.json) is not taken over silently
    (tmp_path / "old" / "store").mkdir(parents=True)
    assert main(args(model_dir, tmp_path / "old")) == 2
    err = _one_line(capsys.readouterr().err)
    assert "holds files of a run that recorded no settings (store)" in err and "--resume continues it as this run" in err
    assert [p.name for p in (tmp_path / "old").iterdir()] == ["store"]


def test_ctrl_c_before_anything_is_saved(model_dir, tmp_path, capsys, monkeypatch):
    def load(name, dtype=None):
        raise KeyboardInterrupt

    monkeypatch.setattr("circuits_jax.models.load", load)
    assert main(args(model_dir, tmp_path / "r", "--overwrite")) == 130
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("circuits-jax: interrupted; nothing was saved yet; run again with: circuits-jax train-sae --model ")
    assert f" --out {tmp_path / 'r'} " in line and line.endswith(" --checkpoint-every 4 --quiet --overwrite")
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_a_second_run_on_the_same_out_is_refused_while_the_first_runs(model_dir, driver, tmp_path, capsys):
    """The old code ran both, each exiting 0."""
    out = tmp_path / "run"
    first = subprocess.Popen(driver.command(args(model_dir, out), "pause"), env=dict(driver.env, PAUSE_DIR=str(tmp_path)), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        t0 = time.time()
        while not (tmp_path / "ready").exists():
            assert first.poll() is None, first.communicate()
            assert time.time() - t0 < 300, "the first run never reached training"
            time.sleep(0.05)
        before = tree_hash(out)
        assert LOCK_FILE in before and "store/store.json" in before
        assert main(args(model_dir, out)) == 2
        err = _one_line(capsys.readouterr().err)
        assert err.startswith(f"circuits-jax: error: {out} is in use by another run: pid {first.pid} on {socket.gethostname()}, since ")
        assert tree_hash(out) == before
        (tmp_path / "go").write_text("")
        stdout, stderr = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, stderr
    assert stdout.startswith(f"new run in {out}") and (out / "eval.json").exists() and not (out / LOCK_FILE).exists()


@pytest.mark.slow
def test_ctrl_c_at_each_stage_stops_with_one_line_and_resumes_to_the_same_result(baseline, model_dir, driver, tmp_path):
    """Ctrl-C at the N-th call of each stage, one after the other, each run resuming the last. The old code printed a
    traceback and resumed without a word."""
    out = tmp_path / "run"
    full = "the activation store complete (4 chunks)"
    stages = [  # stage, call, where the run resumes (None: a new run), what the interrupted run keeps
        ("store", 3, None, "activation store 2 of 4 chunks, no checkpoint yet"),  # chunk 2 written, not yet counted
        ("train", 6, "activation store 2 of 4 chunks, no checkpoint yet", f"{full}, checkpoint at step 4 of 16"),
        ("checkpoint", 2, f"{full}, checkpoint at step 4 of 16", f"{full}, checkpoint at step 12 of 16"),  # completed first
        ("eval", 1, f"{full}, checkpoint at step 12 of 16", f"{full}, training finished (step 16 of 16), not evaluated yet"),
    ]  # fmt: skip
    argv = args(model_dir, out)
    for stage, n, resumed, kept in stages:
        r = driver(argv, stage, n)
        assert r.returncode == 130, (stage, r.stdout, r.stderr)
        line = _one_line(r.stderr)
        assert line.startswith(f"circuits-jax: interrupted; {out} keeps {kept}; resume with: circuits-jax train-sae "), line
        first = r.stdout.splitlines()[0]
        assert first == (f"resuming the run in {out}: {resumed}" if resumed else f"new run in {out} (settings in {out / 'run.json'})")
        assert not (out / LOCK_FILE).exists()
        assert not [p for p in out.rglob("*") if p.name.startswith(".") or "tmp" in p.name], "temporary files left behind"
        argv = shlex.split(line.split("; resume with: ", 1)[1])[1:]  # the printed command is the next run
        assert argv[-1] == "--resume"
    # a lock left by a process that died is cleared, and said so
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_FILE).write_text(json.dumps(dict(pid=dead.pid, host=socket.gethostname(), started="earlier")))
    r = driver(argv)
    assert r.returncode == 0, r.stderr
    said = r.stdout.splitlines()
    assert said[0] == f"removed a stale lock of {out}: pid {dead.pid} on {socket.gethostname()} is no longer running"
    assert said[1] == f"resuming the run in {out}: {full}, training finished (step 16 of 16), not evaluated yet"

    # the same store, parameters, history and eval numbers as the run that was never interrupted
    assert {k: v for k, v in tree_hash(out / "store").items()} == tree_hash(baseline / "store")
    got, want = load_dictionary(out / "dictionary"), load_dictionary(baseline / "dictionary")
    assert cj.tree_allclose(got, want, rtol=0, atol=0)
    np.testing.assert_array_equal(np.asarray(got.W_dec), np.asarray(want.W_dec))
    assert json.loads((out / "history.json").read_text()) == json.loads((baseline / "history.json").read_text())
    ev, ev0 = (json.loads((p / "eval.json").read_text()) for p in (out, baseline))
    assert {k: ev[k] for k in METRICS} == {k: ev0[k] for k in METRICS}
    assert ev["resumed_from"] == 16 and ev0["resumed_from"] == 0


def test_comma_lists_train_every_combination_in_one_run_equal_to_separate_runs(model_dir, tmp_path, capsys):
    """`--k 2,4 --seed 0,1`: four dictionaries from one program, each saved in OUT/<label>, each what its own run
    with that k gives (same seed 0: the batch order is the first seed's)."""
    from circuits_jax.app.cli import main

    many = tmp_path / "many"
    base = args(model_dir, many)
    k_at = base.index("--k") + 1
    assert main(base[:k_at] + ["2,4"] + base[k_at + 1 :] + ["--seed", "0,1"]) == 0
    out = capsys.readouterr().out
    labels = ["k2_seed0", "k2_seed1", "k4_seed0", "k4_seed1"]
    assert [line.split(":")[0] for line in out.splitlines() if line.split(":")[0] in labels] == labels
    summary = json.loads((many / "eval.json").read_text())
    assert [m["label"] for m in summary["members"]] == labels and summary["tokens_per_second"] > 0
    alone = tmp_path / "alone"
    assert main(args(model_dir, alone)[:k_at] + ["2"] + args(model_dir, alone)[k_at + 1 :]) == 0
    a, b = cj.load_dictionary(alone / "dictionary"), cj.load_dictionary(many / "k2_seed0" / "dictionary")
    assert (a.k, b.k) == (2, 2) and cj.tree_allclose(a, b, rtol=1e-4, atol=1e-5)
    ev = json.loads((alone / "eval.json").read_text())
    assert summary["members"][0]["fve"] == pytest.approx(ev["fve"], rel=1e-3, abs=1e-4)
    assert cj.load_dictionary(many / "k4_seed1" / "dictionary").k == 4


def test_a_transcoder_list_trains_one_per_layer_together(model_dir, tmp_path, capsys):
    """`--transcoder 0,2`: both layers' transcoders from one store and one step, saved as OUT/tc0 and OUT/tc2."""
    from circuits_jax.app.cli import main

    base = args(model_dir, tmp_path / "tc")
    at = base.index("--site")
    assert main(base[:at] + ["--transcoder", "0,2"] + base[at + 2 :]) == 0
    assert "tc0:" in capsys.readouterr().out
    d = cj.load_dictionary(tmp_path / "tc" / "tc2" / "dictionary")
    assert (d.in_site, d.out_site) == ("blocks.2.ln2.hook_normalized", "blocks.2.hook_mlp_out")
