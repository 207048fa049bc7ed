"""The standalone attribution-graph viewer: a self-contained page, and (in headless Chromium) that it
draws every node, opens the node panel on a click and makes supernodes."""

import json
import re
import shutil
from pathlib import Path

import pytest

from circuits_jax.attribution_graphs._html import graph_html

EVIL = "</script><b>x"  # a token that would end the data script if it were not escaped
TOKENS = ["<bos>", "The", " Golden", EVIL]
L = 3  # layers; logits sit at layer L + 1


def _node(node_id, layer, feature, pos, ftype, *, clerp="", act=None, infl=None, prob=0.0, target=False):
    return {"node_id": node_id, "feature": feature, "layer": layer, "ctx_idx": pos, "feature_type": ftype,
            "token_prob": prob, "is_target_logit": target, "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": node_id,
            "clerp": clerp, "influence": infl, "activation": act}  # fmt: skip


def make_graph():
    emb = [_node(f"E_{v}_{p}", "E", v, p, "embedding") for p, v in enumerate([1, 464, 8090, 666])]
    feats = [
        ("0", 11, 1), ("0", 12, 2), ("0", 13, 3), ("1", 21, 2), ("1", 22, 3), ("1", 23, 3), ("2", 31, 3), ("2", 32, 3),
    ]  # fmt: skip
    fnodes = [_node(f"{l}_{f}_{p}", l, f, p, "cross layer transcoder", act=1.5 + f / 10, infl=0.1 * i,
                    clerp="golden things" if f == 21 else "") for i, (l, f, p) in enumerate(feats)]  # fmt: skip
    errs = [_node(f"{l}_-1_3", str(l), -1, 3, "mlp reconstruction error", infl=0.9) for l in range(L)]
    logits = [
        _node(f"{L + 1}_4100_3", str(L + 1), 4100, 3, "logit", clerp='Output " Gate" (p=0.612)', prob=0.612, target=True),
        _node(f"{L + 1}_4200_3", str(L + 1), 4200, 3, "logit", clerp='Output " State" (p=0.101)', prob=0.101),
    ]  # fmt: skip
    pairs = [
        ("E_464_1", "0_11_1", 0.8), ("E_8090_2", "0_12_2", 1.9), ("E_666_3", "0_13_3", 0.7), ("0_11_1", "1_21_2", -0.4),
        ("0_12_2", "1_21_2", 2.5), ("E_8090_2", "1_21_2", 0.6), ("0_13_3", "1_22_3", 0.9), ("0_-1_3", "1_22_3", -0.3),
        ("E_666_3", "1_23_3", 0.5), ("1_21_2", "2_31_3", 1.7), ("1_22_3", "2_31_3", 0.4), ("1_23_3", "2_32_3", -0.8),
        ("1_-1_3", "2_32_3", 0.2), ("0_12_2", "2_31_3", 0.3), ("2_31_3", "4_4100_3", 3.0), ("2_32_3", "4_4100_3", -1.1),
        ("2_-1_3", "4_4100_3", 0.5), ("1_21_2", "4_4100_3", 1.2), ("2_31_3", "4_4200_3", -0.9), ("E_666_3", "4_4200_3", 0.3),
    ]  # fmt: skip
    return {
        "metadata": {"slug": "golden-gate", "scan": "toy", "transcoder_list": [], "prompt_tokens": TOKENS,
                     "prompt": "".join(TOKENS), "node_threshold": 0.8, "schema_version": 1, "model": "toy-3L",
                     "replacement_score": 0.8123, "completeness_score": 0.9345},  # fmt: skip
        "qParams": {"pinnedIds": [], "supernodes": [["early golden", "0_12_2", "E_8090_2"]], "linkType": "both",
                    "clickedId": "", "sg_pos": ""},  # fmt: skip
        "nodes": emb + fnodes + errs + logits,
        "links": [{"source": s, "target": t, "weight": w} for s, t, w in pairs],
    }


FEATURES = {
    "0_12": {"density": 0.003, "label": "golden", "top": [{"tokens": ["the", " golden", " retriever"], "acts": [0, 4.2, 0.5]}]},
    "1_21": {"density": 0.001, "top": [
        {"tokens": ["<bos>", "Golden", " Gate", " Bridge"], "acts": [0.0, 2.0, 3.5, 1.0]},
        {"tokens": ["a", " gilded", EVIL], "acts": [0.1, 1.2, 0.0]},
    ]},
    "2_31": {"density": 0.02, "top": []},
}  # fmt: skip
# "0_11", "1_22", ... have no entry: their panel says "no examples"


def _strongest_neighbour(graph, node_id):
    inc = [(abs(l["weight"]), l["target"] if l["source"] == node_id else l["source"])
           for l in graph["links"] if node_id in (l["source"], l["target"])]  # fmt: skip
    return max(inc)[1]


def test_page_is_self_contained_and_embeds_the_graph():
    graph = make_graph()
    page = graph_html(graph, FEATURES, title="Toy <graph>")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<title>Toy &lt;graph&gt;</title>" in page
    assert not re.search(r"<script[^>]*\ssrc\s*=", page, re.I)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", page, re.I)
    assert not re.search(r"@import", page)
    m = re.search(r'<script type="application/json" id="graph-data">(.*?)</script>', page, re.S)
    assert m, "no data script"
    raw = m.group(1)
    assert "</" not in raw  # the token "</script>" did not end the element early
    data = json.loads(raw.replace("<\\/", "</"))
    assert data == {"graph": graph, "features": FEATURES}
    assert json.loads(raw) == data  # "<\/" is also a valid JSON escape of "/"
    for n in graph["nodes"]:
        assert n["node_id"] in raw
    # exactly two scripts: the data and the viewer
    assert len(re.findall(r"<script\b", page)) == 2
    # without features, with numpy numbers and a NaN
    np = pytest.importorskip("numpy")
    g2 = make_graph()
    g2["links"][0]["weight"] = np.float32(0.5)
    g2["nodes"][0]["influence"] = float("nan")
    raw2 = re.search(r'id="graph-data">(.*?)</script>', graph_html(g2), re.S).group(1)
    d2 = json.loads(raw2)
    assert d2["features"] is None
    assert d2["graph"]["links"][0]["weight"] == 0.5 and d2["graph"]["nodes"][0]["influence"] is None


CHROMIUM = "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else shutil.which("chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]  # fmt: skip


@pytest.mark.slow
def test_viewer_in_headless_chromium(tmp_path):
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; it is in the [test] extra)")
    if not CHROMIUM:
        pytest.skip("no Chromium at /usr/bin/chromium or on PATH (apt-get install chromium)")
    graph = make_graph()
    html = tmp_path / "graph.html"
    html.write_text(graph_html(graph, FEATURES, title="Toy graph"), encoding="utf-8")
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 860}, accept_downloads=True)
            page.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
            page.goto(html.as_uri())
            expect(page.locator("header")).to_contain_text("toy-3L")
            expect(page.locator("header")).to_contain_text("0.8123")
            assert page.locator("[data-node-id]").count() == len(graph["nodes"])
            assert page.locator(".node").count() == len(graph["nodes"])
            assert page.locator("line.edge").count() == len(graph["links"])
            expect(page.locator(".sn-label")).to_have_text(["early golden"])  # from qParams.supernodes
            panel = page.locator("#node-panel")
            expect(panel).to_be_hidden()

            node = "1_21_2"
            page.click(f'[data-node-id="{node}"]')
            expect(panel).to_be_visible()
            expect(panel).to_contain_text(node)
            expect(panel).to_contain_text("Bridge")  # one of its top-context tokens
            expect(panel).to_contain_text(_strongest_neighbour(graph, node))  # "0_12_2", weight 2.5
            expect(panel).to_contain_text("golden things")
            page.screenshot(path=str(tmp_path / "viewer.png"), full_page=True)
            # jump through the panel to a neighbour, which has no examples
            page.locator("#node-panel li", has_text="0_11_1").first.click()
            expect(panel.locator(".nid").first).to_have_text("0_11_1")
            expect(panel).to_contain_text("no examples")
            page.keyboard.press("Escape")
            expect(panel).to_be_hidden()

            # a supernode of two nodes: shift-click both, name it, group
            page.click('[data-node-id="2_31_3"]', modifiers=["Shift"])
            page.click('[data-node-id="2_32_3"]', modifiers=["Shift"])
            expect(panel).to_be_hidden()  # shift-click selects, it does not open the panel
            page.fill("#supernode-name", "late say-Gate")
            page.click("#make-supernode")
            expect(page.locator("#supernode-list")).to_contain_text("late say-Gate")
            expect(page.locator(".sn-label")).to_have_text(["early golden", "late say-Gate"])
            with page.expect_download() as dl:
                page.click("#download-json")
            out = json.loads(Path(dl.value.path()).read_text(encoding="utf-8"))
            assert out["qParams"]["supernodes"] == [["early golden", "0_12_2", "E_8090_2"],
                                                    ["late say-Gate", "2_31_3", "2_32_3"]]  # fmt: skip
            assert out["nodes"] == graph["nodes"] and out["links"] == graph["links"]

            # the |weight| slider hides weak links
            page.locator("#weight-threshold").fill("1000")
            assert page.locator("line.edge:not(.off)").count() == 1  # only the max |weight| link is left
        finally:
            browser.close()
    assert errors == []
    png = tmp_path / "viewer.png"
    assert png.exists() and png.stat().st_size > 5000
