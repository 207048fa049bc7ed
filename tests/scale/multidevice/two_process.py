"""One of two processes of a loopback `jax.distributed` run (2 simulated CPU devices each).

    python two_process.py PROCESS_ID PORT STORE_DIR OUT_DIR

Both processes train the same TopK SAE on a mesh over the 4 global devices (data 2 x model 2),
each reading only its own rows of every batch, and run one patching sweep with prompts split
over `data`; process 0 writes the gathered parameters and the sweep to OUT_DIR/result.npz.
`tests/test_sharding.py` compares them with a single-process run.
"""

import sys
from pathlib import Path

pid, port, store_dir, out_dir = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])

from circuits_jax.scale import _sharding as sh  # noqa: E402

index, count = sh.init_distributed(f"127.0.0.1:{port}", 2, pid, local_devices=2)

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import circuits_jax as cj  # noqa: E402
from circuits_jax.dictionaries._activations import open_store  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from multidevice.setups import sae, sweep_inputs, train_cfg  # noqa: E402

assert (index, count) == (pid, 2) and jax.device_count() == 4 and jax.local_device_count() == 2
mesh = sh.make_mesh(1, 2, 2)
res = cj.train_sae(sae(), open_store(store_dir), train_cfg(), progress=False, mesh=mesh,
                   checkpoint_dir=out_dir / "ckpt")  # fmt: skip
leaves = [np.asarray(multihost_utils.process_allgather(a, tiled=True)) for a in jax.tree.leaves(eqx.filter(res.dictionary, eqx.is_array))]
model, clean, corrupt, metric = sweep_inputs()
sweep = cj.patch_sweep(model, clean, corrupt, metric, "z", ("layer", "pos", "head"), progress=False, chunk_size=8,
                       mesh=sh.make_mesh(2, 2, 1))  # fmt: skip
if index == 0:
    np.savez(out_dir / "result.npz", *leaves, sweep=sweep.raw, losses=np.asarray([r["loss"] for r in res.history]))
print(f"process {index} of {count}: done", flush=True)
