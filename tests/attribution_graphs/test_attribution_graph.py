"""Attribution graphs: the replacement model is exact, edges decompose every node exactly, the
batched rows do not depend on batching, pruning and scores follow their definitions, the files
and the `graph` command, feature interventions, and refusals of mismatched transcoders."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import circuits_jax as cj
from circuits_jax.attribution_graphs import _graph as G
from circuits_jax.attribution_graphs import _replacement as R
from circuits_jax.dictionaries._sae import init_sae
from circuits_jax.dictionaries._io import save_dictionary
from circuits_jax.app.cli import main

from conftest import tiny_configs
from test_sae_pipeline import BOS, EOS, WORDS, make_tok

WIDTH, K = 40, 5


def _transcoders(cfg, seed=0, width=WIDTH, k=K):
    """Random per-layer TopK transcoders with nonzero biases and scales (every term of the maths in play)."""
    ds = []
    for l in range(cfg.n_layers):
        key = jax.random.key(seed * 100 + l)
        d = init_sae(cfg.d_model, width, key=key, arch="topk", k=k, in_site=f"blocks.{l}.ln2.hook_normalized",
                     out_site=f"blocks.{l}.hook_mlp_out", b_dec=0.1 * jnp.ones(cfg.d_model), in_scale=1.3, out_scale=0.7)  # fmt: skip
        ds.append(dataclasses.replace(d, b_enc=0.3 * jax.random.normal(jax.random.fold_in(key, 7), (width,))))
    return ds


@pytest.fixture(scope="module", params=["llamalike", "gpt2like"])
def setup(request):
    cfg = tiny_configs()[request.param]
    model = cj.init_model(cfg, key=jax.random.key(0), std=0.3)
    return model, cj.stack_transcoders(_transcoders(cfg), model_name="tiny")


TOKENS = np.array([1, 5, 7, 3, 9, 2, 11], np.int32)


# ---------------------------------------------------------------- the replacement model


@pytest.mark.slow_after_first
@pytest.mark.parametrize("freeze_attention,freeze_norms", [(True, True), (True, False), (False, False)])
def test_replacement_model_with_errors_reproduces_the_logits(setup, freeze_attention, freeze_norms):
    model, ts = setup
    tr = cj.trace_replacement(model, ts, TOKENS[None])
    logits, acts = cj.intervene(model, ts, tr, R.no_edit(tr.acts.shape), freeze_attention=freeze_attention, freeze_norms=freeze_norms)
    np.testing.assert_allclose(logits, model(TOKENS[None]), atol=1e-4, rtol=0)
    np.testing.assert_allclose(acts, tr.acts, atol=1e-5)
    assert not np.asarray(tr.acts[:, :, 0]).any(), "no features at BOS"
    assert (np.asarray(tr.acts[:, :, 1:] > 0).sum(-1) <= K).all()


def test_replacement_model_on_smollm2_reproduces_the_logits(smollm2):
    model, tok = smollm2
    ts = cj.stack_transcoders(_transcoders(model.cfg, width=256, k=16), model_name="smollm2")
    ids = np.asarray(tok.encode("The capital of the state containing Dallas is", prepend_bos=True), np.int32)[None]
    tr = cj.trace_replacement(model, ts, ids)
    for fa in (True, False):
        logits, _ = cj.intervene(model, ts, tr, R.no_edit(tr.acts.shape), freeze_attention=fa)
        assert float(jnp.max(jnp.abs(logits - tr.logits))) < 1e-4
    # random transcoders explain little: the errors carry the MLPs, and the bare replacement is far off
    bare, _ = cj.replacement_forward(model, ts, ids, freeze_attention=False)
    assert float(jnp.max(jnp.abs(bare - tr.logits))) > 1.0


@pytest.mark.slow_after_first
def test_linear_forward_reproduces_the_reads(setup):
    model, ts = setup
    tr = cj.trace_replacement(model, ts, TOKENS[None])
    reads, final = R.linear_forward(model, tr.frozen, tr.mlp_out, R.token_embeddings(model, jnp.asarray(TOKENS)[None]))
    np.testing.assert_allclose(reads, tr.reads, atol=1e-5)


# ---------------------------------------------------------------- edges


def _constants(model, ts, tr, g):
    """Each node's affine constant: the read-out of the linear model fed only the transcoders' b_dec."""
    bd = jnp.broadcast_to((ts.b_dec / ts.out_scale[:, None])[:, None, None, :], tr.mlp_out.shape)
    reads0, final0 = R.linear_forward(model, tr.frozen, bd, jnp.zeros((1, *tr.mlp_out.shape[2:])), skips=ts.W_skip)
    enc = ts.encode_vectors()
    feat = np.array([float(reads0[l, 0, p] @ enc[l][:, f] + ts.b_enc[l, f]) for l, p, f in g.features])
    c = final0[0, -1] * (1.0 if model.lnf_w is None else model.lnf_w) + (0.0 if model.lnf_b is None else model.lnf_b)
    lg = c @ model.W_U + (0.0 if model.b_U is None else model.b_U)
    return feat, np.asarray(lg - lg.mean())[g.logit_tokens]


@pytest.mark.slow_after_first
def test_incoming_edges_sum_to_each_nodes_linear_decomposition(setup):
    model, ts = setup
    g = cj.attribution_graph(model, ts, TOKENS, batch_size=8, progress=False)
    tr = cj.trace_replacement(model, ts, TOKENS[None])
    assert g.n_features == int((np.asarray(tr.acts) > 0).sum()) == g.info["visited_features"]
    enc = ts.encode_vectors()
    pre = np.array([float(tr.reads[l, 0, p] @ enc[l][:, f] + ts.b_enc[l, f]) for l, p, f in g.features])
    np.testing.assert_allclose(pre, g.activations, atol=1e-5)  # active TopK features: activation = pre-activation
    c_feat, c_logit = _constants(model, ts, tr, g)
    np.testing.assert_allclose(g.adjacency[: g.n_features].sum(1) + c_feat, g.activations, atol=1e-4)
    np.testing.assert_allclose(g.adjacency[g.logit_slice].sum(1) + c_logit, g.logit_values, atol=1e-4)
    # a DAG in layer order: no feature feeds a feature of its own or an earlier layer, nothing feeds tokens or errors
    lay = g.features[:, 0]
    F = g.adjacency[: g.n_features, : g.n_features]
    assert not F[lay[:, None] <= lay[None, :]].any()
    assert not g.adjacency[g.n_features : g.logit_slice.start].any()
    # an error node's edges equal the read-out of its error vector
    assert np.abs(g.adjacency[:, g.error_slice]).sum() > 0


def test_graphs_from_a_token_a_logit_difference_and_a_direction(setup):
    """Every target is a read-out through the same frozen final norm, so a row is linear in it: the logit
    difference's row is token a's row minus token b's, a direction's row is the W_U-weighted sum of the token
    rows, and each row (with its constant) sums to the target's value."""
    model, ts = setup
    a, b = 4, 9
    g_a, g_b = (cj.attribution_graph(model, ts, TOKENS, target=t, batch_size=8, progress=False) for t in (a, b))
    g_ab = cj.attribution_graph(model, ts, TOKENS, target=(a, b), batch_size=8, progress=False)
    assert (g_ab.logit_tokens.tolist(), g_ab.logit_probs.tolist()) == ([-1], [1.0]) and g_a.logit_tokens.tolist() == [a]
    row = lambda g: g.adjacency[g.logit_slice][0]  # noqa: E731
    assert g_a.n_nodes == g_ab.n_nodes  # every active feature visited in each
    np.testing.assert_allclose(row(g_ab), row(g_a) - row(g_b), atol=1e-5)
    logits = np.asarray(cj.run(model, TOKENS[None]).logits[0, -1])
    assert float(g_ab.logit_values[0]) == pytest.approx(float(logits[a] - logits[b]), abs=1e-5)
    tr = cj.trace_replacement(model, ts, TOKENS[None])
    c_a = _constants(model, ts, tr, g_a)[1]
    np.testing.assert_allclose(row(g_a).sum() + c_a[0], g_a.logit_values[0], atol=1e-4)

    v = np.asarray(model.W_U[:, a] - model.W_U[:, b])  # the same read-out, given as a direction
    g_v = cj.attribution_graph(model, ts, TOKENS, target=v, batch_size=8, progress=False)
    np.testing.assert_allclose(row(g_v), row(g_ab), atol=1e-5)
    assert float(g_v.logit_values[0]) == pytest.approx(float(g_ab.logit_values[0]), abs=1e-4)
    with pytest.raises(ValueError, match=r"target must be None, a token id, a pair of token ids or a direction"):
        cj.attribution_graph(model, ts, TOKENS, target=np.ones(3), progress=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        cj.attribution_graph(model, ts, TOKENS, target=(a, 10**6), progress=False)


def test_a_skip_transcoders_skip_path_is_a_linear_path_not_error():
    """Skip transcoders (`W_skip`): the replacement model with errors still reproduces the logits, the error
    terms exclude the skip path (they equal the MLP output minus decode minus skip), and every node's incoming
    edges still sum to its linear decomposition: the skip path is inside the linear map the edges are taken from
    (dropping it there breaks the sums)."""
    cfg = tiny_configs()["llamalike"]
    model = cj.init_model(cfg, key=jax.random.key(0), std=0.3)
    dicts = [dataclasses.replace(d, W_skip=0.3 * jax.random.normal(jax.random.key(50 + l), (cfg.d_model, cfg.d_model)))
             for l, d in enumerate(_transcoders(cfg))]  # fmt: skip
    ts = cj.stack_transcoders(dicts, model_name="tiny")
    tr = cj.trace_replacement(model, ts, TOKENS[None])
    logits, _ = cj.intervene(model, ts, tr, R.no_edit(tr.acts.shape))
    np.testing.assert_allclose(logits, model(TOKENS[None]), atol=1e-4, rtol=0)
    recon = np.stack([np.asarray(ts.at(l).decode(tr.acts[l]) + tr.reads[l] @ ts.W_skip[l]) for l in range(cfg.n_layers)])
    np.testing.assert_allclose(np.asarray(tr.errors), np.asarray(tr.mlp_out) - recon, atol=1e-5)
    g = cj.attribution_graph(model, ts, TOKENS, batch_size=8, progress=False)
    c_feat, c_logit = _constants(model, ts, tr, g)
    np.testing.assert_allclose(g.adjacency[: g.n_features].sum(1) + c_feat, g.activations, atol=1e-4)
    np.testing.assert_allclose(g.adjacency[g.logit_slice].sum(1) + c_logit, g.logit_values, atol=1e-4)
    with pytest.raises(ValueError, match=r"layers \[0\] have a skip connection"):
        cj.stack_transcoders([dicts[0], *_transcoders(cfg)[1:]])


@pytest.mark.slow
def test_rows_do_not_depend_on_batching(setup):
    model, ts = setup
    a = cj.attribution_graph(model, ts, TOKENS, batch_size=8, progress=False)
    b = cj.attribution_graph(model, ts, TOKENS, batch_size=3, progress=False)
    np.testing.assert_allclose(a.adjacency, b.adjacency, atol=1e-5)
    assert b.info["backward_passes"] > a.info["backward_passes"]


@pytest.mark.slow
def test_feature_budget_visits_the_most_influential_first(setup):
    model, ts = setup
    full = cj.attribution_graph(model, ts, TOKENS, batch_size=4, progress=False)
    part = cj.attribution_graph(model, ts, TOKENS, batch_size=4, max_feature_nodes=12, progress=False)
    assert part.n_features == 12 and part.info["active_features"] == full.n_features
    # the kept rows are the full graph's rows restricted to the kept columns
    idx = [int(np.flatnonzero((full.features == f).all(1))[0]) for f in part.features]
    cols = np.concatenate([idx, np.arange(full.n_features, full.n_nodes)])
    rows = np.concatenate([idx, np.arange(full.logit_slice.start, full.n_nodes)])
    got_rows = np.concatenate([np.arange(12), np.arange(part.logit_slice.start, part.n_nodes)])
    np.testing.assert_allclose(part.adjacency[np.ix_(got_rows, np.concatenate([np.arange(12), np.arange(12, part.n_nodes)]))],
                               full.adjacency[np.ix_(rows, cols)], atol=1e-5)  # fmt: skip
    # the first batch after the logits holds the features with the largest direct influence on them
    direct = G.normalize_rows(full.adjacency)[full.logit_slice, : full.n_features]
    best = set(np.argsort(-(full.logit_probs @ direct))[:4].tolist())
    assert best <= set(idx)


# ---------------------------------------------------------------- influence, pruning, scores


def test_influence_is_the_power_series_of_a_dag():
    rng = np.random.default_rng(0)
    n = 9
    A = np.tril(rng.normal(size=(n, n)), -1) * (rng.random((n, n)) < 0.6)
    N = G.normalize_rows(A)
    w = np.zeros(n)
    w[-2:] = [0.7, 0.3]
    expect = w @ (np.linalg.inv(np.eye(n) - N) - np.eye(n))
    np.testing.assert_allclose(G.influence(N, w), expect, atol=1e-12)
    np.testing.assert_allclose(N.sum(1)[np.abs(A).sum(1) > 0], 1.0)


def _toy_graph(err_scale):
    """Two layers, two positions: token -> feature -> logit, plus error nodes weighted by err_scale."""
    L, T = 2, 2
    S = 2
    N = S + L * T + T + 1
    A = np.zeros((N, N))
    tok0 = S + L * T
    A[0, tok0] = 1.0  # token 0 -> feature 0 (layer 0)
    A[1, 0] = 2.0  # feature 0 -> feature 1 (layer 1)
    A[1, S + 0] = err_scale  # error (0, 0) -> feature 1
    A[N - 1, 1] = 1.0  # feature 1 -> logit
    A[N - 1, S + 3] = err_scale  # error (1, 1) -> logit
    return G.AttributionGraph(prompt="", tokens=np.array([0, 1]), token_strs=["a", "b"], features=np.array([[0, 1, 3], [1, 1, 4]]),
                              activations=np.ones(2, np.float32), logit_tokens=np.array([5]), logit_strs=["x"],
                              logit_probs=np.array([1.0], np.float32), logit_values=np.array([1.0], np.float32),
                              adjacency=A.astype(np.float32), n_layers=L, error_norms=np.zeros((L, T)))  # fmt: skip


def test_scores_on_graphs_with_and_without_errors():
    clean = G.graph_scores(_toy_graph(0.0))
    assert clean == pytest.approx(dict(replacement=1.0, completeness=1.0))
    s = G.graph_scores(_toy_graph(1.0))
    # logit: half from feature 1, half from an error; feature 1: 2/3 from feature 0, 1/3 from an error
    # replacement: tokens reach the logit with influence 0.5 * 2/3 * 1, errors with 0.5 + 0.5 * 1/3
    assert s["replacement"] == pytest.approx((1 / 3) / (1 / 3 + 2 / 3))
    inf = G.node_influence(_toy_graph(1.0))
    out = inf + _toy_graph(1.0).logit_weights()
    non_err = np.ones(len(out))
    non_err[1], non_err[-1] = 2 / 3, 0.5
    assert s["completeness"] == pytest.approx((non_err * out).sum() / out.sum())


@pytest.mark.slow_after_first
def test_pruning_thresholds(setup):
    model, ts = setup
    g = cj.attribution_graph(model, ts, TOKENS, batch_size=8, progress=False)
    loose, tight = cj.prune_graph(g, 1.0, 1.0), cj.prune_graph(g, 0.5, 0.9)
    assert tight.node_mask.sum() < loose.node_mask.sum() <= g.n_nodes
    assert (tight.node_mask <= loose.node_mask).all()
    assert loose.node_mask[g.token_slice.start :].all() and tight.node_mask[g.logit_slice].all()
    # every kept feature has an input and an output among kept edges
    for p in (loose, tight):
        e = p.edge_mask & p.node_mask[:, None] & p.node_mask[None, :]
        kept_f = np.flatnonzero(p.node_mask[: g.n_features])
        assert e[:, kept_f].any(0).all() and e[kept_f].any(1).all()
    inf = G.node_influence(g)
    held = inf[tight.node_mask[: len(inf)]].sum() / inf.sum()
    assert held >= 0.5 - 1e-9
    with pytest.raises(ValueError, match="node_threshold must be between 0 and 1"):
        cj.prune_graph(g, 1.5)


def test_graph_json_follows_the_circuit_tracer_schema(setup, tmp_path):
    model, ts = setup
    g = cj.attribution_graph(model, ts, TOKENS, batch_size=8, progress=False, decode=lambda i: f"t{i}")
    p = cj.prune_graph(g)
    first = g.node_ids()[int(np.flatnonzero(p.node_mask)[0])]
    js = cj.graph_json(g, p, slug="toy", supernodes=[["group", first]], scores=cj.graph_scores(g))
    ids = [n["node_id"] for n in js["nodes"]]
    assert len(ids) == len(set(ids)) == int(p.node_mask.sum())
    need = {"node_id", "feature", "layer", "ctx_idx", "feature_type", "influence", "activation", "jsNodeId", "clerp"}
    assert all(need <= set(n) for n in js["nodes"])
    assert {n["feature_type"] for n in js["nodes"]} >= {"embedding", "logit", "cross layer transcoder"}
    assert all(l["source"] in ids and l["target"] in ids and l["weight"] != 0 for l in js["links"])
    logits = [n for n in js["nodes"] if n["feature_type"] == "logit"]
    assert sum(n["is_target_logit"] for n in logits) == 1 and logits[0]["layer"] == str(model.cfg.n_layers + 1)
    assert js["metadata"]["prompt_tokens"] == [f"t{i}" for i in TOKENS] and js["qParams"]["supernodes"] == [["group", ids[0]]]
    assert 0 <= js["metadata"]["replacement_score"] <= 1
    # the saved graph round-trips
    g.save(tmp_path / "g.npz")
    back = G.AttributionGraph.load(tmp_path / "g.npz")
    np.testing.assert_array_equal(back.adjacency, g.adjacency)
    assert back.token_strs == g.token_strs and back.info == g.info


# ---------------------------------------------------------------- interventions


def test_feature_interventions(setup):
    model, ts = setup
    tr = cj.trace_replacement(model, ts, TOKENS[None])
    l, p = 0, 4
    f = int(np.flatnonzero(np.asarray(tr.acts[l, 0, p]))[0])
    a = float(tr.acts[l, 0, p, f])
    same, _ = cj.intervene(model, ts, tr, cj.edit_features(tr.acts.shape, set=[(l, p, f, a)]))
    np.testing.assert_allclose(same, tr.logits, atol=1e-4)
    for edit in (cj.edit_features(tr.acts.shape, scale=[(l, p, f, 0.0)]), cj.edit_features(tr.acts.shape, set=[(l, p, f, 5 * a)])):
        for fa in (True, False):
            out, acts = cj.intervene(model, ts, tr, edit, freeze_attention=fa)
            np.testing.assert_allclose(out[:, :p], tr.logits[:, :p], atol=1e-4)  # causal: earlier positions untouched
            assert float(jnp.max(jnp.abs(out[:, p:] - tr.logits[:, p:]))) > 1e-4
            assert float(acts[l, 0, p, f]) in (0.0, pytest.approx(5 * a))
    # injecting a prompt's own features changes nothing; another prompt's moves the logits
    assert np.allclose(cj.intervene(model, ts, tr, cj.inject_features(tr, tr, positions=[(p, p)]))[0], tr.logits, atol=1e-4)
    other = cj.trace_replacement(model, ts, np.array([[1, 5, 7, 3, 12, 2, 11]], np.int32))
    moved, acts = cj.intervene(model, ts, tr, cj.inject_features(tr, other, positions=[(4, 4)]))
    np.testing.assert_allclose(acts[:, 0, 4], other.acts[:, 0, 4], atol=1e-6)
    assert float(jnp.max(jnp.abs(moved[:, 4:] - tr.logits[:, 4:]))) > 1e-3


def test_generation_under_feature_interventions(setup):
    """`cj.generate(..., tap=cj.steer_features(...))`: a silent edit generates what the model does; an edit at
    the last layer gives, at the first new token, the replacement model's logits under the same edit
    (`intervene`, attention and norms live, errors held: the two agree exactly when nothing after the edited
    layer is recomputed); and the steered continuation differs from the plain one."""
    model, ts = setup
    L = model.cfg.n_layers
    plain = cj.generate(model, TOKENS[None], 4)
    silent = cj.generate(model, TOKENS[None], 4, tap=cj.steer_features(ts, scale=[(0, 3, 1.0)]))
    np.testing.assert_array_equal(np.asarray(silent.tokens), np.asarray(plain.tokens))
    np.testing.assert_allclose(np.asarray(silent.logits), np.asarray(plain.logits), atol=1e-4)

    tr = cj.trace_replacement(model, ts, TOKENS[None])
    f = int(np.argmax(np.asarray(tr.acts[L - 1, 0]).sum(0)))  # the last layer's busiest feature
    steered = cj.generate(model, TOKENS[None], 4, tap=cj.steer_features(ts, set=[(L - 1, f, 25.0)]))
    edit = cj.edit_features(tr.acts.shape, set=[(L - 1, slice(1, None), f, 25.0)])
    want, _ = cj.intervene(model, ts, tr, edit, freeze_attention=False)
    np.testing.assert_allclose(np.asarray(steered.logits[0, 0]), np.asarray(want[0, -1]), atol=1e-4)
    assert float(jnp.max(jnp.abs(steered.logits[0, 0] - plain.logits[0, 0]))) > 1e-2


# ---------------------------------------------------------------- loading, refusals, CLI


def _save_set(root, ds, model_name):
    for l, d in enumerate(ds):
        save_dictionary(root / f"layer_{l:02d}" / "dictionary", d, dict(model=model_name))
    (root / "transcoders.json").write_text(json.dumps(dict(model=model_name, layers={str(l): {} for l in range(len(ds))})))


def test_load_transcoders_refuses_mismatches(tmp_path):
    cfg = tiny_configs()["llamalike"]
    model = cj.init_model(cfg, key=jax.random.key(0), std=0.3)
    ds = _transcoders(cfg)
    _save_set(tmp_path / "ok", ds, "tiny")
    ts = cj.load_transcoders(tmp_path / "ok", model=model, model_name="tiny")
    assert ts.n_layers == cfg.n_layers and ts.model_name == "tiny"
    np.testing.assert_array_equal(ts.W_enc[1], ds[1].W_enc)
    with pytest.raises(ValueError, match="trained for model 'tiny', not 'smollm2'"):
        cj.load_transcoders(tmp_path / "ok", model=model, model_name="smollm2")
    wrong = list(ds)
    wrong[1] = dataclasses.replace(ds[1], in_site="blocks.1.hook_resid_mid")
    _save_set(tmp_path / "sites", wrong, "tiny")
    with pytest.raises(ValueError, match=r"maps blocks.1.hook_resid_mid -> blocks.1.hook_mlp_out; layer 1 .* needs blocks.1.ln2.hook_normalized"):
        cj.load_transcoders(tmp_path / "sites", model=model)
    _save_set(tmp_path / "short", ds[:2], "tiny")
    with pytest.raises(ValueError, match=r"no transcoder for layers \[2\]"):
        cj.load_transcoders(tmp_path / "short", model=model)
    big = cj.init_model(dataclasses.replace(cfg, d_model=32, d_head=8), key=jax.random.key(0))
    with pytest.raises(ValueError, match="maps 16 -> 16 dimensions; the model's d_model is 32"):
        cj.load_transcoders(tmp_path / "ok", model=big)
    with pytest.raises(FileNotFoundError, match="train them with experiments/train_transcoders.py"):
        cj.load_transcoders(tmp_path / "nothing")


@pytest.fixture(scope="module")
def word_model_dir(tmp_path_factory):
    cfg = dataclasses.replace(tiny_configs()["gpt2like"], d_vocab=len(WORDS), bos_token_id=BOS, eos_token_id=EOS)
    model = cj.init_model(cfg, key=jax.random.key(0), std=0.2)
    d = tmp_path_factory.mktemp("model")
    cj.save_model(d, model)
    make_tok().tok.save(str(d / "tokenizer.json"))
    return d, model


@pytest.mark.slow
def test_graph_command_end_to_end(word_model_dir, tmp_path, capsys):
    d, model = word_model_dir
    # transcoders trained by the library's own loop (tiny run), for this model by name
    m = cj.train_transcoders(model, make_tok(), tmp_path / "tc", width=32, k=4, n_tokens=4096, corpus="pydoc-topics", ctx_len=17,
                             n_eval_contexts=8, chunk_tokens=1024, train_cfg=dict(batch_size=256, warmup_steps=2, lr=1e-2),
                             progress=False, model_name=str(d), log=lambda *a: None)  # fmt: skip
    assert sorted(m["layers"]) == ["0", "1", "2"] and m["n_tokens"] == 4096
    stamp = (tmp_path / "tc" / "layer_01" / "dictionary" / "dictionary.json").stat().st_mtime_ns
    cj.train_transcoders(model, make_tok(), tmp_path / "tc", width=32, k=4, n_tokens=4096, corpus="pydoc-topics", ctx_len=17,
                         n_eval_contexts=8, chunk_tokens=1024, train_cfg=dict(batch_size=256, warmup_steps=2, lr=1e-2),
                         progress=False, model_name=str(d), log=lambda *a: None)  # fmt: skip
    assert (tmp_path / "tc" / "layer_01" / "dictionary" / "dictionary.json").stat().st_mtime_ns == stamp  # finished layers are kept
    out = tmp_path / "graph"
    args = ["graph", "--model", str(d), "--transcoders", str(tmp_path / "tc"), "--prompt", "the value of a class is", "--out", str(out),
            "--examples", "8", "--batch-size", "16", "--quiet"]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "replacement score" in text and "compiled backward passes" in text
    js = json.loads((out / "graph.json").read_text())
    scores = json.loads((out / "scores.json").read_text())
    assert js["metadata"]["prompt"] == "the value of a class is" and js["metadata"]["prompt_tokens"][0] == "<bos>"
    assert 0 <= scores["replacement"] <= 1 and 0 <= scores["completeness"] <= 1 and scores["backward_passes"] >= 1
    page = (out / "graph.html").read_text()
    assert js["nodes"][0]["node_id"] in page
    g = G.AttributionGraph.load(out / "graph.npz")
    assert g.n_nodes == len(g.adjacency)
    # a logit difference as the target (words of the tiny vocabulary)
    assert main(args[:-1] + ["--target", "diff: value| class", "--examples", "0", "--quiet"]) == 0
    assert "target: 'value - class' 1.000" in capsys.readouterr().out
    g = G.AttributionGraph.load(out / "graph.npz")
    assert g.logit_tokens.tolist() == [-1] and g.logit_strs == ["value - class"]
    assert main(args[:-1] + ["--target", "token: no such words", "--quiet"]) == 2
    assert "a target names one token" in capsys.readouterr().err

    # bad input exits 2 with the mismatch named
    assert main(["graph", "--model", str(d), "--transcoders", str(tmp_path / "tc"), "--prompt", "the", "--out", str(out),
                 "--node-threshold", "2"]) == 2  # fmt: skip
    assert "--node-threshold must be between 0 and 1" in capsys.readouterr().err
    other = tmp_path / "other"
    _save_set(other, [cj.load_dictionary(tmp_path / "tc" / f"layer_{l:02d}" / "dictionary") for l in range(3)], "smollm2")
    assert main(["graph", "--model", str(d), "--transcoders", str(other), "--prompt", "the", "--out", str(out)]) == 2
    assert "was trained for model 'smollm2'" in capsys.readouterr().err


def test_evaluate_transcoders(word_model_dir):
    d, model = word_model_dir
    cfg = model.cfg
    ts = cj.stack_transcoders(_transcoders(cfg), model_name="tiny")
    ctx = np.random.default_rng(0).integers(3, cfg.d_vocab, (4, 9)).astype(np.int32)
    ctx[:, 0] = BOS
    ev = cj.evaluate_transcoders(model, ts, ctx, batch_size=2, progress=False)
    assert len(ev["fve"]) == cfg.n_layers and all(0 < l0 <= K for l0 in ev["l0"])
    assert ev["ce_clean"] > 0 and ev["ce_zero"] > 0 and np.isfinite(ev["ce_replaced"])
    # a transcoder set that reproduces every MLP exactly is not available; zero transcoders are zero ablation
    zero = dataclasses.replace(ts, W_dec=jnp.zeros_like(ts.W_dec), b_dec=jnp.zeros_like(ts.b_dec))
    ev0 = cj.evaluate_transcoders(model, zero, ctx, batch_size=2, progress=False)
    assert ev0["ce_replaced"] == pytest.approx(ev0["ce_zero"], abs=1e-5) and ev0["ce_recovered"] == pytest.approx(0.0, abs=1e-5)
