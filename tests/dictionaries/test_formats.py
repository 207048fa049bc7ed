"""Dictionary formats against files written by the real libraries (`formats/make_fixtures.py`: SAELens 6.54,
EleutherAI sparsify 1.3.3): our load of each equals that library's own feature activations and outputs, and
ours, exported to SAELens's format, is what SAELens reads back (its activations and outputs on our files).
Gemma Scope 2 and circuit-tracer files are written here from their documented layouts (neither library is on
PyPI with a writer)."""

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import circuits_jax as cj
from circuits_jax.dictionaries import SAE

HERE = Path(__file__).parent / "formats"
SAELENS = ["standard", "topk", "topk_rescaled", "jumprelu", "gated", "transcoder", "skip_transcoder", "jumprelu_transcoder",
           "jumprelu_skip_transcoder"]  # fmt: skip
OURS = ["relu", "topk", "jumprelu", "batchtopk", "gated", "relu_transcoder", "jumprelu_skip_transcoder"]
TOL = 1e-5


def fixture_dictionary(name: str) -> SAE:
    """A deterministic dictionary of ours (numpy draws), with input / output scales that the export must fold."""
    rng = np.random.default_rng(sorted(OURS).index(name))
    arch = name.split("_")[0]
    transcoder = "transcoder" in name
    d_in, d_out, f = 16, 12 if transcoder else 16, 24
    r = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32) * 0.3)  # noqa: E731
    return SAE(
        W_enc=r(d_in, f), b_enc=r(f), W_dec=r(f, d_out), b_dec=r(d_out),
        threshold=jnp.asarray(np.abs(rng.normal(size=f)).astype(np.float32) * 0.3 if arch in ("jumprelu", "batchtopk")
                              else np.zeros(f, np.float32)),
        in_scale=jnp.asarray(1.7, jnp.float32), out_scale=jnp.asarray(0.6, jnp.float32), arch=arch,
        k=5 if arch in ("topk", "batchtopk") else None, in_site="blocks.1.ln2.hook_normalized" if transcoder
        else "blocks.1.hook_resid_post", out_site="blocks.1.hook_mlp_out" if transcoder else "blocks.1.hook_resid_post",
        W_skip=r(d_in, d_out) if "skip" in name else None,
        r_mag=r(f) if arch == "gated" else None, b_mag=r(f) if arch == "gated" else None,
    )  # fmt: skip


def _check(d, folder: Path):
    ref = np.load(folder / "expected.npz")
    np.testing.assert_allclose(np.asarray(d.encode(jnp.asarray(ref["x"]))), ref["acts"], rtol=0, atol=TOL)
    np.testing.assert_allclose(np.asarray(d(jnp.asarray(ref["x"]))), ref["out"], rtol=0, atol=TOL)


@pytest.mark.parametrize("name", SAELENS)
def test_saelens_files_load_with_saelens_outputs(name):
    folder = HERE / "saelens" / name
    d = cj.load_dictionary(folder)
    assert d.in_site.startswith("blocks.1.") and (d.W_skip is not None) == ("skip" in name)
    assert d.is_transcoder == ("transcoder" in name)
    _check(d, folder)


@pytest.mark.parametrize("name", OURS)
def test_ours_exported_to_saelens_reads_back_in_saelens(name, tmp_path):
    d = fixture_dictionary(name)
    folder = HERE / "saelens" / f"ours_{name}"
    ours = cj.save_saelens(d, tmp_path / name, model_name="tiny")
    theirs = np.load(folder / "loaded_state.npz")  # what SAELens held after reading the committed export
    from safetensors.numpy import load_file

    written = load_file(str(ours / "sae_weights.safetensors"))
    assert sorted(written) == sorted(theirs.files)
    for k in written:  # today's export writes what SAELens read
        np.testing.assert_allclose(written[k], theirs[k], rtol=0, atol=1e-7, err_msg=k)
    _check(d, folder)  # SAELens's outputs on our export are our dictionary's own
    _check(cj.load_dictionary(ours), folder)  # and our reader agrees


@pytest.mark.parametrize("name", ["layers.1", "skip_transcoder"])
def test_sparsify_files_load_with_sparsify_outputs(name, tmp_path):
    folder = HERE / "sparsify" / name
    site = None if name == "layers.1" else "blocks.1.ln2.hook_normalized"
    d = cj.load_dictionary(folder, site=site)
    assert d.arch == "topk" and d.k == 5
    assert d.in_site == ("blocks.1.hook_resid_post" if name == "layers.1" else site)
    _check(d, folder)
    again = cj.load_dictionary(cj.save_sparsify(d, tmp_path / name), site=d.in_site)  # our writer, our reader
    _check(again, folder)


def _save(path: Path, arrays: dict):
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()}, str(path))
    return path


def _reference(x, W_enc, b_enc, W_dec, b_dec, t=None, W_skip=None):
    """A numpy forward written from the formats' documentation: relu / JumpReLU, then decode, plus skip."""
    pre = x @ W_enc + b_enc
    acts = np.maximum(pre, 0) * (pre > t if t is not None else 1)
    return acts, acts @ W_dec + b_dec + (x @ W_skip if W_skip is not None else 0)


def test_gemma_scope_2_and_circuit_tracer_layouts(tmp_path):
    rng = np.random.default_rng(0)
    r = lambda *s: rng.normal(size=s).astype(np.float32) * 0.3  # noqa: E731
    W_enc, b_enc, W_dec, b_dec, W_skip = r(16, 24), r(24), r(24, 12), r(12), r(16, 12)
    t = np.abs(r(24))
    x = r(7, 16)
    acts, out = _reference(x, W_enc, b_enc, W_dec, b_dec, t, W_skip)

    folder = tmp_path / "transcoder" / "layer_3_width_16k_l0_small_affine"
    _save(folder / "params.safetensors", {"w_enc": W_enc, "b_enc": b_enc, "w_dec": W_dec, "b_dec": b_dec,
                                          "threshold": t, "affine_skip_connection": W_skip})  # fmt: skip
    (folder / "config.json").write_text('{"architecture": "jump_relu", "affine_connection": true}')
    d = cj.load_dictionary(folder)
    assert (d.in_site, d.out_site) == ("blocks.3.hook_mlp_in", "blocks.3.hook_mlp_out")
    np.testing.assert_allclose(np.asarray(d.encode(x)), acts, rtol=0, atol=TOL)
    np.testing.assert_allclose(np.asarray(d(x)), out, rtol=0, atol=TOL)

    # circuit-tracer: W_enc [F, D], the threshold under its activation function's name, W_skip applied transposed
    f = _save(tmp_path / "ct" / "layer_3.safetensors", {"W_enc": W_enc.T, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec,
                                                         "activation_function.threshold": t, "W_skip": W_skip.T})  # fmt: skip
    d = cj.load_dictionary(f)
    assert (d.arch, d.in_site, d.out_site) == ("jumprelu", "blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out")
    np.testing.assert_allclose(np.asarray(d(x)), out, rtol=0, atol=TOL)


def test_a_folder_in_no_known_format_names_the_formats_checked(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 8)
    with pytest.raises(ValueError, match=r"no dictionary format known here; checked: circuits_jax .*SAELens .*sparsify"
                                         r".*Gemma Scope 2.*Gemma Scope 1.*circuit-tracer"):
        cj.load_dictionary(tmp_path)
    with pytest.raises(ValueError, match="SAELens architecture 'temporal' is not supported; supported: standard"):
        (tmp_path / "t").mkdir()
        (tmp_path / "t" / "cfg.json").write_text('{"architecture": "temporal"}')
        _save(tmp_path / "t" / "sae_weights.safetensors", {"W_enc": np.zeros((2, 3))})
        cj.load_dictionary(tmp_path / "t")


def test_a_skip_transcoder_saves_trains_and_stacks_for_graphs(tmp_path):
    d = fixture_dictionary("jumprelu_skip_transcoder")
    again = cj.load_dictionary(cj.save_dictionary(tmp_path / "d", d))
    assert again.W_skip is not None and cj.tree_allclose(again, d)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32))
    y = d(x)  # a target the skip path helps reach: the loss sees it
    no_skip = SAE(**{**{f: getattr(d, f) for f in d.__dataclass_fields__}, "W_skip": None})
    hp = cj.LossConfig()
    dead = jnp.zeros(d.width, bool)
    assert float(d.loss(x, y, dead, hp)[1].mse) < 1e-9 < float(no_skip.loss(x, y, dead, hp)[1].mse)
    from circuits_jax.attribution_graphs import stack_transcoders

    stacked = stack_transcoders([dataclasses.replace(d, in_site="blocks.0.ln2.hook_normalized", out_site="blocks.0.hook_mlp_out")])
    np.testing.assert_array_equal(np.asarray(stacked.W_skip[0]), np.asarray(d.W_skip))  # graphs keep the skip path
