"""Quality against a ground truth: our TopK, BatchTopK and Matryoshka SAEs against SAELens's own trainer on
SAELens's synthetic data (its `synthetic` module: a feature dictionary of known directions, an activation
generator, and its evaluation: MCC, L0, dead latents, shrinkage, explained variance), same data, same token
budget, one process.

Both sides draw the same stream: the generator is reseeded before each run, and each run draws its batches
with `ActivationGenerator.sample(batch)` through the feature dictionary, in the same order. SAELens trains with
`train_toy_sae` (its SAETrainer: Adam, constant lr); ours with `make_step` (Adam, constant lr after one warm-up
step, gradient clipping at 1, AuxK as in training runs). Both are then scored by SAELens's
`eval_sae_on_synthetic_data` on the same held-out draw: ours after `cj.save_saelens` and SAELens's own
`SAE.load_from_disk` (so it is judged as SAELens runs it), SAELens's after its `save_inference_model`.

Needs sae-lens, which pins transformer-lens < 4, so it runs from the side environment that
`tests/dictionaries/formats/make_fixtures.py` describes:

    /tmp/saelens-env/bin/python benchmarks/synthetic_sae.py --json benchmarks/results/synthetic_sae.json
    /tmp/saelens-env/bin/python benchmarks/synthetic_sae.py --tokens 50000        # smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # circuits_jax, from a side environment

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sae_lens import SAE  # noqa: E402
from sae_lens.saes import (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, MatryoshkaBatchTopKTrainingSAE,  # noqa: E402
                           MatryoshkaBatchTopKTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig)  # fmt: skip
from sae_lens.synthetic import ActivationGenerator, FeatureDictionary, eval_sae_on_synthetic_data, train_toy_sae  # noqa: E402

import circuits_jax as cj  # noqa: E402
from circuits_jax.dictionaries import LossConfig, TrainConfig, init_sae, init_state, make_step  # noqa: E402


def world(a):
    torch.manual_seed(a.seed)
    fd = FeatureDictionary(a.features, a.d, seed=a.seed)
    probs = torch.tensor(np.geomspace(a.p_max, a.p_min, a.features), dtype=torch.float32)  # a long tail, as in text
    gen = ActivationGenerator(a.features, probs, std_firing_magnitudes=0.2, mean_firing_magnitudes=1.0)
    return fd, gen


def theirs(arch, a, fd, gen):
    widths = sorted({a.width // 8, a.width // 4, a.width // 2, a.width})
    cfg, cls = {
        "topk": (TopKTrainingSAEConfig(d_in=a.d, d_sae=a.width, k=a.k), TopKTrainingSAE),
        "batchtopk": (BatchTopKTrainingSAEConfig(d_in=a.d, d_sae=a.width, k=a.k), BatchTopKTrainingSAE),
        "matryoshka": (MatryoshkaBatchTopKTrainingSAEConfig(d_in=a.d, d_sae=a.width, k=a.k, matryoshka_widths=widths),
                       MatryoshkaBatchTopKTrainingSAE),
    }[arch]  # fmt: skip
    torch.manual_seed(a.seed + 1)
    sae = cls(cfg)
    torch.manual_seed(a.seed + 2)  # the data stream
    t0 = time.perf_counter()
    train_toy_sae(sae, fd, gen, training_samples=a.tokens, batch_size=a.batch, lr=a.lr)
    seconds = time.perf_counter() - t0
    d = Path(tempfile.mkdtemp())
    sae.save_inference_model(d)
    return SAE.load_from_disk(d), seconds


def ours(arch, a, fd, gen):
    prefixes = tuple(w / a.width for w in sorted({a.width // 8, a.width // 4, a.width // 2}))
    d = init_sae(a.d, a.width, key=jax.random.key(a.seed + 1), arch=arch, k=a.k)
    cfg = TrainConfig(n_tokens=a.tokens, batch_size=a.batch, lr=a.lr, warmup_steps=1, lr_schedule="constant",
                      dead_after=a.batch * 1000, loss=LossConfig(prefixes=prefixes))  # fmt: skip
    step, state = make_step(cfg), init_state(d, cfg)
    torch.manual_seed(a.seed + 2)  # the same stream as SAELens's run
    t0 = time.perf_counter()
    for _ in range(cfg.steps):
        with torch.no_grad():
            x = jnp.asarray(fd(gen.sample(a.batch)).numpy())
        state, _ = step(state, x, x)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - t0
    out = Path(tempfile.mkdtemp())
    cj.save_saelens(state.dictionary, out)
    return SAE.load_from_disk(out), seconds


def score(sae, fd, gen, a):
    torch.manual_seed(a.seed + 99)  # one held-out draw for every SAE
    r = eval_sae_on_synthetic_data(sae, fd, gen, num_samples=a.eval_samples, batch_size=4096)
    return dict(mcc=float(r.mcc), l0=float(r.sae_l0), true_l0=float(r.true_l0), dead=int(r.dead_latents),
                shrinkage=float(r.shrinkage), explained_variance=float(r.explained_variance))  # fmt: skip


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="topk,batchtopk,matryoshka")
    ap.add_argument("--features", type=int, default=512, help="true features")
    ap.add_argument("--d", type=int, default=128, help="hidden size")
    ap.add_argument("--width", type=int, default=512, help="SAE latents")
    ap.add_argument("--k", type=int, default=12)
    ap.add_argument("--p-max", type=float, default=0.2)
    ap.add_argument("--p-min", type=float, default=0.002)
    ap.add_argument("--tokens", type=int, default=3_000_000)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--eval-samples", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    fd, gen = world(a)
    rows = []
    for arch in a.archs.split(","):
        for who, fn in (("SAELens", theirs), ("circuits_jax", ours)):
            sae, seconds = fn(arch, a, fd, gen)
            row = dict(arch=arch, trainer=who, seconds=seconds, **score(sae, fd, gen, a))
            rows.append(row)
            print(f"{arch:11s} {who:12s} MCC {row['mcc']:.3f}  L0 {row['l0']:.2f} (true {row['true_l0']:.2f})  dead "
                  f"{row['dead']:4d}  shrinkage {row['shrinkage']:.3f}  FVE {row['explained_variance']:.3f}  "
                  f"{seconds:.0f} s", flush=True)  # fmt: skip
    if a.json:
        Path(a.json).write_text(json.dumps(dict(args=vars(a), rows=rows), indent=1))


if __name__ == "__main__":
    main()
