"""Every Hugging Face family against `transformers` itself, on the tiny random fixtures of
`tests/models/families/` (made by `families/make_fixtures.py`): logits, every hidden state and every
attention pattern equal HF's to 1e-5 in float32; a left-padded batch equals each prompt run alone; export
and reload in transformers round-trips the weights exactly and gives HF's logits again."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import circuits_jax as cj

FIXTURES = Path(__file__).parent / "families"
FAMILIES = sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").exists())
TOL = 1e-5


def _sites(cfg) -> list[str]:
    L = cfg.n_layers
    return ([f"blocks.{l}.hook_resid_pre" for l in range(L)] + [f"blocks.{l}.attn.hook_pattern" for l in range(L)]
            + ["ln_final.hook_normalized"])  # fmt: skip


def _hidden(model, cache, row) -> np.ndarray:
    """HF's hidden states: the stream entering each layer, then the final norm's output."""
    L = model.cfg.n_layers
    last = np.asarray(cache["ln_final.hook_normalized"][row]) * np.asarray(model.lnf_w)
    if model.lnf_b is not None:
        last = last + np.asarray(model.lnf_b)
    return np.stack([np.asarray(cache[f"blocks.{l}.hook_resid_pre"][row]) for l in range(L)] + [last])


def _patterns(model, cache, row) -> np.ndarray:
    return np.stack([np.asarray(cache[f"blocks.{l}.attn.hook_pattern"][row]) for l in range(model.cfg.n_layers)])


@pytest.mark.slow_after_first
@pytest.mark.parametrize("name", FAMILIES)
def test_family_matches_transformers(name, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = FIXTURES / name
    ref = np.load(path / "reference.npz")
    model = cj.load_hf(path)
    a, b = ref["tokens_a"], ref["tokens_b"]
    T, pad = len(a), len(a) - len(b)

    # a batch: prompt a, and prompt b left-padded to a's length
    tokens = np.stack([a, np.concatenate([np.zeros(pad, np.int32), b])])
    mask = np.stack([np.ones(T, bool), np.arange(T) >= pad])
    out = cj.run(model, jnp.asarray(tokens), attention_mask=jnp.asarray(mask), cache=_sites(model.cfg))
    for row, key, sl in ((0, "a", slice(None)), (1, "b", slice(pad, None))):
        np.testing.assert_allclose(np.asarray(out.logits[row])[sl], ref[f"logits_{key}"], rtol=0, atol=TOL)
        np.testing.assert_allclose(_hidden(model, out.cache, row)[:, sl], ref[f"hidden_{key}"], rtol=0, atol=TOL)
        np.testing.assert_allclose(_patterns(model, out.cache, row)[:, :, sl, sl], ref[f"attn_{key}"], rtol=0, atol=TOL)
    # no real token attends to the padding, and prompt b alone equals its padded row
    assert float(np.abs(_patterns(model, out.cache, 1)[:, :, pad:, :pad]).max()) == 0.0
    alone = cj.run(model, jnp.asarray(b)[None], cache=_sites(model.cfg))
    np.testing.assert_allclose(np.asarray(out.logits[1])[pad:], np.asarray(alone.logits[0]), rtol=0, atol=TOL)
    np.testing.assert_allclose(_patterns(model, out.cache, 1)[:, :, pad:, pad:], _patterns(model, alone.cache, 0),
                               rtol=0, atol=TOL)  # fmt: skip

    # export: transformers loads exactly the fixture's weights and computes its logits again; we reload the same
    exported = cj.export_hf(model, tmp_path / name)
    again = cj.load_hf(exported)
    assert again.cfg == model.cfg
    assert cj.tree_allclose(model, again, rtol=0, atol=0)
    load = transformers.AutoModelForCausalLM.from_pretrained
    hf, original = load(exported, attn_implementation="eager").eval(), load(path).state_dict()
    theirs = hf.state_dict()
    assert theirs.keys() == original.keys()
    for k, v in original.items():
        np.testing.assert_array_equal(theirs[k].numpy(), v.numpy(), err_msg=k)
    with torch.no_grad():
        logits = hf(torch.tensor(a[None].astype(np.int64))).logits[0].numpy()
    np.testing.assert_allclose(logits, ref["logits_a"], rtol=0, atol=1e-6)


def test_sharded_export_and_load(tmp_path):
    """A sharded HF directory (the fixture's own, written by transformers) loads; export can shard; a missing
    shard is named."""
    transformers = pytest.importorskip("transformers")
    src = FIXTURES / "mistral"
    assert (src / "model.safetensors.index.json").exists()
    model = cj.load_hf(src)
    out = cj.export_hf(model, tmp_path / "m", shard_size=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (out / "model.safetensors").exists()
    assert cj.tree_allclose(cj.load_hf(out), model, rtol=0, atol=0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    np.testing.assert_array_equal(hf.state_dict()["lm_head.weight"].numpy(), np.asarray(model.W_U).T)
    (out / files[1]).unlink()
    with pytest.raises(FileNotFoundError, match=files[1]):
        cj.load_hf(out)


@pytest.mark.parametrize("family", ["mistral", "pythia", "phi3", "tiny_gpt2"])
def test_a_directory_is_read_one_tensor_at_a_time_each_once(family, monkeypatch, reference):
    """`load_hf` streams: every tensor of the files (mistral's are sharded) is read exactly once, fused ones
    (NeoX's query_key_value, Phi-3's qkv_proj and gate_up_proj, GPT-2's c_attn) included, as the model's field
    that needs it is built: the reads come in field order, not all up front."""
    from circuits_jax.models import _hf
    from safetensors import safe_open

    path = reference / family if family == "tiny_gpt2" else FIXTURES / family
    reads = []
    original = _hf._tensor_reader

    def counting(f, handle, name):
        read = original(f, handle, name)
        return lambda: (reads.append(name), read())[1]

    monkeypatch.setattr(_hf, "_tensor_reader", counting)
    model = cj.load_hf(path)
    names = [n for f in sorted(path.glob("*.safetensors")) for n in safe_open(str(f), framework="flax").keys()]
    assert sorted(reads) == sorted(n for n in names if n != "lm_head.weight" or not model.cfg.tied_embeddings)
    assert len(reads) == len(set(reads))  # each tensor once
    per_layer = [m.groups() for m in map(re.compile(r"\.(\d+)\.(.+)$").search, reads) if m]  # (layer, rest of name)
    assert per_layer[0][1] == per_layer[1][1] and (per_layer[0][0], per_layer[1][0]) == ("0", "1")  # field by field


def test_unsupported_model_type_and_rope_type_are_named(tmp_path):
    cfg = json.loads((FIXTURES / "llama3" / "config.json").read_text())
    with pytest.raises(NotImplementedError, match="model_type 'mamba' is not supported; supported: gpt2, llama"):
        cj.models.config_from_hf({**cfg, "model_type": "mamba"})
    bad = {**cfg, "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "factor": 2.0}}
    with pytest.raises(ValueError, match="'longrope' is not supported; supported: default, linear, dynamic, yarn, llama3"):
        cj.models.config_from_hf(bad)


def test_new_sites_read_what_enters_the_stream():
    """Gemma 3: q/k after their norms are sites; hook_attn_out / hook_mlp_out are the post-norms' outputs."""
    model = cj.load_hf(FIXTURES / "gemma3")
    toks = jnp.asarray(np.load(FIXTURES / "gemma3" / "reference.npz")["tokens_b"])[None]
    names = ["blocks.1.attn.hook_q_normed", "blocks.1.attn.hook_k_normed", "blocks.1.ln1_post.hook_normalized",
             "blocks.1.hook_attn_out", "blocks.1.ln2_post.hook_normalized", "blocks.1.hook_mlp_out",
             "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]  # fmt: skip
    c = cj.run(model, toks, cache=names).cache
    b = model.blocks
    np.testing.assert_allclose(c["blocks.1.hook_attn_out"], c["blocks.1.ln1_post.hook_normalized"] * b.ln1_post_w[1],
                               atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(c["blocks.1.hook_mlp_out"], c["blocks.1.ln2_post.hook_normalized"] * b.ln2_post_w[1],
                               atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(c["blocks.1.hook_resid_post"],
                               c["blocks.1.hook_resid_pre"] + c["blocks.1.hook_attn_out"] + c["blocks.1.hook_mlp_out"],
                               atol=1e-5)  # fmt: skip
    q = np.asarray(c["blocks.1.attn.hook_q_normed"]) / np.asarray(b.q_norm_w[1])
    np.testing.assert_allclose(np.sqrt(np.mean(q * q, -1)), 1.0, atol=1e-3)  # unit RMS per head before the weight


def test_generation_with_local_and_global_layers_matches_the_full_pass():
    """Gemma 3's sliding window and per-layer RoPE through the KV cache, from a left-padded batch."""
    model = cj.load_hf(FIXTURES / "gemma3")
    ref = np.load(FIXTURES / "gemma3" / "reference.npz")
    a, b = ref["tokens_a"], ref["tokens_b"]
    pad = len(a) - len(b)
    tokens = np.stack([a, np.concatenate([np.zeros(pad, np.int32), b])])
    mask = np.stack([np.ones(len(a), bool), np.arange(len(a)) >= pad])
    gen = cj.generate(model, jnp.asarray(tokens), 4, attention_mask=jnp.asarray(mask))
    # the full pass over prompt + generated tokens (same left padding) gives the same logits at every step
    full = np.concatenate([tokens, np.asarray(gen.tokens)], 1)
    full_mask = np.concatenate([mask, np.ones((2, 4), bool)], 1)
    logits = np.asarray(cj.run(model, jnp.asarray(full), attention_mask=jnp.asarray(full_mask)).logits)
    np.testing.assert_allclose(np.asarray(gen.logits), logits[:, len(a) - 1 : -1], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(gen.tokens), logits[:, len(a) - 1 : -1].argmax(-1))


def test_local_and_global_layers_trace_one_layer_body():
    """A Gemma-3-shaped config (5 local : 1 global, RoPE bases and scaling per layer): the traced program has the
    same equations at 6 and at 48 layers, because the per-layer differences are scanned arrays."""
    import jax

    def eqns(n_layers):
        cfg = cj.Config(d_model=16, n_layers=n_layers, n_heads=4, n_kv_heads=2, d_head=4, d_vocab=23, d_mlp=24,
                        normalization="rmsnorm", act="gelu_new", gated_mlp=True, positional="rotary",
                        embedding_multiplier=4.0, rope_theta=1e6, rope_local_theta=1e4,
                        rope_scaling=(("factor", 8.0), ("rope_type", "linear")), sliding_window=3,
                        layer_types=tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                          for i in range(n_layers)),
                        qk_norm=True, post_attn_norm=True, post_mlp_norm=True, family="gemma3_text")  # fmt: skip
        m = jax.eval_shape(lambda: cj.init_model(cfg, key=jax.random.key(0)))
        tokens = jnp.zeros((2, 6), jnp.int32)
        text = str(jax.make_jaxpr(lambda m, t: cj.run(m, t).logits)(m, tokens))
        return sum(" = " in line for line in text.splitlines())  # equations (the header lists shapes only)

    assert eqns(6) == eqns(48)


LEGACY = {  # config.json keys of checkpoints written before transformers 5 (rope_scaling, rotary_pct, ...)
    "llama": dict(rope_theta=500000.0, rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                         original_max_position_embeddings=32, rope_type="llama3")),
    "gemma3_text": dict(rope_theta=1e6, rope_local_base_freq=10000.0, rope_scaling=dict(factor=8.0, rope_type="linear"),
                        sliding_window=4, sliding_window_pattern=6, query_pre_attn_scalar=8),
    "gemma2": dict(sliding_window=4, query_pre_attn_scalar=8),
    "gpt_neox": dict(rotary_pct=0.25, rotary_emb_base=10000, num_key_value_heads=None, head_dim=None),
    "qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=6),
    "gemma": dict(hidden_act="gelu"),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(LEGACY))
def test_older_config_formats_read_as_transformers_reads_them(kind):
    transformers = pytest.importorskip("transformers")
    small = dict(vocab_size=48, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                 intermediate_size=48, num_hidden_layers=12, max_position_embeddings=64, bos_token_id=1,
                 eos_token_id=2, pad_token_id=0)  # fmt: skip
    d = {k: v for k, v in {**small, **LEGACY[kind]}.items() if v is not None}
    ours = cj.models.config_from_hf({"model_type": kind, **d})
    theirs = cj.models.config_from_hf(transformers.AutoConfig.for_model(kind, **d).to_dict())
    assert ours == theirs
    if kind == "gemma3_text":
        assert ours.rope_local_theta == 1e4 and ours.rope_theta == 1e6 and ours.sliding_layers[5] is False
        assert dict(ours.rope_scaling) == {"factor": 8.0, "rope_type": "linear"}


def test_config_refuses_inconsistent_family_options():
    base = dict(d_model=16, n_layers=2, n_heads=4, d_head=4, d_vocab=23, d_mlp=24, normalization="rmsnorm",
                positional="rotary")  # fmt: skip
    with pytest.raises(ValueError, match="layer_types has 3 entries for n_layers=2"):
        cj.Config(**base, sliding_window=4, layer_types=("full_attention",) * 3)
    with pytest.raises(ValueError, match="sliding_attention layers but sliding_window is None"):
        cj.Config(**base, layer_types=("full_attention", "sliding_attention"))
    with pytest.raises(ValueError, match="'su' is not supported; supported: default, linear"):
        cj.Config(**base, rope_scaling=(("factor", 2.0), ("rope_type", "su")))
    with pytest.raises(ValueError, match="llama3' needs low_freq_factor"):
        cj.Config(**base, rope_scaling=(("factor", 2.0), ("rope_type", "llama3")))
    with pytest.raises(ValueError, match="rotary_dim=3"):
        cj.Config(**base, rotary_dim=3)


def test_methods_that_need_additive_writes_refuse_families_without_them():
    """Per-head edges, path patching and direct logit attribution assume the heads' writes add up to what enters
    the stream: not so after Gemma's post-attention norm, nor with NeoX's parallel MLP for the edge order, nor
    through soft-capped logits. They refuse, naming the reason; node-level patching still runs."""
    gemma = cj.load_hf(FIXTURES / "gemma3")
    pythia = cj.load_hf(FIXTURES / "pythia")
    with pytest.raises(ValueError, match=r"edge graph .* \(family 'gemma3_text'\) normalises the heads' sum"):
        cj.Graph.of(gemma.cfg)
    with pytest.raises(ValueError, match=r"runs attention and MLP in parallel"):
        cj.Graph.of(pythia.cfg)
    toks = jnp.asarray(np.load(FIXTURES / "gemma3" / "reference.npz")["tokens_b"])[None]
    with pytest.raises(ValueError, match="direct logit attribution needs writes to the residual stream that add up"):
        cj.direct_logit_attribution(gemma, toks, answer=1)
    gemma2 = cj.load_hf(FIXTURES / "gemma2")
    assert gemma2.cfg.final_softcap is not None
    with pytest.raises(ValueError, match=r"soft-caps the logits|normalises the heads' sum"):
        cj.direct_logit_attribution(gemma2, toks, answer=1)
    # parallel residual: the decomposition of the stream itself still adds up
    attributions, _, constant, logit = cj.direct_logit_attribution(pythia, toks, answer=1)
    np.testing.assert_allclose(attributions.sum(0) + constant, logit, rtol=1e-5, atol=1e-5)
    r = cj.patch_sweep(gemma, toks, toks[:, ::-1], lambda lg: lg[:, 1].mean(), site="z", progress=False)
    assert r.result.shape[0] == gemma.cfg.n_layers
