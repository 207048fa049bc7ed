"""Export to Hugging Face format, orbax checkpoints, the registry's cache and the CLI."""

import importlib.util
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import circuits_jax as cj
from circuits_jax.app.cli import main

from conftest import tiny_configs

TOKENS = np.array([[3, 7, 1, 9, 4, 2]], np.int32)


@pytest.mark.parametrize("name", ["tiny_gpt2", "tiny_llama"])
def test_hf_export_roundtrip_is_exact(tmp_path, reference, name):
    model = cj.load_hf(reference / name)
    again = cj.load_hf(cj.export_hf(model, tmp_path / name))
    assert again.cfg == model.cfg
    assert cj.tree_allclose(model, again, rtol=0, atol=0)


def test_export_of_a_tied_gqa_llama_roundtrips(tmp_path):
    model = cj.init_model(tiny_configs()["llamalike"].replace(family="llama"), key=jax.random.key(4))
    again = cj.load_hf(cj.export_hf(model, tmp_path / "m"))
    np.testing.assert_array_equal(again(TOKENS), model(TOKENS))


def test_export_refuses_custom_families(tmp_path):
    model = cj.init_model(tiny_configs()["attn_only"], key=jax.random.key(4))
    with pytest.raises(NotImplementedError, match="family"):
        cj.export_hf(model, tmp_path / "m")


_TRANSFORMERS_LOGITS = """
import sys, numpy as np, torch, transformers
path, ids, out = sys.argv[1:]
model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
with torch.no_grad():
    logits = model(torch.as_tensor(np.load(ids), dtype=torch.long)).logits.numpy()
np.save(out, logits)
"""


@pytest.mark.slow_after_first
@pytest.mark.peers
@pytest.mark.parametrize("name", ["tiny_gpt2", "tiny_llama"])
def test_transformers_loads_our_export_and_agrees(tmp_path, reference, name):
    """transformers runs in a child process, so torch (its own LLVM and OpenMP) never shares the test
    process with XLA's compiler; a rare segfault in that compiler late in the suite is not explained yet."""
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None:
        pytest.skip("the peers extra (torch, transformers) is not installed")
    model = cj.load_hf(reference / name)
    path = cj.export_hf(model, tmp_path / name)
    ids = np.load(reference / name / "expected.npz")["input_ids"]
    np.save(tmp_path / "ids.npy", ids)
    subprocess.run([sys.executable, "-c", _TRANSFORMERS_LOGITS, str(path), str(tmp_path / "ids.npy"),
                    str(tmp_path / "want.npy")], check=True)  # fmt: skip
    np.testing.assert_allclose(model(ids), np.load(tmp_path / "want.npy"), atol=1e-4, rtol=0)


@pytest.mark.smollm2
def test_smollm2_export_with_tokenizer_loads_back_identically(smollm2, tmp_path):
    model, tok = smollm2
    again, tok2 = cj.load(cj.export_hf(model, tmp_path / "smol", tokenizer=tok))
    ids = tok.to_tokens("When Mary and John went to the store, John gave a drink to")
    assert tok2.to_tokens("When Mary and John went to the store, John gave a drink to").tolist() == ids.tolist()
    np.testing.assert_array_equal(again(ids), model(ids))


@pytest.mark.parametrize("name", sorted(tiny_configs()))
def test_checkpoint_roundtrip(tmp_path, name):
    model = cj.init_model(tiny_configs()[name], key=jax.random.key(5))
    back = cj.load_model(cj.save_model(tmp_path / name, model))
    assert back.cfg == model.cfg and cj.tree_allclose(model, back, rtol=0, atol=0)
    assert cj.load(tmp_path / name)[0].cfg == model.cfg  # load() recognises checkpoints too
    params = {"a": np.arange(3.0, dtype=np.float32), "b": [np.ones((2, 2), np.float32)]}
    assert cj.tree_allclose(cj.restore(cj.save(tmp_path / "tree", params), params), params)


@pytest.mark.smollm2
def test_cli_predict_json_matches_the_reference(smollm2, smollm2_expected, capsys):
    ref, _ = smollm2_expected
    assert main(["predict", "--prompt", ref["prompts"][0], "--top-k", "10", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["tokens"] == ref["token_ids"][0]
    assert [row[1] for row in got["top"]] == [t[1] for t in ref["top10"][0]]
    assert [row[0] for row in got["top"]] == [t[0] for t in ref["top10"][0]]
    np.testing.assert_allclose([row[2] for row in got["top"]], [t[2] for t in ref["top10"][0]], atol=2e-3)


@pytest.mark.smollm2
def test_cli_predict_bos_flag_and_text_output(smollm2, capsys):
    assert main(["predict", "--prompt", "The capital of France is", "--bos", "--top-k", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"][0] == smollm2[1].bos_token_id
    assert main(["predict", "--prompt", "The capital of France is", "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "' Paris'" in out and "top 2 next tokens" in out


def test_cli_reports_a_missing_model_cleanly(tmp_path):
    done = subprocess.run([sys.executable, "-m", "circuits_jax.app", "predict", "--model", str(tmp_path / "x.gguf"),
                           "--prompt", "hi"], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()  # one line: no traceback, no warning
    assert line.startswith("circuits-jax: error: ") and "does not exist" in line and "pip download" in line


def test_checkpoints_restore_by_name_across_added_fields(tmp_path):
    """A module field added after a checkpoint was written (None where a model does not use it, as the
    families' `Blocks.q_norm_w`) must not orphan it: orbax's structural restore refused such a tree."""
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    cj.save(tmp_path / "c", {"w": jnp.asarray(x), "unused": None, "inner": (jnp.ones(2), None)})
    like = {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32), "unused": None, "added_since": None,
            "inner": (jax.ShapeDtypeStruct((2,), jnp.float32), None)}  # fmt: skip
    got = cj.restore(tmp_path / "c", like)
    np.testing.assert_array_equal(got["w"], x)  # read back bit for bit, no computation
    np.testing.assert_array_equal(got["inner"][0], np.ones(2))
    assert got["added_since"] is None and got["unused"] is None
    with pytest.raises(ValueError, match=r"lacks needed: it was written for another model"):
        cj.restore(tmp_path / "c", {**like, "needed": jax.ShapeDtypeStruct((1,), jnp.float32)})
