"""Inputs shared by the multi-process run and the single-process reference it is compared with."""

import jax
import jax.numpy as jnp
import numpy as np

import circuits_jax as cj

SITE = "blocks.0.hook_resid_post"


def sae():
    return cj.init_sae(16, 64, key=jax.random.key(3, impl="rbg"), arch="topk", k=4, in_site=SITE)


def train_cfg():
    return cj.TrainConfig(n_tokens=64 * 12, batch_size=64, lr=3e-3, warmup_steps=4, dead_after=128, log_every=4,
                          checkpoint_every=6, loss=cj.LossConfig(k_aux=16))  # fmt: skip


def sweep_inputs():
    from conftest import tiny_configs

    cfg = tiny_configs()["llamalike"]
    model = cj.init_model(cfg, key=jax.random.key(0))
    rng = np.random.default_rng(0)
    clean = rng.integers(0, cfg.d_vocab, (4, 7)).astype(np.int32)
    corrupt = clean.copy()
    corrupt[:, 2] = (corrupt[:, 2] + 1) % cfg.d_vocab
    return model, clean, corrupt, cj.LogitDiff(answer=jnp.arange(1, 5), wrong=jnp.arange(5, 9))
