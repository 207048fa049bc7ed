"""One optax loop for every sparse dictionary (SAE, transcoder, cross-layer transcoder).

The train state is `(dictionary, opt_state, since_fired, step)`: `since_fired` counts the
tokens since each latent last fired (dead latents feed AuxK and the dead fraction). One
jitted step computes the loss and gradients, applies the optax update and the
architecture's projection (unit-norm decoder rows, positive thresholds, batchtopk's
threshold EMA). Batches come from `ActivationStore.batches(seed, start=step)`, a pure
function of the step, and the state is checkpointed with orbax every `checkpoint_every`
steps, so a run that is killed resumes from its last checkpoint and reaches the same
parameters as one that never stopped. A checkpoint counts once its `done` marker is written
(after the state and its history); Ctrl-C is held back until a checkpoint being written is
complete, and an old checkpoint loses its marker before it is deleted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..core import Result
from ..models import restore, save
from ..scale import (
    DoesNotFit,
    MemoryPlan,
    abstract,
    check_budget,
    check_divides,
    check_sizes,
    compiled_footprint,
    fmt_bytes,
    global_batch,
    is_leaf_array,
    largest_fitting,
    line_near,
    nbytes,
    need_at_one,
    process_rows,
    search_size,
    shard_dictionary,
    shard_like,
    upto,
)
from ._run import checkpoint_steps, deferred_interrupt, write_json
from ._sae import LossConfig, Stacked, Stats, gather_xy


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train: `n_tokens` in batches of `batch_size`, Adam at `lr` with a linear warm-up
    over `warmup_steps`, then `lr_schedule`: "linear" (constant, then a linear decay to zero
    over the last `decay_frac` of the run), "cosine" (cosine decay to zero) or "constant"."""

    n_tokens: int
    batch_size: int = 1024
    lr: float = 4e-4
    warmup_steps: int = 100
    decay_frac: float = 0.2
    lr_schedule: str = "linear"
    b1: float = 0.9
    b2: float = 0.999
    grad_clip: float | None = 1.0
    seed: int = 0
    dead_after: int = 200_000  # tokens without firing before a latent counts as dead
    loss: LossConfig = LossConfig()
    log_every: int = 50
    checkpoint_every: int = 500
    buffer_chunks: int = 4

    @property
    def steps(self) -> int:
        return max(1, self.n_tokens // self.batch_size)


def schedule(cfg: TrainConfig) -> optax.Schedule:
    steps = cfg.steps
    warm = min(cfg.warmup_steps, steps // 2)
    if cfg.lr_schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(cfg.lr * 1e-2, cfg.lr, max(warm, 1), steps, 0.0)
    if cfg.lr_schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(cfg.lr * 1e-2, cfg.lr, max(warm, 1)), optax.constant_schedule(cfg.lr)], [max(warm, 1)]
        )
    if cfg.lr_schedule != "linear":
        raise ValueError(f"lr_schedule must be 'linear', 'cosine' or 'constant', got {cfg.lr_schedule!r}")
    decay = max(1, int(cfg.decay_frac * steps))
    flat = max(0, steps - warm - decay)
    return optax.join_schedules(
        [optax.linear_schedule(cfg.lr * 1e-2, cfg.lr, max(warm, 1)), optax.constant_schedule(cfg.lr),
         optax.linear_schedule(cfg.lr, 0.0, decay)],
        [max(warm, 1), max(warm, 1) + flat],
    )  # fmt: skip


def optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    adam = optax.adam(schedule(cfg), b1=cfg.b1, b2=cfg.b2)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adam) if cfg.grad_clip else adam


def trainable(d) -> Any:
    """Filter spec: the weights and biases (and jumprelu thresholds); not the normalisation
    scales, nor the thresholds that other architectures set without gradients."""
    spec = jax.tree.map(eqx.is_array, d)
    spec = eqx.tree_at(lambda s: (s.in_scale, s.out_scale), spec, (False, False))
    return eqx.tree_at(lambda s: s.threshold, spec, d.arch == "jumprelu")


class TrainState(eqx.Module):
    dictionary: Any
    opt_state: Any
    since_fired: jax.Array
    step: jax.Array


def init_state(d, cfg: TrainConfig) -> TrainState:
    """A fresh train state; for `Stacked` dictionaries, one optimiser state per member (a leading axis)."""
    init = optimizer(cfg).init
    if isinstance(d, Stacked):  # one optimiser state per member, stacked
        parts = [d.slot(i) for i in range(d.n)]
        opt_state = jax.tree.map(lambda *a: jnp.stack(a), *[init(eqx.filter(m, trainable(m))) for m in parts])
    else:
        opt_state = init(eqx.filter(d, trainable(d)))
    return TrainState(d, opt_state, jnp.zeros(d.threshold.shape, jnp.int32), jnp.zeros((), jnp.int32))


def make_step(cfg: TrainConfig) -> Callable[[TrainState, Any, Any], tuple[TrainState, Stats]]:
    """The jitted training step `(state, x, y) -> (state, stats)`. For `Stacked` dictionaries one compiled
    step runs the one dictionary's step for each member (its own k, L1 coefficient, gradient clipping and Adam
    state, as in separate runs) and `stats` carry the member axis. The members are unrolled in the program,
    not vmapped: under vmap, AuxK's `lax.cond` becomes a select that computes both branches (measured 1.65x
    slower than the members one after another on CPU; unrolled, 1.01x: benchmarks/many_dictionaries.py)."""
    opt = optimizer(cfg)
    hp = cfg.loss

    def one(state: TrainState, x, y, l1=None, k=None):
        """One dictionary's step; `l1` / `k` override its L1 coefficient / k in the loss alone (a `Stacked`
        member keeps the stack's tree structure everywhere else)."""
        d = state.dictionary
        diff, static = eqx.partition(d, trainable(d))
        dead = state.since_fired >= cfg.dead_after
        hp_d = hp if l1 is None else dataclasses.replace(hp, l1_coeff=l1)

        def loss_fn(diff):
            m = eqx.combine(diff, static)
            return (m if k is None else dataclasses.replace(m, k=k)).loss(x, y, dead, hp_d)

        (_, stats), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(diff)
        with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes float and int32
            updates, opt_state = opt.update(grads, state.opt_state, diff)
        d = eqx.combine(eqx.apply_updates(diff, updates), static).project(hp_d, stats)
        since = jnp.where(stats.fired, 0, jnp.minimum(state.since_fired + x.shape[0], 2**30))
        return TrainState(d, opt_state, since, state.step + 1), stats

    @eqx.filter_jit
    def train_step(state: TrainState, x, y):
        d = state.dictionary
        if not isinstance(d, Stacked):
            return one(state, x, y)
        at = lambda tree, i: jax.tree.map(lambda a: a[i], tree)  # noqa: E731
        stack = lambda *trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)  # noqa: E731
        outs = []
        for i in range(d.n):
            xi, yi = (x[i], y[i]) if d.own_inputs else (x, y)
            mine = TrainState(d.slot(i), at(state.opt_state, i), state.since_fired[i], state.step)
            outs.append(one(mine, xi, yi, d.l1s[i], d.ks[i]))
        news = [o[0] for o in outs]
        members = dataclasses.replace(d, members=stack(*[n.dictionary for n in news]))
        state = TrainState(members, stack(*[n.opt_state for n in news]), stack(*[n.since_fired for n in news]), state.step + 1)
        return state, stack(*[o[1] for o in outs])

    return train_step


@dataclasses.dataclass(frozen=True, repr=False)
class TrainResult(Result):
    """What `train` returns: the trained dictionary, its logged history, the wall time and the step it resumed from."""

    dictionary: Any
    history: list[dict]  # one row every `log_every` steps: step, tokens, loss, mse, l0, fve, dead, lr, seconds
    seconds: float  # wall-clock of this call's steps (excluding checkpoint writes)
    resumed_from: int  # step restored from a checkpoint (0 for a fresh run)


_LOGGED = ("loss", "mse", "sparsity", "l0", "fve")


def _save(root: Path, state: TrainState, history: list[dict], keep: int = 2, pending: list | None = None) -> None:
    """`pending`: the stats of the steps since the last history row (float32 values as JSON numbers), so a
    resumed run's next row averages the same steps as an uninterrupted run's."""
    step = int(state.step)
    d = root / f"step_{step:08d}"
    with deferred_interrupt():  # a Ctrl-C now stops the run once this checkpoint is complete
        (d / "done").unlink(missing_ok=True)
        save(d / "state", state)  # every process writes its own shards
        if jax.process_index() != 0:
            return
        write_json(d / "history.json", history)
        write_json(d / "pending.json", [{k: np.asarray(getattr(st, k), np.float32).tolist() for k in _LOGGED}
                                        for st in pending or []])  # fmt: skip
        (d / "done").write_text("")
        for old in checkpoint_steps(root)[:-keep]:
            (root / f"step_{old:08d}" / "done").unlink(missing_ok=True)  # first: no half-deleted checkpoint counts
            shutil.rmtree(root / f"step_{old:08d}", ignore_errors=True)


def _restore(root: Path, like: TrainState) -> tuple[TrainState, list[dict], list] | None:
    steps = checkpoint_steps(root)
    if not steps:
        return None
    d = root / f"step_{steps[-1]:08d}"
    try:
        state = restore(d / "state", like)
    except (ValueError, TypeError, KeyError) as e:  # orbax: another tree structure or other shapes
        raise ValueError(f"the checkpoint {d} holds another training run's state (another width, architecture or "
                         f"dictionary?), not this one's: use another checkpoint directory ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None  # fmt: skip
    pending = json.loads((d / "pending.json").read_text()) if (d / "pending.json").exists() else []
    pending = [SimpleNamespace(**{k: np.asarray(v, np.float32) for k, v in row.items()}) for row in pending]
    return state, json.loads((d / "history.json").read_text()), pending


def _selector(d, store) -> Callable[[tuple[np.ndarray, ...]], tuple[jax.Array, jax.Array]]:
    """Pick the dictionary's `(x, y)` out of a store batch by site name."""
    missing = [s for s in d.in_sites + d.out_sites if s not in store.sites]
    if missing:
        raise ValueError(f"the activation store at {store.path} holds {list(store.sites)}, not {missing}")
    return lambda batch: gather_xy(d, dict(zip(store.sites, batch)))


def train(
    dictionary,
    store,
    cfg: TrainConfig,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    on_log: Callable[[dict], None] | None = None,
    mesh=None,
) -> TrainResult:
    """Train `dictionary` on batches of `store` for `cfg.steps` steps.

    checkpoint_dir: save the train state every `cfg.checkpoint_every` steps and at the end;
        if it holds a checkpoint, resume from the latest one.
    stop_after: end after this many steps in total (to simulate an interruption).
    mesh: a `make_mesh` mesh: tokens split over its `data` axis (the batch size must divide it),
        the dictionary's width (and its Adam state) over `model`. Checkpoints restore onto the
        mesh given, whatever mesh wrote them. Across processes (`init_distributed`), every process
        reads the same seeded batch and keeps its own rows (`process_rows`); `global_batch`
        assembles them.
    """
    if mesh is not None:
        check_divides(cfg.batch_size, mesh, "data", "batch_size")
        dictionary = shard_dictionary(dictionary, mesh)
    state = init_state(dictionary, cfg)
    if mesh is not None:
        state = shard_like(state, state.dictionary, mesh)
    history: list[dict] = []
    root = None if checkpoint_dir is None else Path(checkpoint_dir)
    resumed = 0
    pending: list = []  # stats since the last history row, carried over by a checkpoint
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
        got = _restore(root, state)
        if got is not None:
            state, history, pending = got
            resumed = int(state.step)
    step_fn = make_step(cfg)
    total = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    start = int(state.step)
    batches = store.batches(cfg.batch_size, seed=cfg.seed, start=start, buffer_chunks=cfg.buffer_chunks)
    sched = schedule(cfg)
    inputs = _selector(dictionary, store)
    if mesh is not None:
        rows = process_rows(cfg.batch_size)
        select = inputs
        inputs = lambda batch: tuple(global_batch(np.asarray(a)[rows], mesh) for a in select(batch))  # noqa: E731

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {getattr(dictionary, 'arch', '')}", unit="step", disable=not progress)
    seconds = 0.0
    acc: list = list(pending)
    for step in range(start, total):
        x, y = inputs(next(batches))
        t0 = time.perf_counter()
        state, stats = step_fn(state, x, y)
        acc.append(stats)
        last = step + 1 == total
        if (step + 1) % cfg.log_every == 0 or last:
            jax.block_until_ready(state)
            row = _log_row(acc, state, step + 1, cfg, float(sched(step)))
            acc = []
            history.append(row)
            first = {k: row[k][0] if isinstance(row[k], list) else row[k] for k in ("loss", "l0", "fve", "dead")}
            bar.set_postfix(loss=f"{first['loss']:.4g}", l0=f"{first['l0']:.1f}", fve=f"{first['fve']:.3f}",
                            dead=f"{first['dead']:.3f}")  # fmt: skip
            if on_log is not None:
                on_log(row)
        seconds += time.perf_counter() - t0
        bar.update(1)
        if root is not None and ((step + 1) % cfg.checkpoint_every == 0 or last):
            _save(root, state, history, pending=acc)
    bar.close()
    jax.block_until_ready(state)
    return TrainResult(state.dictionary, history, seconds, resumed)


def _log_row(acc: list[Stats], state: TrainState, step: int, cfg: TrainConfig, lr: float) -> dict:
    """Means since the last row; for `Stacked` dictionaries, a list with one mean per member."""
    many = isinstance(state.dictionary, Stacked)
    out = lambda a: a.tolist() if many else float(a)  # noqa: E731
    m = {k: out(np.mean(np.asarray([getattr(s, k) for s in acc], np.float32), axis=0)) for k in _LOGGED}
    fired_axes = tuple(range(1 if many else 0, state.since_fired.ndim))
    dead = out(np.asarray(jnp.mean(state.since_fired >= cfg.dead_after, axis=fired_axes)))
    return dict(step=step, tokens=step * cfg.batch_size, **m, dead=dead, lr=lr)


def plan_training(
    dictionary,
    train_cfg,
    *,
    budget: int | None = None,
    safety: float = 0.8,
    max_batch: int | None = None,
    sizes: Sequence[int] | None = None,
) -> MemoryPlan:
    """The batch size (tokens per step) to train `dictionary` with `train_cfg` (`TrainConfig`).

    The configured `train_cfg.batch_size` is kept when it fits (a batch size changes the training
    run, so it is not raised behind the user's back; the note says how far it could go); when it
    does not, the plan is the largest power of two whose compile fits. The dictionary's arrays may
    be `jax.ShapeDtypeStruct`s (e.g. `eqx.filter_eval_shape(init_sae, ...)`): nothing is allocated.
    max_batch: cap (default: the power of two at or below `train_cfg.n_tokens`).
    sizes: the two batch sizes compiled first (default: a quarter of the configured one, and it).
    Raises `DoesNotFit` when one token per step does not fit.
    """
    budget = check_budget(budget, safety)
    usable = safety * budget
    configured = int(train_cfg.batch_size)
    if configured < 1:
        raise ValueError(f"train_cfg.batch_size must be >= 1, got {configured}")
    sizes = check_sizes(sizes if sizes is not None else (max(1, max(configured, 2) // 4), max(configured, 2)))
    if max_batch is not None and max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    d = abstract(dictionary)
    dyn, static = eqx.partition(d, is_leaf_array)
    state = jax.eval_shape(lambda dd: init_state(eqx.combine(dd, static), train_cfg), dyn)
    x_shape, y_shape = tuple(d.W_enc.shape[:-1]), tuple(d.b_dec.shape)  # SAE: [D_in], [D_out]; CLT: [L, D], [L, D]
    dtype = d.W_enc.dtype
    step = make_step(train_cfg)

    def bytes_at(n: int) -> int:
        x, y = jax.ShapeDtypeStruct((n, *x_shape), dtype), jax.ShapeDtypeStruct((n, *y_shape), dtype)
        return compiled_footprint(step, state, x, y).total

    measured = {n: bytes_at(n) for n in sizes}
    width = d.W_enc.shape[-1]
    what = f"training a {getattr(d, 'arch', '')} dictionary of width {width} on {list(x_shape)} -> {list(y_shape)}"
    cap = int(max_batch) if max_batch is not None else 1 << max(0, int(train_cfg.n_tokens).bit_length() - 1)
    size = None
    if configured <= cap:
        measured.setdefault(configured, bytes_at(configured))
        if measured[configured] <= usable:
            size = configured
    if size is None:
        proposed = max(1, min(largest_fitting(*line_near(measured, max(measured)), usable), cap))
        size = search_size(bytes_at, measured, 1 << (proposed.bit_length() - 1), usable, pow2=True)
    if size is None:
        need, fixed, per = need_at_one(measured)
        raise DoesNotFit(
            f"{what} does not fit: one token per step needs {fmt_bytes(need)} ({need} bytes; about {fmt_bytes(fixed)} fixed: "
            f"parameters {fmt_bytes(nbytes(d))}, the train state with Adam's moments {fmt_bytes(nbytes(state))} and its updated "
            f"copy, XLA's fixed temporaries; + about {fmt_bytes(per)} per token), over the budget {fmt_bytes(usable)} ({safety:.0%} "
            f"of {fmt_bytes(budget)}). To fit: a smaller width (now {width}), or shard the dictionary over a device mesh with "
            f"a 'model' axis (mesh=)"
        )
    fixed, per = line_near(measured, size)
    limit = largest_fitting(fixed, per, usable)
    if size == configured:
        note = f"the configured batch size fits ({upto(limit)} would, by the line)"
    elif configured > cap:
        note = f"the configured batch size {configured} exceeds the cap {cap}: the largest power of two under it that fits"
    else:
        note = (f"the configured batch size {configured} does not fit (it needs {fmt_bytes(measured[configured])}): "
                "the largest power of two that fits")  # fmt: skip
    return MemoryPlan(what, "token", int(size), measured[size], fixed, per, budget, safety,
                      tuple(sorted(measured.items())), int(limit), note)  # fmt: skip
