"""The main job end to end on a small random model with SmolLM2's tokenizer (the real run is the README's
first command), and the report writer."""

import json

import jax
import numpy as np
import pytest

import circuits_jax as cj
from circuits_jax.app._ioi_job import ioi_job
from circuits_jax.app._report import Report


@pytest.fixture(scope="module")
def small(smollm2):
    _, tok = smollm2
    cfg = cj.Config(d_model=32, n_layers=2, n_heads=4, d_head=8, d_mlp=64, d_vocab=tok.vocab_size, n_ctx=64,
                    n_kv_heads=2, normalization="rmsnorm", act="silu", gated_mlp=True, positional="rotary")  # fmt: skip
    return cj.init_model(cfg, key=jax.random.key(0), std=0.2), tok


@pytest.mark.slow
def test_ioi_job_writes_a_self_contained_report_with_every_stage(small, tmp_path):
    model, tok = small
    lines = []
    s = ioi_job(model, tok, tmp_path, n=4, eap_steps=2, ks=(0.05, 1.0), progress=False, log=lines.append, model_name="tiny")
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 8  # every plot embedded
    for name in ("resid_patching", "head_patching", "path_patching", "edges", "baselines"):
        assert f'href="{name}.npz"' in page and (tmp_path / f"{name}.npz").exists()
    assert set(s["stage_seconds"]) == {line[4:-4] for line in lines if line.startswith("[")}  # each stage announced and timed
    assert len(s["stage_seconds"]) == 8
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["clean_logit_diff"] == pytest.approx(s["clean_logit_diff"])
    heads = np.load(tmp_path / "head_patching.npz")
    assert heads["exact"].shape == (2, 4) and heads["atp"].shape == (2, 4)
    # the printed top heads are the largest |exact| entries of the saved array
    top = s["top_heads_exact"][0]
    l, h = np.unravel_index(np.argmax(np.abs(heads["exact"])), heads["exact"].shape)
    assert top[0] == f"L{l}H{h}" and top[1] == pytest.approx(float(heads["exact"][l, h]))
    assert (tmp_path / "circuit.html").exists() and (tmp_path / "circuit.json").exists()


def test_report_escapes_text_and_keeps_numbers(tmp_path):
    rep = Report("a <title>", tmp_path)
    rep.text("x < y and `code`").numbers({"f": 0.123456}).table([["a", 1.5]], ["name", "value"])
    page = rep.write().read_text()
    assert "a &lt;title&gt;" in page and "x &lt; y and <code>code</code>" in page and "0.1235" in page
    assert json.loads((tmp_path / "summary.json").read_text()) == {"f": 0.123456}


def test_ioi_cli_refuses_bad_arguments_before_loading(capsys, tmp_path):
    from circuits_jax.app import cli

    assert cli.main(["ioi", "--n", "1", "--model", str(tmp_path / "absent.gguf")]) == 2
    assert "--n must be at least 2" in capsys.readouterr().err
    assert cli.main(["ioi", "--fraction", "1.5", "--model", str(tmp_path / "absent.gguf")]) == 2
    assert "--fraction" in capsys.readouterr().err


def test_ioi_command_on_a_post_norm_model_says_what_it_left_out(smollm2, tmp_path, capsys):
    """A Gemma-style model (post-attention norms) runs the node-level stages and prints why path patching and
    EAP-IG are left out (this printing raised KeyError on `circuits-jax ioi --model gemma3-270m`)."""
    from circuits_jax.app import cli

    _, tok = smollm2
    cfg = cj.Config(d_model=32, n_layers=2, n_heads=4, d_head=8, d_mlp=64, d_vocab=tok.vocab_size, n_ctx=64,
                    n_kv_heads=2, normalization="rmsnorm", act="silu", gated_mlp=True, positional="rotary",
                    post_attn_norm=True, post_mlp_norm=True)  # fmt: skip
    path = cj.save_model(tmp_path / "m", cj.init_model(cfg, key=jax.random.key(0), std=0.2))
    tok.tok.save(str(path / "tokenizer.json"))
    assert cli.main(["ioi", "--model", str(path), "--n", "2", "--out", str(tmp_path / "out"), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "left out: path patching and EAP-IG" in text and "heads whose patch matters most" in text
    assert "name movers (path patching" not in text
