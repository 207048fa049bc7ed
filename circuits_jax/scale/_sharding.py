"""Device meshes: sweeps, training and models spread over many devices with JAX's own engine.

Nothing here runs a computation. A mesh has three named axes, `sweep`, `data` and
`model`, and this module only *places* arrays on it with `NamedSharding`s; the compiled
sweeps and training steps are the ordinary ones, and XLA's SPMD partitioner (GSPMD)
splits them because their inputs are split:

- **sweep**: the rows of a patching sweep (patch indices) — each device scores its own
  rows, no communication until the results are gathered;
- **data**: the prompt batch of a sweep, the token batch of dictionary training, the
  examples of DAS — gradients are all-reduced by XLA;
- **model**: tensor parallelism — attention heads (or, when the head count does not
  divide, the head dimension), MLP columns and the vocabulary of the embeddings; a
  dictionary's width. Norm weights and biases of the residual stream are replicated.

Sizes that do not divide are handled by name: sweep rows are padded (repeating a row,
the result of which is dropped), a batch that does not divide the `data` axis is refused
with both sizes named, and a weight whose axis does not divide the `model` axis falls back
to its next candidate axis, then to replication (`layout` lists what each weight got).

Multi-host: `init_distributed` starts `jax.distributed` from the environment;
`global_batch` assembles each process's rows into one global array
(`jax.make_array_from_process_local_data`), and `process_rows` says which rows of a
global batch a process holds, so every process reads only its own slice of a store.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import equinox as eqx
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("sweep", "data", "model")

# Tensor-parallel candidates for each weight of `Transformer` / `Blocks`: the axes tried in
# order for the `model` mesh axis (first one that divides wins; none: replicated).
_MODEL_RULES: dict[str, tuple[int, ...]] = {
    "W_Q": (1, 3), "b_Q": (1, 2), "W_O": (1, 2),  # [L, H, D, E], [L, H, E], [L, H, E, D]: heads, else d_head
    "W_K": (1, 3), "b_K": (1, 2), "W_V": (1, 3), "b_V": (1, 2),  # kv heads, else d_head
    "W_in": (2,), "b_in": (1,), "W_gate": (2,), "b_gate": (1,), "W_out": (1,),  # MLP columns
    "W_E": (0,), "W_U": (1,), "b_U": (0,),  # vocabulary
}  # fmt: skip

# A dictionary's width axis (SAE / transcoder, then cross-layer transcoder) for the `model` axis.
_WIDTH_RULES: dict[str, tuple[int, ...]] = {
    "W_enc": (-1,), "b_enc": (-1,), "W_dec": (-2,), "threshold": (-1,),
}  # fmt: skip


def make_mesh(sweep: int | None = None, data: int = 1, model: int = 1, *, devices: Sequence | None = None) -> Mesh:
    """A `Mesh` with axes `("sweep", "data", "model")` over `devices` (default: all of them).

    `sweep=None` takes whatever `data * model` leaves; with every size given, the first
    `sweep * data * model` devices are used (scaling studies run on a subset). Axes are `Auto` (GSPMD propagates
    shardings through the ordinary programs; nothing here needs explicit-sharding types).
    """
    for axis, size in (("sweep", sweep), ("data", data), ("model", model)):
        if size is None and axis == "sweep":
            continue
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
            raise TypeError(f"make_mesh: the {axis} axis size must be an integer >= 1, got {size!r}")
        if size < 1:
            raise ValueError(f"make_mesh: the {axis} axis size must be at least 1, got {size}")
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if sweep is None:
        if n % (data * model):
            raise ValueError(f"{n} devices do not divide into data={data} x model={model}; give sizes whose product divides {n}")
        sweep = n // (data * model)
    if sweep * data * model > n:
        raise ValueError(
            f"mesh sweep={sweep} x data={data} x model={model} needs {sweep * data * model} devices; {n} are available"
            + (" (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N simulates N devices)" if jax.default_backend() == "cpu" else "")
        )
    grid = np.asarray(devices[: sweep * data * model], dtype=object).reshape(sweep, data, model)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * 3)


def axis_size(mesh: Mesh | None, axis: str) -> int:
    """Size of a mesh axis (1 without a mesh or without that axis)."""
    if mesh is None or axis not in mesh.shape:
        return 1
    return int(mesh.shape[axis])


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every array of `tree` on every device of `mesh` (other leaves untouched)."""
    rep = NamedSharding(mesh, P())
    return jax.tree.map(lambda a: jax.device_put(a, rep) if _is_array(a) else a, tree)


def _spec_for(shape, candidates, size) -> tuple[P, int | None]:
    for ax in candidates:
        ax = ax % len(shape)
        if shape[ax] % size == 0:
            spec = [None] * len(shape)
            spec[ax] = "model"
            return P(*spec), ax
    return P(), None


def _named(tree) -> dict[str, Any]:
    """Leaves of an equinox module (and its `blocks`) by field name."""
    out = {}
    for obj in (tree, getattr(tree, "blocks", None)):
        if obj is None:
            continue
        for f in getattr(obj, "__dataclass_fields__", {}):
            v = getattr(obj, f, None)
            if _is_array(v):
                out[f] = v
    return out


def layout(tree: Any, mesh: Mesh, rules: dict[str, tuple[int, ...]] | None = None) -> dict[str, tuple[tuple[int, ...], P]]:
    """`{field: (shape, PartitionSpec)}`: where each weight of a model (or dictionary) goes on `mesh`."""
    if rules is None:
        rules = _WIDTH_RULES if hasattr(tree, "W_enc") else _MODEL_RULES
    return {name: (tuple(a.shape), _field_spec(name, a.shape, mesh, rules)) for name, a in _named(tree).items()}


def _field_spec(name: str, shape, mesh: Mesh, rules) -> P:
    size = axis_size(mesh, "model")
    return _spec_for(shape, rules[name], size)[0] if size > 1 and name in rules else P()


def field_sharding(name: str, shape, mesh: Mesh) -> NamedSharding:
    """Where the model weight `name` (a `Transformer` / `Blocks` field) of `shape` goes on `mesh`, as `layout`
    places it: for loaders that build a model one field at a time straight into its shards."""
    return NamedSharding(mesh, _field_spec(name, tuple(shape), mesh, _MODEL_RULES))


def _map_fields(tree, mesh, specs, fn):
    """`tree` with each named weight `a` replaced by `fn(a, its NamedSharding)`."""

    def put(obj):
        names = [f for f in getattr(obj, "__dataclass_fields__", {}) if _is_array(getattr(obj, f, None))]
        vals = [fn(getattr(obj, f), NamedSharding(mesh, specs[f][1])) for f in names]
        return eqx.tree_at(lambda o: [getattr(o, f) for f in names], obj, vals) if names else obj

    tree = put(tree)
    if getattr(tree, "blocks", None) is not None:
        tree = eqx.tree_at(lambda t: t.blocks, tree, put(tree.blocks))
    return tree


def shard_model(model, mesh: Mesh):
    """The model's weights placed on `mesh`: tensor-parallel over `model` (heads, MLP columns,
    vocabulary; see `layout`), replicated over `sweep` and `data`."""
    return _map_fields(model, mesh, layout(model, mesh, _MODEL_RULES), jax.device_put)


def model_shardings(model, mesh: Mesh):
    """The model (real or `jax.eval_shape` arrays) with each weight replaced by its `NamedSharding`."""
    return _map_fields(model, mesh, layout(model, mesh, _MODEL_RULES), lambda a, s: s)


def shard_dictionary(d, mesh: Mesh):
    """A dictionary (SAE, transcoder, cross-layer transcoder) with its width over `model`."""
    return _map_fields(d, mesh, layout(d, mesh, _WIDTH_RULES), jax.device_put)


def shard_like(tree: Any, params: Any, mesh: Mesh) -> Any:
    """Place `tree`'s arrays with the sharding of the same-shaped array of `params` (an optimiser
    state mirrors its parameters); anything else is replicated."""
    by_shape: dict[tuple, Any] = {}
    for a in jax.tree.leaves(params):
        if isinstance(a, jax.Array) and isinstance(a.sharding, NamedSharding):
            by_shape.setdefault(tuple(a.shape), a.sharding)
    rep = NamedSharding(mesh, P())
    return jax.tree.map(lambda a: jax.device_put(a, by_shape.get(tuple(a.shape), rep)) if _is_array(a) else a, tree)


def check_divides(n: int, mesh: Mesh | None, axis: str, what: str) -> None:
    """Refuse, naming both sizes, when `n` items cannot split evenly over a mesh axis."""
    size = axis_size(mesh, axis)
    if n % size:
        lo, hi = (n // size) * size, math.ceil(n / size) * size
        near = f"{lo} or {hi}" if lo else f"{hi}"
        raise ValueError(
            f"{what} of {n} does not divide over the mesh's {axis!r} axis of size {size}; use {near} "
            f"(or a mesh whose {axis!r} axis divides {n})"
        )


def shard_batch(x, mesh: Mesh, *, axis: int = 0, what: str = "a batch"):
    """`x` split over the `data` axis along `axis` (refused, with the sizes, when it does not divide)."""
    if x is None:
        return None
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    check_divides(x.shape[axis], mesh, "data", what)
    spec = [None] * x.ndim
    spec[axis] = "data"
    return jax.device_put(x, NamedSharding(mesh, P(*spec)))


def round_to(n: int, mesh: Mesh | None, axis: str = "sweep") -> int:
    """`n` rounded up to a multiple of a mesh axis (a chunk of sweep rows every device gets a share of)."""
    size = axis_size(mesh, axis)
    return math.ceil(max(n, 1) / size) * size


def shard_rows(rows, mesh: Mesh):
    """Sweep rows `[C, k]` split over the `sweep` axis (`C` a multiple of its size, see `round_to`)."""
    rows = np.asarray(rows)
    check_divides(rows.shape[0], mesh, "sweep", "a chunk of sweep rows")
    return jax.device_put(rows, NamedSharding(mesh, P("sweep")))


def to_host(x) -> np.ndarray:
    """`x` as a NumPy array on every process, gathering the shards other processes hold."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def gather(tree: Any) -> Any:
    """Every array of `tree` whole on the default device (after training on a mesh, for single-device use)."""
    import jax.numpy as jnp

    return jax.tree.map(lambda a: jnp.asarray(to_host(a)) if isinstance(a, jax.Array) else a, tree)


def per_device_bytes(tree: Any) -> int:
    """Bytes of `tree`'s arrays held by the first device (what one device must hold of it)."""
    total = 0
    for a in jax.tree.leaves(tree):
        if isinstance(a, jax.Array):
            shard = a.addressable_shards[0].data
            total += shard.size * shard.dtype.itemsize
    return total


# ----------------------------------------------------------------------------------------------
# multi-host


def init_distributed(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
                     *, local_devices: int | None = None) -> tuple[int, int]:  # fmt: skip
    """Start `jax.distributed` (once per process) and return `(process_index, process_count)`.

    Arguments default to `CIRCUITS_JAX_COORDINATOR` (`host:port`), `CIRCUITS_JAX_NUM_PROCESSES`
    and `CIRCUITS_JAX_PROCESS_ID`; with none of them set, JAX detects the cluster itself (TPU pod
    slices, SLURM, Open MPI). On CPU, `local_devices` simulates that many devices per process
    and the processes talk through gloo (loopback tests).
    """
    env = os.environ
    coordinator = coordinator or env.get("CIRCUITS_JAX_COORDINATOR")
    if num_processes is None and "CIRCUITS_JAX_NUM_PROCESSES" in env:
        num_processes = int(env["CIRCUITS_JAX_NUM_PROCESSES"])
    if process_id is None and "CIRCUITS_JAX_PROCESS_ID" in env:
        process_id = int(env["CIRCUITS_JAX_PROCESS_ID"])
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ValueError(
            "init_distributed needs all of coordinator, num_processes and process_id (or the environment "
            "variables CIRCUITS_JAX_COORDINATOR, CIRCUITS_JAX_NUM_PROCESSES, CIRCUITS_JAX_PROCESS_ID), or none "
            f"of them to let JAX detect the cluster; got coordinator={coordinator}, num_processes={num_processes}, "
            f"process_id={process_id}"
        )
    if local_devices is None and "CIRCUITS_JAX_LOCAL_DEVICES" in env:
        local_devices = int(env["CIRCUITS_JAX_LOCAL_DEVICES"])
    if local_devices is not None:
        jax.config.update("jax_num_cpu_devices", local_devices)
    if jax.config.jax_platforms in (None, "", "cpu") or local_devices is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if all(given):
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    else:
        jax.distributed.initialize()
    return jax.process_index(), jax.process_count()


def process_rows(n: int, process: int | None = None, count: int | None = None) -> slice:
    """The rows of a global batch of `n` that process `process` of `count` holds (contiguous, equal)."""
    process = jax.process_index() if process is None else process
    count = jax.process_count() if count is None else count
    if n % count:
        raise ValueError(f"a global batch of {n} does not divide over {count} processes; use a multiple of {count}")
    per = n // count
    return slice(process * per, (process + 1) * per)


def global_batch(local, mesh: Mesh, *, axis: str = "data"):
    """One global array from each process's rows (`local`, its `process_rows` slice), split over `axis`.

    In a single process this is `shard_batch`; across processes, `jax.make_array_from_process_local_data`.
    """
    local = np.asarray(local)
    sharding = NamedSharding(mesh, P(axis, *([None] * (local.ndim - 1))))
    n = local.shape[0] * jax.process_count()
    check_divides(n, mesh, axis, "a global batch")
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, local, (n, *local.shape[1:]))
