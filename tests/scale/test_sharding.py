"""Device meshes: the 8-device checks and the two-process run (each in subprocesses, so this process
keeps its one device), and the refusals that need no devices at all."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import pytest

import circuits_jax as cj
from circuits_jax.scale import _sharding as sh
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TESTS = HERE.parent


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIRCUITS_JAX_") or k == "CIRCUITS_JAX_SHARED"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(HERE), str(TESTS), env.get("PYTHONPATH", "")])
    return {**env, **extra}


@pytest.mark.slow
def test_sharded_sweeps_training_checkpoints_and_models_on_8_simulated_devices():
    """Runs tests/multidevice/check_sharding.py with 8 CPU devices; its failures are shown here."""
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                        str(HERE / "multidevice" / "check_sharding.py")],
                       cwd=ROOT, env=_env(XLA_FLAGS=flags), capture_output=True, text=True, timeout=1500)  # fmt: skip
    tail = r.stdout[-8000:] + "\n" + r.stderr[-3000:]
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and "skipped" not in r.stdout, tail


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_on_loopback_agree_with_one(tmp_path):
    from multidevice.setups import SITE, sae, sweep_inputs, train_cfg
    from test_sae_train import CHUNK, sparse_data, write_store

    store = write_store(tmp_path / "store", [sparse_data(CHUNK * 4, seed=0)], [SITE])
    port = str(_free_port())
    script = str(HERE / "multidevice" / "two_process.py")
    procs = [subprocess.Popen([sys.executable, script, str(i), port, str(tmp_path / "store"), str(tmp_path)], cwd=ROOT,
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]  # fmt: skip
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in procs), "\n\n".join(o[-4000:] for o in outs)
    got = np.load(tmp_path / "result.npz")

    single = cj.train_sae(sae(), store, train_cfg(), progress=False)
    leaves = jax.tree.leaves(eqx.filter(single.dictionary, eqx.is_array))
    for i, a in enumerate(leaves):
        np.testing.assert_allclose(got[f"arr_{i}"], np.asarray(a), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got["losses"], [r["loss"] for r in single.history], rtol=1e-5)
    model, clean, corrupt, metric = sweep_inputs()
    ref = cj.patch_sweep(model, clean, corrupt, metric, "z", ("layer", "pos", "head"), progress=False, chunk_size=8)
    np.testing.assert_allclose(got["sweep"], ref.raw, rtol=1e-5, atol=1e-5)


def test_a_mesh_larger_than_the_devices_is_refused_with_both_counts():
    n = jax.device_count()
    with pytest.raises(ValueError, match=rf"needs {2 * n} devices; {n} are available"):
        sh.make_mesh(2 * n, 1, 1)
    with pytest.raises(ValueError, match=rf"{n} devices do not divide into data=3 x model=5"):
        sh.make_mesh(data=3, model=5)


def test_divisibility_errors_name_the_sizes_and_the_nearest_valid_ones():
    mesh = sh.make_mesh(1, 1, 1)
    sh.check_divides(7, mesh, "data", "a batch")  # an axis of 1 divides anything
    with pytest.raises(ValueError, match=r"a global batch of 10 does not divide over 4 processes; use a multiple of 4"):
        sh.process_rows(10, 0, 4)
    assert sh.process_rows(12, 2, 4) == slice(6, 9)
    assert sh.round_to(5, None) == 5


def test_init_distributed_refuses_half_of_its_settings():
    with pytest.raises(ValueError, match="needs all of coordinator, num_processes and process_id"):
        sh.init_distributed("127.0.0.1:1234", None, 0)


@pytest.mark.parametrize("spec,msg", [("foo=2", "give axis=size pairs with axes sweep, data, model"),
                                      ("sweep=64", "needs 64 devices")])  # fmt: skip
def test_cli_mesh_errors_come_before_the_model_loads(spec, msg, capsys, tmp_path):
    from circuits_jax.app import cli

    rc = cli.main(["patch", "--model", str(tmp_path / "absent.gguf"), "--clean", "a b", "--corrupt", "a c",
                   "--answer", " x", "--wrong", " y", "--mesh", spec, "--out", str(tmp_path / "z.npz")])  # fmt: skip
    assert rc == 2
    assert msg in capsys.readouterr().err
