"""Run folders (`circuits_jax.dictionaries._run`): the record, the lock, resume / overwrite, and files
written whole; `train_dictionary` / `train_transcoders` / `train` refusing another run's files.

Nothing here trains a real dictionary except one two-step check of `train`'s checkpoint guard: the
pipeline tests stop at `build_store` (replaced), which is where the first output of a run is written.
The command line's end-to-end runs (Ctrl-C, two processes at once) are in tests/app/test_runs.py.
"""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import circuits_jax as cj
from circuits_jax.dictionaries import _pipeline as P
from circuits_jax.dictionaries._io import dictionary_info, load_dictionary, save_dictionary
from circuits_jax.dictionaries._run import (LOCK_FILE, RUN_FILE, RunLock, RunLocked, RunMismatch, checkpoint_steps,
                                            deferred_interrupt, describe_run, open_run, read_record, save_array,
                                            settings_diff)  # fmt: skip
from circuits_jax.dictionaries._sae import init_sae
from circuits_jax.dictionaries._train import TrainConfig, train

from test_sae_pipeline import model as model, tok as tok  # noqa: F401  (fixtures)
from test_sae_train import SAE_SITE, sparse_data, write_store


def tree_hash(path):
    """{relative path: sha256} of every file under `path`."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- the lock


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _plant_lock(folder, **owner):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_FILE).write_text(json.dumps(dict(dict(host=socket.gethostname(), started="then", command="x"), **owner)))


def test_lock_is_exclusive_and_names_its_owner(tmp_path):
    lock = RunLock(tmp_path / "run")
    owner = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname() and owner["started"]
    with pytest.raises(RunLocked, match=r"in use by another run: this process on "):
        RunLock(tmp_path / "run")
    assert [p.name for p in (tmp_path / "run").iterdir()] == [LOCK_FILE]  # no temporary files left behind
    lock.release()
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    RunLock(tmp_path / "run").release()

    # a live process on this host, and any process on another host, hold the lock
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _plant_lock(tmp_path / "live", pid=sleeper.pid)
        with pytest.raises(RunLocked, match=rf"in use by another run: pid {sleeper.pid} on {socket.gethostname()}"):
            RunLock(tmp_path / "live")
    finally:
        sleeper.kill()
        sleeper.wait()
    _plant_lock(tmp_path / "far", pid=1, host="elsewhere")
    with pytest.raises(RunLocked, match="pid 1 on elsewhere"):
        RunLock(tmp_path / "far")
    # a lock is released only by its owner
    mine = RunLock(tmp_path / "mine")
    _plant_lock(tmp_path / "mine", pid=sleeper.pid, token="not mine")
    mine.release()
    assert (tmp_path / "mine" / LOCK_FILE).exists()


def test_stale_lock_of_a_dead_process_is_cleared_with_a_note(tmp_path):
    said = []
    pid = _dead_pid()
    _plant_lock(tmp_path, pid=pid)
    lock = RunLock(tmp_path, log=said.append)
    assert said == [f"removed a stale lock of {tmp_path}: pid {pid} on {socket.gethostname()} is no longer running"]
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    # a pid now used by another process (it started later than the lock's owner) is stale too
    _plant_lock(tmp_path, pid=os.getpid(), process_start="1")
    RunLock(tmp_path, log=said.append).release()
    assert len(said) == 2 and f"pid {os.getpid()}" in said[1]
    # an unreadable lock file: taken for a lock being written for 10 s, then cleared
    (tmp_path / LOCK_FILE).write_text("{torn")
    with pytest.raises(RunLocked, match="lock file .* is being written or unreadable"):
        RunLock(tmp_path, log=said.append)
    os.utime(tmp_path / LOCK_FILE, (0, 0))
    RunLock(tmp_path, log=said.append).release()
    assert "an unreadable lock file" in said[2]


# ---------------------------------------------------------------- the record


def test_settings_diff_names_nested_keys_and_absent_ones():
    a = dict(width=32, train=dict(lr=1e-3, loss=dict(l1=5.0)), sites=["x"], corpus_sha256="ab" * 32)
    b = dict(width=32, train=dict(lr=2e-3, loss=dict(l1=5.0)), sites=("x",), corpus_sha256="cd" * 32, new=1)
    diffs = settings_diff(a, b)
    assert [k for k, _, _ in diffs] == ["train.lr", "corpus_sha256", "new"]
    e = RunMismatch("runs/x", diffs)
    text = str(e)
    assert text.startswith("runs/x holds another run: train.lr was 0.001, now 0.002; corpus_sha256 was abababababab…, now cdcdcdcdcdcd…")
    assert "new was (absent), now 1" in text and "overwrite=True deletes it" in text and "\n" not in text
    named = e.describe({"train.lr": "--lr"}, overwrite="--overwrite")
    assert "--lr was 0.001, now 0.002" in named and "--overwrite deletes it" in named


def _settings(**kw):
    return dict(dict(width=32, train=dict(lr=1e-3)), **kw)


def _start(path, settings, outputs=("store", "eval.json"), **kw):
    said = []
    with open_run(path, "demo", settings, outputs=outputs, log=said.append, **kw) as run:
        run.commit()
        (path / "store").mkdir(exist_ok=True)
        (path / "store" / "chunk").write_text(json.dumps(settings))
    return said


def test_open_run_new_resume_refuse_overwrite(tmp_path):
    out = tmp_path / "run"
    said = _start(out, _settings())
    assert said == [f"new run in {out} (settings in {out / RUN_FILE})"]
    rec = read_record(out)
    assert rec["kind"] == "demo" and rec["settings"] == _settings() and rec["format"] == 1
    assert not (out / LOCK_FILE).exists()
    (out / "notes.txt").write_text("the user's own file")
    # the same settings: resumed, and said so
    said = _start(out, _settings())
    assert said[0].startswith(f"resuming the run in {out}: ")
    assert read_record(out)["created"] == rec["created"]
    # other settings: refused before anything changes, naming the key and both values
    before = tree_hash(out)
    for kw in ({}, dict(resume=True)):
        with pytest.raises(RunMismatch, match=r"train\.lr was 0\.001, now 0\.01") as e:
            _start(out, _settings(train=dict(lr=1e-2)), **kw)
        assert e.value.diffs == [("train.lr", 1e-3, 1e-2)]
    assert "cannot resume the run" in str(e.value)
    with pytest.raises(RunMismatch, match=r"kind was \"demo\", now \"other\""):
        with open_run(out, "other", _settings(), outputs=("store",)):
            pass
    assert tree_hash(out) == before
    # overwrite: the run's outputs go (only those), a new record is written
    said = _start(out, _settings(width=64), overwrite=True)
    assert said == [f"overwrite: deleted the previous run in {out} (run.json, store); starting afresh (settings in {out / RUN_FILE})"]
    assert read_record(out)["settings"]["width"] == 64 and (out / "notes.txt").read_text() == "the user's own file"
    assert json.loads((out / "store" / "chunk").read_text())["width"] == 64
    with pytest.raises(ValueError, match="exclude each other"):
        _start(out, _settings(), resume=True, overwrite=True)


def test_open_run_without_a_record(tmp_path):
    # nothing to resume
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        _start(tmp_path / "empty", _settings(), resume=True)
    assert not (tmp_path / "empty").exists()  # a folder made for nothing is removed
    # outputs of a run that recorded nothing (an older version): refused; resume adopts them, overwrite deletes them
    old = tmp_path / "old"
    (old / "store").mkdir(parents=True)
    (old / "eval.json").write_text("{}")
    with pytest.raises(RunMismatch, match=r"recorded no settings \(store, eval\.json\).*resume=True continues it"):
        _start(old, _settings())
    assert read_record(old) is None
    said = _start(old, _settings(), resume=True)
    assert said[0].startswith(f"resuming the run in {old}") and (old / "eval.json").exists()
    (old / RUN_FILE).unlink()
    _start(old, _settings(), overwrite=True)
    assert not (old / "eval.json").exists() and read_record(old) is not None
    # a record whose run never wrote anything protects nothing: other settings replace it
    bare = tmp_path / "bare"
    with open_run(bare, "demo", _settings()) as run:
        run.commit(lambda: "")
    _start(bare, _settings(width=8))
    assert read_record(bare)["settings"]["width"] == 8


def test_open_run_releases_the_lock_when_the_block_raises(tmp_path):
    with pytest.raises(KeyError):
        with open_run(tmp_path / "r", "demo", _settings(), log=lambda s: None) as run:
            run.commit()
            raise KeyError("boom")
    assert not (tmp_path / "r" / LOCK_FILE).exists() and read_record(tmp_path / "r") is not None


def test_describe_run(tmp_path):
    assert describe_run(tmp_path) == "nothing of this run yet"
    settings = dict(n_tokens=64, train=dict(n_tokens=64, batch_size=8))
    with open_run(tmp_path, "train_dictionary", settings, log=lambda s: None) as run:
        run.commit()
    assert describe_run(tmp_path) == "no activations stored yet, no checkpoint yet"
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "store.json").write_text(json.dumps(dict(chunk_tokens=16, n_chunks=1)))
    for step in (4, 6):
        (tmp_path / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_00000004" / "done").write_text("")  # step 6 has no marker: incomplete
    assert checkpoint_steps(tmp_path / "checkpoints") == [4]
    assert describe_run(tmp_path) == "activation store 1 of 4 chunks, checkpoint at step 4 of 8"
    (tmp_path / "checkpoints" / "step_00000008").mkdir()
    (tmp_path / "checkpoints" / "step_00000008" / "done").write_text("")
    assert describe_run(tmp_path).endswith("training finished (step 8 of 8), not evaluated yet")


# ---------------------------------------------------------------- written whole, Ctrl-C held back


def test_save_array_and_dictionary_are_written_whole(tmp_path, monkeypatch):
    save_array(tmp_path / "a.npy", np.arange(3))
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.arange(3))

    def torn(f, a):
        f.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", torn)
    with pytest.raises(KeyboardInterrupt):
        save_array(tmp_path / "a.npy", np.arange(5))
    monkeypatch.undo()
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.arange(3))  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["a.npy"]

    # a checkpoint replaced by `save`: an interruption between the two renames puts the old one back
    sae = init_sae(4, 8, key=jax.random.key(0, impl="rbg"), arch="relu", in_site=SAE_SITE)
    save_dictionary(tmp_path / "d", sae, info=dict(v=1))
    real = os.replace
    calls = []

    def replace(a, b):  # Ctrl-C once, as the new checkpoint is renamed into place (the old one moved aside)
        if os.path.basename(b) == "params" and not calls:
            calls.append(b)
            raise KeyboardInterrupt
        return real(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        cj.save(tmp_path / "d" / "params", jax.tree.map(lambda a: a + 1, sae))
    monkeypatch.undo()
    assert cj.tree_allclose(cj.restore(tmp_path / "d" / "params", sae), sae)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["dictionary.json", "params"]
    # save_dictionary: dictionary.json (what makes it loadable) goes first and comes back last
    monkeypatch.setattr("circuits_jax.dictionaries._io.save", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_dictionary(tmp_path / "d", sae, info=dict(v=2))
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="not a saved dictionary"):
        load_dictionary(tmp_path / "d")
    save_dictionary(tmp_path / "d", sae, info=dict(v=2))
    assert dictionary_info(tmp_path / "d")["info"] == {"v": 2}


@pytest.fixture
def python_sigint_handler():
    """Python's own SIGINT handler for the test, as in a terminal (pytest-xdist's workers ignore SIGINT)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_deferred_interrupt_holds_ctrl_c_until_the_block_ends(python_sigint_handler):
    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("after the signal")
    assert done == ["after the signal"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C stops at once
        with deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            done.append("not reached")
    assert done == ["after the signal"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with deferred_interrupt():  # no signal: nothing happens
        pass


# ---------------------------------------------------------------- the library functions


class Stop(Exception):
    pass


@pytest.fixture
def first_output(monkeypatch):
    """`build_store` writes the store's folder (a run's first output) and stops the run there."""
    calls = []

    def build_store(model, contexts, sites, path, **kw):
        path.mkdir(parents=True, exist_ok=True)
        (path / "store.json").write_text(json.dumps(dict(sites=list(sites), chunk_tokens=kw["chunk_tokens"], n_chunks=0, info=kw["info"])))
        calls.append(path)
        raise Stop

    monkeypatch.setattr(P, "build_store", build_store)
    monkeypatch.setattr(P, "train", lambda *a, **k: pytest.fail("trained"))
    return calls


KW = dict(site="blocks.1.hook_resid_post", k=4, width=32, n_tokens=512, corpus="pydoc-topics", ctx_len=9, n_eval_contexts=4,
          train_cfg=dict(batch_size=64, lr=1e-2), progress=False)  # fmt: skip


def test_train_dictionary_refuses_another_run_before_any_compute(model, tok, tmp_path, first_output):
    out = tmp_path / "run"
    said = []
    with pytest.raises(Stop):
        P.train_dictionary(model, tok, out, log=said.append, **KW)
    assert said == [f"new run in {out} (settings in {out / RUN_FILE})"] and len(first_output) == 1
    s = read_record(out)["settings"]
    assert s["train"]["lr"] == 1e-2 and s["width"] == 32 and s["in_sites"] == [KW["site"]] and "checkpoint_every" not in s["train"]
    assert s["model_config"]["d_model"] == 16 and len(s["corpus_sha256"]) == 64 and s["model_fingerprint"]
    assert read_record(out)["labels"] == dict(model="", corpus="pydoc-topics", store=None)
    before = tree_hash(out)

    cases = [(dict(width=64), r"width was 32, now 64"), (dict(train_cfg=dict(batch_size=64, lr=2e-2)), r"train\.lr was 0\.01, now 0\.02"),
             (dict(k=8), "k was 4, now 8"), (dict(seed=1), "seed was 0, now 1"), (dict(n_tokens=1024), "n_tokens was 512, now 1024"),
             (dict(site="blocks.0.hook_resid_post"), r'in_sites was \["blocks.1.hook_resid_post"\], now \["blocks.0.hook_resid_post"\]')]  # fmt: skip
    (tmp_path / "c.txt").write_text("the a of is to the class " * 40)
    cases.append((dict(corpus=str(tmp_path / "c.txt")), r"corpus_sha256 was .*; corpus was \"pydoc-topics\", now \".*c\.txt\""))
    for change, message in cases:
        with pytest.raises(RunMismatch, match=message):
            P.train_dictionary(model, tok, out, log=said.append, **dict(KW, **change))
    other = cj.init_model(model.cfg, key=jax.random.key(7, impl="rbg"), std=0.2)  # the same config, other weights
    with pytest.raises(RunMismatch, match="model_fingerprint was"):
        P.train_dictionary(other, tok, out, log=said.append, **KW)
    assert tree_hash(out) == before and len(first_output) == 1 and len(said) == 1  # nothing ran, nothing changed

    # checkpoint_every is not a setting; the same run resumes (announced), overwrite starts afresh
    with pytest.raises(Stop):
        P.train_dictionary(model, tok, out, log=said.append, resume=True, **dict(KW, train_cfg=dict(batch_size=64, lr=1e-2, checkpoint_every=3)))
    assert said[-1] == f"resuming the run in {out}: activation store 0 of 4 chunks, no checkpoint yet"
    with pytest.raises(Stop):
        P.train_dictionary(model, tok, out, log=said.append, overwrite=True, **dict(KW, width=64))
    assert said[-1].startswith(f"overwrite: deleted the previous run in {out} (run.json, store)")
    assert read_record(out)["settings"]["width"] == 64


def test_train_dictionary_refuses_an_outside_store_of_other_data(model, tok, tmp_path, first_output):
    store = tmp_path / "store"
    with pytest.raises(Stop):
        P.train_dictionary(model, tok, tmp_path / "a", store_dir=store, log=lambda s: None, **KW)
    assert first_output == [store] and read_record(tmp_path / "a")["labels"]["store"] == str(store.absolute())
    (tmp_path / "c.txt").write_text("the a of is to the class " * 40)
    with pytest.raises(ValueError, match=r"the activation store at .*store was built from other data \(corpus_sha256 was"):
        P.train_dictionary(model, tok, tmp_path / "b", store_dir=store, log=lambda s: None, **dict(KW, corpus=str(tmp_path / "c.txt")))
    assert not (tmp_path / "b").exists()
    with pytest.raises(Stop):  # an overwrite never deletes an outside store
        P.train_dictionary(model, tok, tmp_path / "a", store_dir=store, overwrite=True, log=lambda s: None, **KW)
    assert (store / "store.json").exists()


def test_train_transcoders_refuses_other_layers(model, tok, tmp_path, first_output):
    kw = dict(k=4, width=32, n_tokens=512, corpus="pydoc-topics", ctx_len=9, n_eval_contexts=4, chunk_tokens=64,
              train_cfg=dict(batch_size=64), progress=False, log=lambda s: None)  # fmt: skip
    with pytest.raises(Stop):
        P.train_transcoders(model, tok, tmp_path, layers=[0, 1], **kw)
    assert read_record(tmp_path)["kind"] == "train_transcoders"
    with pytest.raises(RunMismatch, match=r"layers was \[0, 1\], now \[1, 2\]"):
        P.train_transcoders(model, tok, tmp_path, layers=[1, 2], **kw)
    with pytest.raises(RunMismatch, match="kind was"):
        P.train_dictionary(model, tok, tmp_path, **KW)


def test_train_refuses_a_checkpoint_of_another_width(tmp_path):
    store = write_store(tmp_path / "store", [sparse_data(512, seed=0)], [SAE_SITE], 128)
    cfg = TrainConfig(n_tokens=64, batch_size=32, checkpoint_every=1)
    key = jax.random.key(0, impl="rbg")
    train(init_sae(16, 32, key=key, arch="topk", k=2, in_site=SAE_SITE), store, cfg, checkpoint_dir=tmp_path / "ck", progress=False)
    assert checkpoint_steps(tmp_path / "ck") == [1, 2]
    with pytest.raises(ValueError, match=r"the checkpoint .*step_00000002 holds another training run's state"):
        train(init_sae(16, 48, key=key, arch="topk", k=2, in_site=SAE_SITE), store, cfg, checkpoint_dir=tmp_path / "ck", progress=False)
