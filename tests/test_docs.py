"""The docs check (runs in CI through pytest; no SmolLM2, a few seconds).

README.md and docs/*.md: every relative link and every repository path written in them
(`docs/*.md`, `experiments/*.py`, `benchmarks/*.py`, `circuits_jax/*.py`, `scripts/*.sh`,
`tests/*.py`) names a file that exists, and every `#anchor` a heading; every `cj.NAME` exists in
circuits_jax; every `circuits-jax COMMAND` (and `circuits-jax experiment NAME`) is one the CLI has. Every public
function and class in `circuits_jax.__all__` has a docstring of its own. The worked example of
docs/writing_interventions.md (experiments/custom_intervention.py) runs on a tiny model and its
vmapped sweep equals its Python loop.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# Pages being written while this check was; skipped (not failed) while they do not exist.
SOON = {"docs/memory_planning.md", "docs/experiments.md"}
# Paths the docs name that are outputs of a command, not files of the repository.
OUTPUTS = ("runs/", "out/", "ckpt/", "/tmp/")

_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")
_PATH = re.compile(r"(?<![\w/.-])((?:docs|experiments|benchmarks|circuits_jax|scripts|tests)/[\w./-]*\.(?:md|py|sh))\b")
_CJ = re.compile(r"\bcj\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchors(md: Path) -> set[str]:
    """GitHub's anchors for the headings of a page (lower case, punctuation dropped, spaces to '-')."""
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)
    heads = re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def broken_links(md: Path, root: Path = ROOT, soon=SOON) -> list[str]:
    """`file: target` for each relative link (with its #anchor) or repository path in `md` that names nothing."""
    text = md.read_text()
    bad = []
    for m in _LINK.finditer(text):
        full = m.group(1) or m.group(2)
        target, _, anchor = full.partition("#")
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith(OUTPUTS):
            continue  # a URL (http:, mailto:, data:), or an output
        path = (md.parent / target).resolve() if target else md
        rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
        if not path.exists():
            if rel not in soon:
                bad.append(f"{md.relative_to(root)}: link ({full})")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            bad.append(f"{md.relative_to(root)}: link ({full}): no heading #{anchor} in {rel}")
    for m in _PATH.finditer(text):
        rel = m.group(1).rstrip(".")
        if not (root / rel).exists() and rel not in soon:
            bad.append(f"{md.relative_to(root)}: path {rel}")
    return sorted(set(bad))


def unknown_names(md: Path) -> list[str]:
    """`cj.NAME` uses in `md` that circuits_jax does not have (dotted names followed through modules)."""
    import circuits_jax as cj

    bad = []
    for m in _CJ.finditer(md.read_text()):
        obj, parts = cj, m.group(1).split(".")
        for i, part in enumerate(parts):
            if not inspect.ismodule(obj):
                break
            if not hasattr(obj, part):
                bad.append(f"{md.relative_to(ROOT)}: cj.{'.'.join(parts[: i + 1])}")
                break
            obj = getattr(obj, part)
    return sorted(set(bad))


def undocumented() -> list[str]:
    """Names in `circuits_jax.__all__` that are functions or classes without a docstring of their own
    (a NamedTuple's or dataclass's generated `Name(field, ...)` does not count)."""
    import circuits_jax as cj

    bad = []
    for name in cj.__all__:
        obj = getattr(cj, name)
        if inspect.isclass(obj):
            doc = obj.__dict__.get("__doc__") or ""
            if not doc.strip() or re.match(rf"{re.escape(obj.__name__)}\(", doc.strip()):
                bad.append(name)
        elif callable(obj) and not inspect.ismodule(obj):
            if not (getattr(obj, "__doc__", None) or "").strip():
                bad.append(name)
    return bad


def test_doc_pages_exist():
    for page in ["index", "getting_started", "core_concepts", "writing_interventions"]:
        assert (ROOT / "docs" / f"{page}.md").exists(), page


def test_links_and_paths_resolve():
    bad = [b for md in doc_files() for b in broken_links(md)]
    assert not bad, "links or repository paths that name no file:\n" + "\n".join(bad)


def test_link_check_catches_a_broken_link(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "real.md").write_text("x")
    page = tmp_path / "docs" / "page.md"
    (tmp_path / "docs" / "real.md").write_text("# Real page\n\n## Sites, and shapes (B, T)\n")
    page.write_text("[ok](real.md#sites-and-shapes-b-t) [web](https://example.org/x.md) [bad](missing.md#sec) "
                    "[no anchor](real.md#nope) [here](#top) see `docs/gone.md`, `runs/ioi/report.html` and `docs/soon.md`"
                    "\n# Top\n")  # fmt: skip
    assert broken_links(page, tmp_path, soon={"docs/soon.md"}) == [
        "docs/page.md: link (missing.md#sec)",
        "docs/page.md: link (real.md#nope): no heading #nope in docs/real.md",
        "docs/page.md: path docs/gone.md",
    ]


def test_cj_names_exist():
    bad = [b for md in doc_files() for b in unknown_names(md)]
    assert not bad, "names used as cj.NAME that circuits_jax lacks:\n" + "\n".join(bad)


def test_cli_commands_in_docs_exist():
    from circuits_jax.app.cli import EXPERIMENTS, build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    bad = []
    for md in doc_files():
        text = md.read_text()
        bad += [f"{md.relative_to(ROOT)}: circuits-jax {c}" for c in re.findall(r"circuits-jax\s+([a-z][\w-]*)", text)
                if c not in sub.choices]  # fmt: skip
        bad += [f"{md.relative_to(ROOT)}: circuits-jax experiment {e}"
                for e in re.findall(r"circuits-jax\s+experiment\s+([a-z][\w-]*)", text) if e not in EXPERIMENTS]  # fmt: skip
    assert not bad, "commands the CLI does not have:\n" + "\n".join(sorted(set(bad)))


def test_public_names_have_docstrings():
    bad = undocumented()
    assert not bad, f"public functions / classes without a docstring ({len(bad)}): " + ", ".join(bad)


def _example():
    path = ROOT / "experiments" / "custom_intervention.py"
    spec = importlib.util.spec_from_file_location("custom_intervention_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_along_direction_rescales_only_the_component_along_u():
    import jax.numpy as jnp

    ex = _example()
    rng = np.random.default_rng(0)
    B, T, H, D = 2, 5, 3, 8
    x = rng.normal(size=(B, T, H, D)).astype(np.float32)
    u = rng.normal(size=(B, D)).astype(np.float32)
    u /= np.linalg.norm(u, axis=-1, keepdims=True)
    pos = np.zeros((B, T), bool)
    pos[:, -1] = True
    y = np.asarray(ex.AlongDirection(jnp.asarray(u), jnp.int32(1), jnp.float32(0.25), jnp.asarray(pos))(jnp.asarray(x)))
    edited = (slice(None), -1, 1)
    c_before = np.einsum("bd,bd->b", x[edited], u)
    c_after = np.einsum("bd,bd->b", y[edited], u)
    np.testing.assert_allclose(c_after, 0.25 * c_before, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y[edited] - c_after[:, None] * u, x[edited] - c_before[:, None] * u, atol=1e-5)
    keep = np.ones((B, T, H), bool)
    keep[:, -1, 1] = False
    np.testing.assert_array_equal(y[keep], x[keep])


@pytest.mark.slow
def test_custom_intervention_sweep_equals_loop(tmp_path):
    ex = _example()
    model, _, tokens, io, s, _ = ex.tiny_problem(4, seed=1)
    sweep = ex.sweep_every_head(model, tokens, io, s, factor=0.0, chunk=5)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    assert sweep.shape == (L, H)
    heads = [(0, 1), (2, 3)]
    looped = ex.loop_heads(model, tokens, io, s, heads, factor=0.0)
    np.testing.assert_allclose([sweep[l, h] for l, h in heads], looped, rtol=1e-5, atol=1e-6)
    clean = float(ex._logit_diff(model, *ex._inputs(model, tokens, io, s, None)))
    assert np.abs(sweep - clean).max() > 1e-6  # the edit does something
    ident = ex.sweep_every_head(model, tokens, io, s, factor=1.0)  # factor 1 is the identity
    np.testing.assert_allclose(ident, np.full((L, H), clean), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="chunk must be between 1 and 12"):
        ex.sweep_every_head(model, tokens, io, s, chunk=13)


@pytest.mark.slow
def test_custom_intervention_main_writes_report(tmp_path):
    ex = _example()
    assert ex.main(["--model", "tiny", "--n", "3", "--loop-heads", "2", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["loop_vs_vmap_max_abs_diff"] < 1e-5
    assert summary["n_heads_swept"] == 12 and len(summary["loop_heads"]) == 2
    assert (tmp_path / "report.html").stat().st_size > 1000 and (tmp_path / "heatmap.png").exists()
    with pytest.raises(SystemExit):
        ex.main(["--model", "tiny", "--n", "0", "--out", str(tmp_path)])


def python_blocks(md: Path) -> list[str]:
    """The ```` ```python ```` blocks of a page, in order."""
    return re.findall(r"```python\n(.*?)```", md.read_text(), flags=re.S)


if __name__ == "__main__":  # python tests/test_docs.py docs/PAGE.md: run a page's Python blocks in order, in one namespace
    import sys
    import time

    for page in sys.argv[1:]:
        namespace: dict = {}
        for i, block in enumerate(python_blocks(Path(page))):
            print(f"--- {page} block {i + 1}", flush=True)
            t = time.perf_counter()
            exec(compile(block, f"{page}[block {i + 1}]", "exec"), namespace)
            print(f"    ({time.perf_counter() - t:.1f} s)", flush=True)
