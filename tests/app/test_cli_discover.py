"""`circuits-jax discover` end to end: the circuit files, curve and drawings, on models with known circuits,
and once on SmolLM2 IOI with EAP."""

import json

import numpy as np
import pytest

import circuits_jax as cj
from circuits_jax.app.cli import main


def test_discover_acdc_on_a_hand_built_model_finds_its_truth_and_writes_everything(tmp_path, capsys):
    out = tmp_path / "acdc"
    assert main(["discover", "--task", "modular-sum", "--method", "acdc", "--threshold", "0.5", "--n", "8",
                 "--out", str(out), "--quiet"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "edge ROC AUC" in text and "f = " in text
    for name in ("circuit.json", "faithfulness.json", "faithfulness.png", "circuit.png", "circuit.html"):
        assert (out / name).stat().st_size > 200, name
    circuit = cj.load_circuit(out / "circuit")
    model, task = cj.load_task("modular-sum", n=8)
    np.testing.assert_array_equal(circuit.edges, task.truth)  # the hand-built circuit, exactly
    assert circuit.meta["faithfulness"] == pytest.approx(1.0, abs=1e-3)
    doc = json.loads((out / "circuit.json").read_text())
    assert {e["source"] + "->" + e["destination"] for e in doc["edges"]} == {
        "input->a0.h0<v>", "input->a0.h1<v>", "a0.h0->m0", "a0.h1->m0", "m0->logits"}  # fmt: skip
    curve = json.loads((out / "faithfulness.json").read_text())
    assert curve["f"][-1] == pytest.approx(1.0, abs=1e-4) and len(curve["f"]) == len(cj.FAITHFULNESS_KS)


@pytest.mark.slow
def test_discover_eap_ig_greedy_circuit_size_and_bad_input(tmp_path, capsys):
    out = tmp_path / "eap"
    assert main(["discover", "--task", "marker-lookup", "--method", "eap-ig", "--fraction", "0.05", "--n", "8",
                 "--out", str(out), "--quiet", "--steps", "4"]) == 0  # fmt: skip
    c = cj.load_circuit(out / "circuit.json")
    assert c.n_edges == round(0.05 * c.graph.n_edges) and c.edges[:, -1].any()
    assert c.method == "eap-ig-greedy"
    assert main(["discover", "--task", "ioi-abc", "--out", str(tmp_path / "x")]) == 2
    assert "valid tasks: ioi" in capsys.readouterr().err
    assert main(["discover", "--task", "modular-sum", "--method", "eap", "--level", "node", "--out", str(tmp_path / "y")]) == 2
    assert main(["discover", "--task", "modular-sum", "--method", "eap", "--ablation", "zero", "--out", str(tmp_path / "z")]) == 2
    assert "--ablation zero is for ACDC" in capsys.readouterr().err


@pytest.mark.smollm2
def test_discover_eap_on_smollm2_ioi(smollm2, tmp_path, capsys):
    out = tmp_path / "ioi"
    assert main(["discover", "--task", "ioi", "--method", "eap", "--n", "2", "--fraction", "0.002",
                 "--out", str(out), "--quiet"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "ioi: eap (greedy, 141 edges)" in text
    c = cj.load_circuit(out / "circuit")
    assert c.n_edges == 141 and c.meta["clean_metric"] > c.meta["corrupt_metric"]
    assert (out / "circuit.html").read_text().count("<path") >= 141
