import json
import os
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")

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
