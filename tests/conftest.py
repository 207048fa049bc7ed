import atexit
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")

# XLA's CPU fusion emitters compile our many small programs more slowly than its older code generator does, and
# a test run is mostly compilation: tests/core/test_model.py + test_generate.py under `-n 2` took 105 s with
# them and 79 s without, the same checks passing (the whole suite ran under both configurations, see issue 21).
# The library itself leaves XLA's defaults alone; `XLA_FLAGS` given by the caller wins.
if "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_fusion_emitters=false").strip()

# A compilation cache on disk for this session (a fresh folder, removed at exit, so every run starts
# cold): the modules build the same tiny models on the same token shapes, and the compiled programs that
# `_release_compiled_programs` drops after each module are read back from disk instead of compiled
# again, as are programs that only a new static argument (a fresh lambda, a new hook object) would
# retrace. Tests/patching: 197 of 857 compiles became reads, its wall time 460 s -> 351 s. The folder is
# made once, by the process that loads this file first (pytest, or xdist's controller), and passed on in
# the environment, so the `-n 2` workers (and the tests' subprocesses) share it: a program one worker
# compiled, the other reads. (A read that meets a half-written entry fails its decompression, which JAX
# reports as a warning and answers by compiling.)
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _XLA_CACHE = tempfile.mkdtemp(prefix="circuits_jax_tests_xla_cache_")
    atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # default 1 s: most of ours take less
if os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

ROOT = Path(__file__).resolve().parents[1]
# The tests mirror the package's subpackages (tests/core, tests/patching, ...); test modules share a few
# helpers by module name (`from test_sae_train import sparse_data`), so every test folder is importable.
for _d in sorted(Path(__file__).resolve().parent.iterdir()):
    if _d.is_dir() and not _d.name.startswith((".", "_")) and str(_d) not in sys.path:
        sys.path.append(str(_d))
SHARED = Path(os.environ.get("CIRCUITS_JAX_SHARED", ROOT.parent / "shared"))
REFERENCE = SHARED / "reference"


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop each test module's compiled programs when it ends: one process compiles thousands of them,
    and late in the suite XLA's compiler crashed (segfault, twice, at different tests) once it held them all."""
    yield
    jax.clear_caches()


def pytest_collection_modifyitems(config, items):
    # The longest test (8 simulated devices in a subprocess, minutes) first, so that a worker never starts it last.
    items.sort(key=lambda item: "test_sharding.py" not in item.nodeid)
    # Running SmolLM2 (135M parameters) compiles and runs programs far above the tiny models': every test
    # marked `smollm2` or taking the `smollm2` fixture itself is `slow` (the tokenizer alone is not). So is
    # every test marked `gemma3` (Gemma 3 270M: a 240 MB fetch, a 262k-token vocabulary).
    # `-m "not slow"` is the inner loop (under 5 minutes on 2 cores): of a test marked `slow_after_first` it
    # keeps the first case and leaves the others to the full run, so each check still runs once there.
    seen = set()
    for item in items:
        if item.get_closest_marker("slow_after_first"):
            key = (item.path, getattr(item, "originalname", item.name))
            if key in seen:
                item.add_marker(pytest.mark.slow)
            seen.add(key)
    for item in items:
        own = getattr(getattr(item, "_fixtureinfo", None), "argnames", ())
        if "smollm2" in item.keywords or "smollm2" in own or item.get_closest_marker("gemma3"):
            item.add_marker(pytest.mark.slow)
        # Under `pytest -n 2 --dist loadgroup` (the README's command) the tests of a module that share an expensive
        # module-scoped fixture run in one worker: the trained induction model (30 s) is built once, and Gemma 3's
        # download and float cache are written by one process.
        if any(f in own for f in ("trained", "gemma3", "gguf_file")):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    if REFERENCE.exists():
        return
    skip = pytest.mark.skip(reason=f"reference fixtures not found at {REFERENCE} (set CIRCUITS_JAX_SHARED)")
    for item in items:
        if "reference" in item.keywords:
            item.add_marker(skip)


def _need_reference():
    if not REFERENCE.exists():
        pytest.skip(f"reference fixtures not found at {REFERENCE} (set CIRCUITS_JAX_SHARED)")


@pytest.fixture(scope="session")
def reference():
    _need_reference()
    return REFERENCE


@pytest.fixture(scope="session")
def smollm2():
    import circuits_jax as cj

    return cj.load("smollm2")


@pytest.fixture(scope="session")
def smollm2_expected():
    _need_reference()
    return json.loads((REFERENCE / "smollm2_expected.json").read_text()), np.load(REFERENCE / "smollm2_expected.npz")


def tiny_configs():
    """A spread of architectures, small enough to compile in a second."""
    from circuits_jax import Config

    base = dict(d_model=16, n_layers=3, n_heads=4, d_head=4, d_vocab=23, n_ctx=32)
    return {
        "gpt2like": Config(**base, d_mlp=32, attn_bias=True, mlp_bias=True, unembed_bias=True),
        "llamalike": Config(**base, d_mlp=24, n_kv_heads=2, normalization="rmsnorm", act="silu", gated_mlp=True,
                            positional="rotary", tied_embeddings=True),  # fmt: skip
        "attn_only": Config(**base, normalization=None, positional="none"),
        "encoder": Config(**base, d_mlp=32, causal=False, act="relu"),
        "gelu_exact_no_norm": Config(**base, d_mlp=20, act="gelu", normalization=None, positional="rotary"),
    }


@pytest.fixture
def no_model(monkeypatch):
    """Loading any model is a test failure: the CLI's validation must come first."""
    from circuits_jax import models
    from circuits_jax.tasks import known

    def refuse(*args, **kwargs):
        raise AssertionError(f"a model was loaded ({args}) before the bad argument was caught")

    # every command reaches a model through `circuits_jax.models.load` (or the known toy models)
    monkeypatch.setattr(models, "load", refuse)
    monkeypatch.setattr(known, "induction_model", refuse)
