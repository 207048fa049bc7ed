"""Task generators: aligned batches, seeds, refusals, and that SmolLM2 shows each behaviour (one model test)."""

import jax.numpy as jnp
import numpy as np
import pytest

import circuits_jax as cj
from circuits_jax.tasks._tasks import (
    FACTS,
    TASKS,
    ProbMassDiff,
    factual_recall_task,
    greater_than_task,
    induction_task,
    ioi_task,
    single_token_ids,
    task,
    task_from_prompts,
)


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2[1]


def _rows_of(t):
    """Each row's real tokens (clean, corrupt), with the padding cut off."""
    lengths = np.full(len(t.clean), t.clean.shape[1]) if t.attention_mask is None else t.attention_mask.sum(1)
    return [(c[:n], x[:n]) for c, x, n in zip(t.clean, t.corrupt, lengths)]


@pytest.mark.parametrize("name", list(TASKS))
def test_batches_are_aligned_and_scored_at_the_last_real_token(tok, name):
    t = task(name, tok, n=8, seed=3)
    B, T = t.clean.shape
    assert t.clean.shape == t.corrupt.shape and B == 8 and t.clean.dtype == np.int32
    assert t.answers.shape[0] == B and (t.wrong is None or t.wrong.shape == (B,))
    if t.attention_mask is None:
        assert t.answer_pos is None
    else:
        assert t.attention_mask.shape == (B, T) and t.attention_mask[:, 0].all()
        np.testing.assert_array_equal(t.answer_pos, t.attention_mask.sum(1) - 1)
        assert (t.clean[~t.attention_mask] == tok.pad_token_id).all()
    for p, q, (c, x) in zip(t.prompts, t.corrupt_prompts, _rows_of(t)):  # the texts are the tokens
        assert tok.encode(p) == c.tolist() and tok.encode(q) == x.tolist()


@pytest.mark.parametrize("name", list(TASKS))
def test_same_seed_same_task_other_seed_other_task(tok, name):
    a, b, c = task(name, tok, seed=0), task(name, tok, seed=0), task(name, tok, seed=1)
    np.testing.assert_array_equal(a.clean, b.clean)
    np.testing.assert_array_equal(a.corrupt, b.corrupt)
    np.testing.assert_array_equal(a.answers, b.answers)
    assert a.prompts == b.prompts and a.prompts != c.prompts


def test_ioi_abc_replaces_only_s2_and_flip_puts_the_io_name_there(tok):
    abc, flip = ioi_task(tok, seed=5), ioi_task(tok, seed=5, corruption="flip")
    np.testing.assert_array_equal(abc.clean, flip.clean)
    for t in (abc, flip):
        diff = t.clean != t.corrupt
        assert (diff.sum(1) == 1).all()  # one token: S2
        pos = diff.argmax(1)
        rows = np.arange(len(pos))
        np.testing.assert_array_equal(t.clean[rows, pos], t.wrong)  # clean S2 is S
    s2 = flip.corrupt[np.arange(len(flip.corrupt)), (flip.clean != flip.corrupt).argmax(1)]
    np.testing.assert_array_equal(s2, flip.answers)
    with pytest.raises(ValueError, match="'abc' or 'flip'"):
        ioi_task(tok, corruption="swap")


def test_ioi_abc_third_name_is_neither_io_nor_s_of_its_row(tok):
    t = ioi_task(tok, n=32, seed=2)
    c = t.corrupt[t.clean != t.corrupt]
    assert ((c != t.answers) & (c != t.wrong)).all()


def test_induction_repeats_the_sequence_and_resamples_the_first_copy(tok):
    L = 7
    t = induction_task(tok, n=6, seed=1, length=L)
    assert t.clean.shape == (6, 2 * L - 1)
    np.testing.assert_array_equal(t.clean[:, L:], t.clean[:, : L - 1])  # second copy = first copy
    np.testing.assert_array_equal(t.corrupt[:, L:], t.clean[:, L:])  # second copy unchanged
    np.testing.assert_array_equal(t.answers, t.clean[:, L - 1])
    np.testing.assert_array_equal(t.wrong, t.corrupt[:, L - 1])
    for c, x in zip(t.clean, t.corrupt):  # 2L distinct tokens per row: no copy can be right by chance
        assert len(set(c[:L]) | set(x[:L])) == 2 * L
    with pytest.raises(ValueError, match="length must be at least 2"):
        induction_task(tok, length=1)


def test_greater_than_masks_split_the_digits_at_the_start_years_tens(tok):
    t = greater_than_task(tok, n=12, seed=4)
    digits = np.array([tok.to_single_token(str(d)) for d in range(10)])
    np.testing.assert_array_equal(t.answers, np.tile(digits, (12, 1)))
    up, down = np.asarray(t.metric.up), np.asarray(t.metric.down)
    for p, q, u, d in zip(t.prompts, t.corrupt_prompts, up, down):
        start = p.split("from the year ")[1].split()[0]
        tens = int(start[2])
        assert 1 <= tens <= 8 and p.endswith(f"to the year {start[:2]}")
        assert q == p.replace(f"year {start} ", f"year {start[:2]}01 ")
        np.testing.assert_array_equal(np.flatnonzero(u), np.sort(digits[tens + 1 :]))
        np.testing.assert_array_equal(np.flatnonzero(d), np.sort(digits[:tens]))


def test_prob_mass_diff_by_hand():
    logits = jnp.log(jnp.array([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]))
    up = jnp.array([[False, False, True, True], [True, False, False, False]])
    down = jnp.array([[True, False, False, False], [False, True, True, False]])
    # row 0: 0.7 - 0.1; row 1: 0.25 - 0.5
    np.testing.assert_allclose(ProbMassDiff(up, down)(logits), (0.6 - 0.25) / 2, rtol=1e-6)


def test_greater_than_refuses_years_that_are_not_digit_tokens():
    import tokenizers

    words = ["<unk>", *map(str, range(10)), "17", "1732", "The", "war", "lasted", "from", "the", "year", "to"]
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    with pytest.raises(ValueError, match=r"splits ' \d\d32' into"):
        greater_than_task(cj.Tokenizer(hf))


def test_factual_recall_pairs_facts_of_one_template_and_length(tok):
    t = factual_recall_task(tok, n=16, seed=0)
    assert t.attention_mask is not None  # templates differ in length: padded rows
    for p, q, a, w in zip(t.prompts, t.corrupt_prompts, t.answers, t.wrong):
        assert p != q and a != w
        assert len(tok.encode(p)) == len(tok.encode(q))
        assert any({p, q} <= {template.format(s) for s, _ in facts} for template, facts in FACTS.items())
    assert len(set(t.prompts)) == 16
    with pytest.raises(ValueError, match="asked for n=1000"):
        factual_recall_task(tok, n=1000)


def test_multi_token_answers_are_refused_naming_each_split(tok):
    with pytest.raises(ValueError, match="2 answers are not single tokens") as e:
        task_from_prompts(tok, ["When Mary met John, John thanked"] * 3, ["When Mary met John, Mary thanked"] * 3,
                          [" Mary Ann", " Mary", " Bartholomew"], [" John"] * 3)  # fmt: skip
    msg = str(e.value)
    assert "' Mary Ann' splits into [' Mary', ' Ann']" in msg
    assert "' Bartholomew' splits into" in msg
    with pytest.raises(ValueError, match="wrong answers are not single tokens.*' John Paul' splits into"):
        task_from_prompts(tok, ["a b"], ["a c"], [" Mary"], [" John Paul"])
    ids = single_token_ids(tok, [" Paris", " Rome"])
    assert ids.tolist() == [tok.to_single_token(" Paris"), tok.to_single_token(" Rome")]


def test_task_from_prompts_names_an_unequal_pair_and_pads_unequal_rows(tok):
    unequal = r"row 1: 'The capital of France is' \(5 tokens\) vs 'The capital of the Philippines is' \(6 tokens\)"
    with pytest.raises(ValueError, match=unequal):
        task_from_prompts(tok, ["The capital of Spain is", "The capital of France is"],
                          ["The capital of Italy is", "The capital of the Philippines is"],
                          [" Madrid", " Paris"])  # fmt: skip
    t = task_from_prompts(tok, ["The capital of France is", "The Eiffel Tower is in the city of"],
                          ["The capital of Italy is", "The Colosseum is in the city of"], [" Paris", " Paris"],
                          [" Rome", " Rome"])  # fmt: skip
    np.testing.assert_array_equal(t.answer_pos, [4, 8])
    np.testing.assert_array_equal(t.attention_mask.sum(1), [5, 9])
    assert isinstance(t.metric, cj.LogitDiff) and t.name == "custom"
    p = task_from_prompts(tok, "The capital of France is", "The capital of Italy is", " Paris")
    assert isinstance(p.metric, cj.AnswerProb) and p.clean.shape == (1, 5) and p.answer_pos is None
    with pytest.raises(ValueError, match="one prompt, corrupt prompt and answer"):
        task_from_prompts(tok, ["a", "b"], ["a"], [" x", " y"])


def test_unknown_task_name_lists_the_valid_ones(tok):
    listed = r"unknown task 'greater-then' \(did you mean 'greater-than'\?\); valid tasks: "
    with pytest.raises(ValueError, match=listed + "ioi, induction, greater-than, factual-recall"):
        task("greater-then", tok)
    with pytest.raises(ValueError, match="valid tasks: ioi, induction"):
        task("sentiment", tok)
    assert task("greater_than", tok, n=2).name == "greater-than"


def _clean_and_corrupt_metrics(model, tasks):
    """`[(clean, corrupt)]` metric of each task, from one forward pass over every run right-padded together
    (one compiled program; causal attention keeps padding out of the real tokens)."""
    runs = [(t, x, np.ones(x.shape, bool) if t.attention_mask is None else t.attention_mask) for t in tasks
            for x in (t.clean, t.corrupt)]  # fmt: skip
    T = max(x.shape[1] for _, x, _ in runs)
    tokens = np.concatenate([np.pad(x, ((0, 0), (0, T - x.shape[1]))) for _, x, _ in runs])
    mask = np.concatenate([np.pad(m, ((0, 0), (0, T - m.shape[1]))) for _, _, m in runs])
    resid = cj.run(model, jnp.asarray(tokens), attention_mask=jnp.asarray(mask), return_logits=False).resid
    logits = cj.unembed(model, resid[np.arange(len(tokens)), mask.sum(1) - 1])
    starts = np.cumsum([0] + [len(x) for _, x, _ in runs])
    values = [float(t.metric(logits[a:b])) for (t, _, _), a, b in zip(runs, starts[:-1], starts[1:])]
    return list(zip(values[::2], values[1::2]))


def test_smollm2_shows_every_behaviour_clean_well_above_corrupt(smollm2):
    model, tok = smollm2
    # margins well under what n=8, seed 0 gives (IOI 4.3 vs 0.7, induction 11.3 vs -0.4,
    # greater-than 0.56 vs -0.90, factual recall 8.0 vs -5.9)
    margin = {"ioi": 2.0, "induction": 5.0, "greater-than": 0.5, "factual-recall": 5.0}
    tasks = [task(name, tok, n=8, seed=0) for name in TASKS]
    for t, (clean, corrupt) in zip(tasks, _clean_and_corrupt_metrics(model, tasks)):
        assert clean > 0 and clean - corrupt > margin[t.name], (t.name, clean, corrupt)
