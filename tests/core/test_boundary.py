"""Validation at the boundary: inputs that used to give a result that looks fine and is not are refused
with one error naming the argument, its value and what is valid (each case below was silent before)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_configs

import circuits_jax as cj

CFG = tiny_configs()["llamalike"]  # 3 layers, vocabulary 23


@pytest.fixture(scope="module")
def setup():
    model = cj.init_model(CFG, key=jax.random.key(0), std=0.3)
    clean = np.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]], np.int32)
    corrupt = clean.copy()
    corrupt[:, 1] = 11
    return model, clean, corrupt, cj.LogitDiff(np.array([1, 2]), np.array([3, 4]))


@pytest.mark.parametrize("layer", [99, 3, -4])
def test_a_hook_at_a_layer_the_model_lacks_is_refused(setup, layer):
    model, clean, _, _ = setup
    with pytest.raises(ValueError, match=rf"hook at 'attn.hook_z'={layer} is out of range: the model has 3 layers, 0..2"):
        cj.run(model, clean, hooks=[cj.Hook("attn.hook_z", layer, cj.Zero())])  # was: the clean logits, unchanged


def test_a_negative_layer_counts_from_the_end_everywhere(setup):
    model, clean, _, _ = setup
    last = cj.run(model, clean, hooks=[cj.Hook("attn.hook_z", 2, cj.Zero())]).logits
    np.testing.assert_array_equal(cj.run(model, clean, hooks=[cj.Hook("attn.hook_z", -1, cj.Zero())]).logits, last)
    np.testing.assert_array_equal(cj.run(model, clean, hooks={("z", -1): cj.Zero()}).logits, last)
    resid = cj.run(model, clean, cache=["blocks.2.hook_resid_pre"]).cache["blocks.2.hook_resid_pre"]
    a = cj.run(model, clean, start_layer=-1, resid=resid).logits
    np.testing.assert_array_equal(a, cj.run(model, clean, start_layer=2, resid=resid).logits)


def test_a_fractional_layer_is_refused(setup):
    model, clean, _, _ = setup
    with pytest.raises(TypeError, match=r"=5.7: a layer is an integer"):
        cj.run(model, clean, hooks=[cj.Hook("attn.hook_z", 5.7, cj.Zero())])


def test_start_layer_past_the_model_is_refused(setup):
    model, clean, _, _ = setup
    resid = jnp.zeros((2, 5, CFG.d_model))
    with pytest.raises(ValueError, match="start_layer=40 is out of range"):
        cj.run(model, clean, start_layer=40, resid=resid)  # was: the logits of a zero residual stream
    with pytest.raises(ValueError, match="start_layer=2 is after stop_layer=1"):
        cj.run(model, clean, start_layer=2, stop_layer=1, resid=resid)


@pytest.mark.parametrize("bad", [60000, -1, 23])
def test_token_ids_outside_the_vocabulary_are_refused(setup, bad):
    model, clean, _, _ = setup
    tokens = clean.copy()
    tokens[1, 3] = bad
    with pytest.raises(ValueError, match=rf"tokens hold id {bad} at \[1, 3\], outside the vocabulary 0..22"):
        cj.run(model, tokens)  # was: clamped, logits without a word
    with pytest.raises(ValueError, match=rf"clean tokens hold id {bad}"):
        cj.patch_sweep(model, tokens, clean, setup[3], progress=False)
    with pytest.raises(ValueError, match=rf"tokens hold id {bad}"):
        cj.generate(model, tokens, 2)


@pytest.mark.parametrize("answer,match", [
    (np.array([1, 60000]), r"LogitDiff.answer holds token id 60000 at \[1\], outside the vocabulary 0..22"),
    (np.array([-1, 2]), r"LogitDiff.answer holds token id -1"),  # was: the last vocabulary entry
    (np.array([1, 2, 3, 4, 5, 6, 7, 8]), r"LogitDiff.answer has 8 rows .* the batch has 2 examples"),
])  # fmt: skip
def test_metric_token_ids_are_checked_against_vocabulary_and_batch(setup, answer, match):
    model, clean, corrupt, _ = setup
    metric = cj.LogitDiff(answer, np.zeros(len(answer), np.int32))
    for call in (lambda: cj.patch_sweep(model, clean, corrupt, metric, progress=False),
                 lambda: cj.edge_attribution(model, clean, corrupt, metric)):  # fmt: skip
        with pytest.raises(ValueError, match=match):  # was: NaN, or finite scores from a NaN metric
            call()


def test_two_answers_against_one_prompt_are_refused(setup):
    model, clean, corrupt, _ = setup
    with pytest.raises(ValueError, match="has 2 rows .* the batch has 1 examples"):
        cj.patch_sweep(model, clean[:1], corrupt[:1], cj.LogitDiff(np.array([1, 2]), np.array([3, 4])), progress=False)


def test_a_metric_must_return_one_number(setup):
    model, clean, corrupt, _ = setup
    with pytest.raises(ValueError, match=r"returns shape \(2,\) on logits of shape \(2, 23\); a metric returns one number"):
        cj.patch_sweep(model, clean, corrupt, lambda logits: logits[:, 1] - logits[:, 2], progress=False)


@pytest.mark.parametrize("kwargs,match", [
    (dict(chunk_size=0), "chunk_size=0: give an integer > 0"),
    (dict(chunk_size=-3), "chunk_size=-3: give an integer > 0"),
    (dict(chunk_size=2.5), "chunk_size=2.5: give an integer > 0"),
    (dict(memory_budget=0), "memory_budget=0: give an integer > 0"),
])  # fmt: skip
def test_sizes_and_budgets_must_be_positive(setup, kwargs, match):
    model, clean, corrupt, metric = setup
    with pytest.raises((ValueError, TypeError), match=match):  # was: silently replaced by the automatic chunk
        cj.patch_sweep(model, clean, corrupt, metric, progress=False, **kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        cj.patch_edges(model, clean, corrupt, metric, cj.Graph.of(CFG).mask, progress=False, **kwargs)


def test_identical_prompts_are_marked_degenerate_not_normalised(setup):
    model, clean, _, metric = setup
    with pytest.warns(UserWarning, match="give the same metric .*identical prompts, or answer = wrong"):
        r = cj.patch_sweep(model, clean, clean, metric, "z", ("layer", "head"), progress=False)
    assert r.degenerate and np.isnan(r.result).all()
    with pytest.warns(UserWarning, match="give the same metric"):
        e = cj.edge_attribution(model, clean, clean, metric, "eap")  # was: all zeros, no word
    assert e.degenerate
    same = cj.LogitDiff(np.array([1, 2]), np.array([1, 2]))  # answer = wrong
    with pytest.warns(UserWarning, match="give the same metric"):
        assert cj.path_patch(model, clean, clean, same, receivers="logits", progress=False).degenerate


def test_answer_positions_outside_the_prompt_are_refused(setup):
    model, clean, corrupt, metric = setup
    with pytest.raises(ValueError, match="answer_pos holds 9, outside the 5 positions"):
        cj.patch_sweep(model, cj.Task("t", clean, corrupt, metric, answer_pos=np.array([2, 9])), progress=False)


def test_replace_broadcasts_a_vector_to_the_site_as_the_docs_say(setup):
    model, clean, _, _ = setup  # docs/core_concepts.md: "patch in `value` (broadcast to the site's shape)"
    v = np.linspace(-1, 1, CFG.d_model).astype(np.float32)
    a = cj.run(model, clean, hooks={"blocks.1.hook_resid_pre": cj.Replace(v)}).logits  # was: a shape error
    full = np.broadcast_to(v, (2, 5, CFG.d_model))
    np.testing.assert_array_equal(a, cj.run(model, clean, hooks={"blocks.1.hook_resid_pre": cj.Replace(full)}).logits)
    with pytest.raises(ValueError, match=r"patch value for site 'blocks.1.attn.hook_z' has shape \(16,\)"):
        cj.run(model, clean, hooks={"blocks.1.attn.hook_z": cj.Replace(v)})  # [D] does not fit [B, T, H, E]
