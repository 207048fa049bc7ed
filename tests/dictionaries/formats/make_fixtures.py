"""Make the dictionary-format fixtures `tests/dictionaries/test_formats.py` reads, with the real libraries.

    python tests/dictionaries/formats/make_fixtures.py      # rewrites tests/dictionaries/formats/<name>/

Needs `sae-lens` (6.5x) and `eai-sparsify` importable, plus circuits_jax. sae-lens 6 wants transformer-lens < 4
while the peers extra has 4.3, so it runs from a side environment that sees the project's packages:

    python3 -m venv /tmp/saelens-env
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/saelens-env/lib/python3.11/site-packages/main.pth
    /tmp/saelens-env/bin/pip install --no-deps transformer-lens==3.9.0 sae-lens==6.54.12 better-abc fancy-einsum \
        "typeguard<5" beartype docstring-parser
    .venv/bin/pip install --no-deps eai-sparsify==1.3.3 natsort schedulefree simple-parsing
    /tmp/saelens-env/bin/python tests/dictionaries/formats/make_fixtures.py

For each SAELens architecture and for sparsify (an SAE and a skip transcoder): random weights (non-zero biases,
thresholds that cut, `apply_b_dec_to_input` on), saved by the library's own `save_model` / `save_to_disk`, and
`expected.npz` with inputs `x` and that library's own feature activations and outputs on them. For the round
trip, `ours_<arch>/`: a circuits_jax dictionary (`fixture_dictionary`, deterministic) exported with
`cj.save_saelens`, then loaded by SAELens's `SAE.load_from_disk`, whose activations and outputs are stored.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parents[2]))  # circuits_jax itself, when run from a side environment
D_IN, D_OUT, F, K, N = 16, 12, 24, 5, 9


def _inputs(d_in, seed):
    return np.random.default_rng(seed).normal(size=(N, d_in)).astype(np.float32)


def _randomise(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "threshold" not in name else 0.5))
            if "threshold" in name:
                p.abs_()


def saelens_fixtures():
    from sae_lens import SAE
    from sae_lens.saes import (GatedSAE, GatedSAEConfig, JumpReLUSAE, JumpReLUSAEConfig, JumpReLUSkipTranscoderConfig,
                               JumpReLUTranscoderConfig, SkipTranscoderConfig, StandardSAE, StandardSAEConfig,
                               TopKSAE, TopKSAEConfig, TranscoderConfig)  # fmt: skip
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.transcoder import JumpReLUSkipTranscoder, JumpReLUTranscoder, SkipTranscoder, Transcoder

    meta = SAEMetadata(hook_name="blocks.1.hook_resid_post", model_name="tiny")
    tmeta = SAEMetadata(hook_name="blocks.1.ln2.hook_normalized", hook_name_out="blocks.1.hook_mlp_out", model_name="tiny")
    cases = {
        "standard": (StandardSAE, StandardSAEConfig(d_in=D_IN, d_sae=F, metadata=meta)),
        "topk": (TopKSAE, TopKSAEConfig(d_in=D_IN, d_sae=F, k=K, metadata=meta)),
        "topk_rescaled": (TopKSAE, TopKSAEConfig(d_in=D_IN, d_sae=F, k=K, rescale_acts_by_decoder_norm=True, metadata=meta)),
        "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig(d_in=D_IN, d_sae=F, metadata=meta)),
        "gated": (GatedSAE, GatedSAEConfig(d_in=D_IN, d_sae=F, metadata=meta)),
        "transcoder": (Transcoder, TranscoderConfig(d_in=D_IN, d_out=D_OUT, d_sae=F, apply_b_dec_to_input=False, metadata=tmeta)),
        "skip_transcoder": (SkipTranscoder, SkipTranscoderConfig(d_in=D_IN, d_out=D_OUT, d_sae=F, apply_b_dec_to_input=False, metadata=tmeta)),
        "jumprelu_transcoder": (JumpReLUTranscoder, JumpReLUTranscoderConfig(d_in=D_IN, d_out=D_OUT, d_sae=F, apply_b_dec_to_input=False, metadata=tmeta)),
        "jumprelu_skip_transcoder": (JumpReLUSkipTranscoder,
                                     JumpReLUSkipTranscoderConfig(d_in=D_IN, d_out=D_OUT, d_sae=F, apply_b_dec_to_input=False, metadata=tmeta)),
    }  # fmt: skip
    for i, (name, (cls, cfg)) in enumerate(cases.items()):
        sae = cls(cfg)
        _randomise(sae, i)
        out = HERE / "saelens" / name
        shutil.rmtree(out, ignore_errors=True)
        sae.save_model(out)
        loaded = SAE.load_from_disk(out)  # what a user of SAELens gets from these files
        _expect(out, loaded, _inputs(D_IN, 100 + i))


def _expect(out: Path, sae, x: np.ndarray):
    with torch.no_grad():
        xt = torch.tensor(x)
        acts, y = sae.encode(xt), sae(xt)
    np.savez(out / "expected.npz", x=x, acts=acts.numpy(), out=y.numpy())


def round_trip_fixtures():
    """Ours, exported to SAELens's format, read by SAELens."""
    from sae_lens import SAE
    from test_formats import OURS, fixture_dictionary

    import circuits_jax as cj

    for name in OURS:
        out = HERE / "saelens" / f"ours_{name}"
        shutil.rmtree(out, ignore_errors=True)
        cj.save_saelens(fixture_dictionary(name), out, model_name="tiny")
        theirs = SAE.load_from_disk(out)
        _expect(out, theirs, _inputs(D_IN, 200))
        state = {k: v.detach().numpy() for k, v in theirs.state_dict().items()}
        np.savez(out / "loaded_state.npz", **state)  # what SAELens holds after reading our files


def sparsify_fixtures():
    from sparsify import SparseCoder, SparseCoderConfig

    for i, (name, transcode, skip) in enumerate([("layers.1", False, False), ("skip_transcoder", True, True)]):
        sae = SparseCoder(D_IN, SparseCoderConfig(num_latents=F, k=K, transcode=transcode, skip_connection=skip))
        _randomise(sae, 50 + i)
        out = HERE / "sparsify" / name
        shutil.rmtree(out, ignore_errors=True)
        sae.save_to_disk(out)
        loaded = SparseCoder.load_from_disk(out)
        x = _inputs(D_IN, 300 + i)
        with torch.no_grad():
            xt = torch.tensor(x)
            enc = loaded.encode(xt)
            acts = torch.zeros(N, F).scatter(1, enc.top_indices, enc.top_acts)
            y = loaded(xt).sae_out
        np.savez(out / "expected.npz", x=x, acts=acts.numpy(), out=y.numpy())
    (HERE / "sparsify" / "README").write_text(json.dumps({"sparsify": "1.3.3", "made_by": Path(__file__).name}))


if __name__ == "__main__":
    saelens_fixtures()
    round_trip_fixtures()
    sparsify_fixtures()
    print("wrote", sorted(str(p.relative_to(HERE)) for p in HERE.glob("*/*")))
