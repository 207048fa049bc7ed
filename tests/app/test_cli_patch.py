"""`circuits-jax patch` end to end on SmolLM2: npz contents, heatmap, and bad input."""

import numpy as np
import pytest

from circuits_jax.app.cli import main

pytestmark = pytest.mark.smollm2

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


def _args(tmp_path, *extra):
    return ["patch", "--clean", CLEAN, "--corrupt", CORRUPT, "--answer", " Mary", "--wrong", " John",
            "--out", str(tmp_path / "r.npz"), "--quiet", *extra]  # fmt: skip


def test_patch_writes_result_metrics_tokens_and_png(smollm2, tmp_path, capsys):
    assert main(_args(tmp_path, "--site", "resid_pre", "--by", "layer,pos", "--png", str(tmp_path / "r.png"))) == 0
    d = np.load(tmp_path / "r.npz")
    assert d["result"].shape == (30, 14)
    assert float(d["clean_metric"]) > 3 > -3 > float(d["corrupt_metric"])  # the model solves IOI; corrupt flips it
    assert list(d["str_tokens"])[9] == " John" and list(d["corrupt_str_tokens"])[9] == " Mary"
    assert float(d["seconds"]) > 0
    # layer 0, the position where the prompts differ: patching the whole residual there restores the clean run
    np.testing.assert_allclose(d["result"][0, 9], 1.0, atol=1e-3)
    np.testing.assert_array_equal(d["result"][:, :9], 0.0)  # identical prefix: exactly no effect
    assert (tmp_path / "r.png").stat().st_size > 10_000
    assert "clean logit diff" in capsys.readouterr().out


def test_patch_by_head_with_layers(smollm2, tmp_path):
    assert main(_args(tmp_path, "--site", "z", "--by", "layer,pos,head", "--layers", "23,29")) == 0
    d = np.load(tmp_path / "r.npz")
    assert d["result"].shape == (2, 14, 9) and list(d["layers"]) == [23, 29]


def test_patch_bad_input(smollm2, tmp_path, capsys):
    assert main(_args(tmp_path, "--answer", " Maryanne")) == 2
    assert "is not a single token" in capsys.readouterr().err
    assert main(["patch", "--clean", CLEAN, "--corrupt", "When Mary went", "--answer", " Mary", "--wrong", " John",
                 "--out", str(tmp_path / "x.npz")]) == 2  # fmt: skip
    assert "equal token length" in capsys.readouterr().err
    assert main(_args(tmp_path, "--site", "z", "--by", "layer,neuron")) == 2
    assert "invalid axes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(_args(tmp_path, "--site", "zz"))
    assert "invalid choice" in capsys.readouterr().err


def test_attribute_atp_writes_the_same_layout_and_tracks_the_exact_sweep(smollm2, tmp_path):
    args = ["--clean", CLEAN, "--corrupt", CORRUPT, "--answer", " Mary", "--wrong", " John", "--site", "z", "--by", "layer,head"]
    assert main(["attribute", "--method", "atp", *args, "--out", str(tmp_path / "a.npz")]) == 0
    assert main(["patch", *args, "--quiet", "--out", str(tmp_path / "p.npz")]) == 0
    a, p = np.load(tmp_path / "a.npz"), np.load(tmp_path / "p.npz")
    assert a["result"].shape == p["result"].shape == (30, 9) and str(a["method"]) == "atp"
    np.testing.assert_allclose(float(a["clean_metric"]), float(p["clean_metric"]), atol=1e-3)
    assert np.corrcoef(a["result"].ravel(), p["result"].ravel())[0, 1] > 0.9


PAIR = ["--clean", CLEAN, "--corrupt", CORRUPT, "--answer", " Mary", "--wrong", " John"]


def test_attribute_atp_star_and_eap(smollm2, tmp_path, capsys):
    assert main(["attribute", "--method", "atp-star", *PAIR, "--site", "k", "--by", "layer,head",
                 "--out", str(tmp_path / "s.npz")]) == 0  # fmt: skip
    s = np.load(tmp_path / "s.npz")
    assert s["result"].shape == (30, 3) and str(s["method"]) == "atp-star"  # k: kv heads
    assert main(["attribute", "--method", "eap", *PAIR, "--out", str(tmp_path / "e.npz"), "--png", str(tmp_path / "e.png")]) == 0
    e = np.load(tmp_path / "e.npz")
    assert e["scores"].shape == (len(e["sources"]), len(e["destinations"])) == (301, 481) == e["mask"].shape
    assert np.all(e["scores"][~e["mask"]] == 0) and np.abs(e["scores"]).max() > 0.1
    assert (tmp_path / "e.png").stat().st_size > 10_000
    assert "70651 edges" in capsys.readouterr().out


def test_path_patch_command(smollm2, tmp_path, capsys):
    out = tmp_path / "pp.npz"
    assert main(["path-patch", *PAIR, "--receivers", "logits", "--out", str(out), "--png", str(tmp_path / "pp.png"), "--quiet"]) == 0
    d = np.load(out)
    assert d["result"].shape == (1, 30, 9) and list(d["axes"]) == ["receiver", "layer", "head"]
    assert (tmp_path / "pp.png").stat().st_size > 10_000
    assert "-> logits" in capsys.readouterr().out
    assert main(["path-patch", *PAIR, "--receivers", "a23.h3<x>", "--out", str(out)]) == 2
    assert "nearest valid: " in capsys.readouterr().err
