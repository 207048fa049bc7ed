"""Self-contained HTML reports: what a job or an experiment found, readable without the code.

A `Report` collects headings, paragraphs, tables, figures and key numbers in order and writes
one `report.html` whose images are embedded (base64 PNG), so the file opens from disk, mails
and archives whole. Raw arrays go beside it (`save_arrays`, an `.npz` the page links to), and
`summary` (a dict of the numbers) goes to `summary.json`, so every number on the page can be
checked against its data. Every file is written whole (a temporary name, then renamed), so an
interrupted job leaves no half file; `figure` takes PNGs a job drew the same way (`models.atomic_path`).
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..models import write_npz, write_text

_STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 1040px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; } td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; } figcaption { color: #555; font-size: 0.9em; }
.meta { color: #666; font-size: 0.9em; } code, pre { background: #f6f6f6; padding: 1px 4px; }
.numbers { display: flex; flex-wrap: wrap; gap: 0.6em; } .numbers div { background: #f4f7fb; padding: 0.5em 0.8em; border-radius: 4px; }
.numbers b { display: block; font-size: 1.2em; }
"""


def _fmt(x: Any) -> str:
    if isinstance(x, (float, np.floating)):
        return f"{x:.4g}"
    return str(x)


class Report:
    """An HTML report built in order: `heading`, `text`, `numbers`, `table`, `figure`, `code`."""

    def __init__(self, title: str, out_dir: str | Path, *, subtitle: str = ""):
        self.title, self.subtitle = title, subtitle
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.parts: list[str] = []
        self.summary: dict[str, Any] = {}
        self.images: list[Path] = []

    def heading(self, text: str) -> Report:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")
        return self

    def text(self, text: str) -> Report:
        """A paragraph; `backticks` become code."""
        esc = html.escape(text)
        pieces = esc.split("`")
        esc = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(pieces))
        self.parts.append(f"<p>{esc}</p>")
        return self

    def numbers(self, items: dict[str, Any]) -> Report:
        """Key numbers shown as tiles (and kept in `summary`)."""
        tiles = "".join(f"<div>{html.escape(k)}<b>{html.escape(_fmt(v))}</b></div>" for k, v in items.items())
        self.parts.append(f'<div class="numbers">{tiles}</div>')
        self.summary.update(items)
        return self

    def table(self, rows: Sequence[Sequence[Any]], header: Sequence[str], *, caption: str = "") -> Report:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
        cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        self.parts.append(f"<table>{cap}<tr>{head}</tr>{body}</table>")
        return self

    def figure(self, png: str | Path, caption: str = "") -> Report:
        """Embed a PNG written by one of `plot`'s functions (it stays on disk beside the report too)."""
        png = Path(png)
        data = base64.b64encode(png.read_bytes()).decode()
        self.images.append(png)
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self.parts.append(f'<figure><img alt="{html.escape(png.name)}" src="data:image/png;base64,{data}">{cap}</figure>')
        return self

    def code(self, text: str) -> Report:
        self.parts.append(f"<pre>{html.escape(text)}</pre>")
        return self

    def save_arrays(self, name: str, **arrays) -> Path:
        """Write `name.npz` beside the report (whole: a temporary name, then renamed) and link it from the page."""
        path = self.out / f"{name}.npz"
        write_npz(path, **{k: np.asarray(v) for k, v in arrays.items()})
        self.parts.append(f'<p class="meta">raw arrays: <a href="{html.escape(path.name)}">{html.escape(path.name)}</a> '
                          f"({html.escape(', '.join(arrays))})</p>")  # fmt: skip
        return path

    def finish(self, summary: dict, seconds: dict[str, float]) -> Path:
        """End a job's report: the time-per-stage table, `summary` into `summary.json`, then `write`."""
        self.heading("Time per stage")
        self.table([[k, v] for k, v in seconds.items()], ["stage", "seconds"])
        self.summary.update(summary)
        return self.write()

    def write(self, name: str = "report.html") -> Path:
        """Write the page and `summary.json`, each whole (a temporary name, then renamed); returns the page's path."""
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        sub = f'<p class="meta">{html.escape(self.subtitle)} · written {stamp}</p>'
        page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{_STYLE}</style></head><body><h1>{html.escape(self.title)}</h1>{sub}"
                + "\n".join(self.parts) + "</body></html>")  # fmt: skip
        path = self.out / name
        write_text(path, page)
        write_text(self.out / "summary.json", json.dumps(self.summary, indent=1, default=_json_default))
        return path


def _json_default(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    return str(x)


class Stages:
    """Times the stages of a job: `with stages("name"):` says when it starts and how long it took,
    and keeps the seconds (`stages.seconds`) for the report and the printed summary."""

    def __init__(self, log: Callable[[str], None] = print):
        self.log, self.seconds, self.t0 = log, {}, time.perf_counter()

    def __call__(self, name: str):
        stages = self

        class _Stage:
            def __enter__(self):
                stages.log(f"[{len(stages.seconds) + 1}] {name} ...")
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                if exc[0] is None:
                    stages.seconds[name] = round(time.perf_counter() - self.t, 1)
                    stages.log(f"    {name}: {stages.seconds[name]:.1f} s")

        return _Stage()


def top_heads(scores, k: int, sign: int = 0) -> list[tuple[str, float]]:
    """The `k` heads `("L{l}H{h}", score)` of `[layer, head]` scores with the largest |score|
    (`sign=0`), or the most positive (1) or negative (-1)."""
    scores = np.asarray(scores)
    flat = scores.ravel()
    order = np.argsort(-np.abs(flat) if sign == 0 else -sign * flat)[:k]
    H = scores.shape[1]
    return [(f"L{i // H}H{i % H}", float(flat[i])) for i in order]
