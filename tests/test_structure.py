"""The package's structure, read from its source with `ast` (nothing of circuits_jax is imported or run).

The layers, bottom to top (docs/architecture.md, "Import rules", says why):

    layer                                       may import (besides itself)
    scale                                       nothing of ours (pure JAX)
    core                                        scale
    models                                      core, scale
    tasks, dictionaries                         core, scale, models
    patching, graph, attribution_graphs,        core, scale, models, tasks, dictionaries
      toolshed (the techniques)                 (never another technique: they meet only through core)
    plot                                        anything but app
    circuits_jax/__init__ (the public surface)  anything but app
    app                                         anything

Every import counts, also one inside a function. Further: no import cycle (a package `__init__`
re-exporting its own modules is not a cycle with them, so no module may import a package it sits
in); at most 8 modules in the package root; no underscore-private name imported from another module;
another subpackage is imported through its package (`from ..core import run`, not
`from ..core._forward import run`), and only names its `__init__` lists; the layer loop (a `lax.scan`
over the stacked blocks, or a call of `core.block`) is written only in circuits_jax/core/_forward.py.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "circuits_jax"

TECHNIQUES = ("patching", "graph", "attribution_graphs", "toolshed")
BASE = ("scale", "core", "models", "tasks", "dictionaries")
API = "circuits_jax"  # the root __init__
ALLOWED: dict[str, set[str]] = {
    "scale": set(),
    "core": {"scale"},
    "models": {"core", "scale"},
    "tasks": {"core", "scale", "models"},
    "dictionaries": {"core", "scale", "models"},
    **{t: set(BASE) for t in TECHNIQUES},
    "plot": {*BASE, *TECHNIQUES, API},
    API: {*BASE, *TECHNIQUES, "plot"},
    "app": {*BASE, *TECHNIQUES, "plot", API},
}
MAX_ROOT_MODULES = 8
LAYER_LOOP_HOME = "circuits_jax.core._forward"


@dataclass(frozen=True)
class Import:
    importer: str  # module name, e.g. circuits_jax.graph._circuit
    path: str  # file, relative to the repository
    line: int
    source: str  # the import statement as written
    module: str  # the module it imports from (resolved), e.g. circuits_jax.core
    names: tuple[str, ...]  # the names imported (empty for `import x.y`)

    def where(self) -> str:
        return f"{self.path}:{self.line} `{self.source}`"


def modules(package: Path) -> dict[str, Path]:
    """Module name -> file, for every .py file of `package` (a package's name for its `__init__.py`)."""
    out = {}
    for p in sorted(package.rglob("*.py")):
        parts = p.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


@functools.lru_cache(maxsize=4)
def imports(package: Path) -> tuple[Import, ...]:
    """Every import of the package's own modules, at module level or inside functions (read once per package)."""
    name = package.name
    mods = modules(package)
    out = []
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        rel = path.relative_to(package.parent).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                elif node.module and (node.module == name or node.module.startswith(name + ".")):
                    target = node.module
                else:
                    continue
                out.append(Import(mod, rel, node.lineno, ast.unparse(node), target, tuple(a.name for a in node.names)))
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == name or a.name.startswith(name + "."):
                        out.append(Import(mod, rel, node.lineno, ast.unparse(node), a.name, ()))
    return tuple(out)


def targets(imp: Import, mods) -> list[str]:
    """The modules an import loads: `from pkg import mod` names the module, `from pkg import name` the package."""
    if not imp.names:
        return [imp.module]
    return sorted({f"{imp.module}.{n}" if f"{imp.module}.{n}" in mods else imp.module for n in imp.names})


def layer(mod: str) -> str:
    """`core` for circuits_jax.core._forward, `plot` for circuits_jax.plot, `circuits_jax` for the root."""
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else API


def is_private(part: str) -> bool:
    return part.startswith("_") and not part.startswith("__")


def exported(init: Path) -> set[str]:
    """Names a package `__init__` binds: its imports (`X as X`), definitions and assignments."""
    names = set()
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


# ---------------------------------------------------------------- the checks, as functions of a package directory


def layer_violations(package: Path, allowed=ALLOWED) -> list[str]:
    mods = modules(package)
    bad = []
    for mod in mods:
        if layer(mod) not in allowed:
            bad.append(f"{mod}: in no layer; place it (or its subpackage) in ALLOWED of tests/test_structure.py")
    for imp in imports(package):
        src = layer(imp.importer)
        for t in targets(imp, mods):
            dst = layer(t)
            if dst != src and src in allowed and dst not in allowed[src]:
                bad.append(f"{imp.importer} ({src}) imports {t} ({dst}): {imp.where()}")
    return bad


def cycles(package: Path) -> list[str]:
    """Import cycles (any import, inside functions too). A package `__init__` re-exporting its own modules
    is no cycle with them because no module may import a package it sits in: such imports are
    reported on their own and left out of the graph."""
    mods = modules(package)
    edges: dict[str, dict[str, Import]] = {m: {} for m in mods}
    bad = []
    for imp in imports(package):
        for t in targets(imp, mods):
            if t == imp.importer or t not in mods:
                continue
            if imp.importer.startswith(t + "."):
                bad.append(f"{imp.importer} imports {t}, a package it sits in (import the defining module): {imp.where()}")
            else:
                edges[imp.importer].setdefault(t, imp)
    # strongly connected components (Tarjan, iterative)
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]
    for root in mods:
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(edges[w])))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    comps.append(sorted(comp))
    for comp in comps:
        inside = [f"{a} -> {b}: {imp.where()}" for a in comp for b, imp in edges[a].items() if b in comp]
        bad.append("import cycle among " + ", ".join(comp) + ":\n    " + "\n    ".join(inside))
    return bad


def private_imports(package: Path) -> list[str]:
    mods = modules(package)
    bad = []
    for imp in imports(package):
        for n in imp.names:
            if is_private(n) and f"{imp.module}.{n}" not in mods:
                bad.append(f"{imp.importer} imports the private name {n} from {imp.module}: {imp.where()}")
            elif is_private(n):
                bad.append(f"{imp.importer} imports the private module {imp.module}.{n}: {imp.where()}")
    return bad


def around_packages(package: Path) -> list[str]:
    """Imports from another subpackage that reach into its private modules, or ask its package for a name
    its `__init__` does not list."""
    mods = modules(package)
    bad = []
    for imp in imports(package):
        if layer(imp.module) == layer(imp.importer) or imp.module == package.name:
            continue
        parts = imp.module.split(".")
        if any(is_private(p) for p in parts):
            pkg = ".".join(parts[:2])
            bad.append(f"{imp.importer} imports from {imp.module}, inside {pkg}: import from {pkg} instead: {imp.where()}")
            continue
        path = mods.get(imp.module)
        if path is None:
            bad.append(f"{imp.importer} imports from {imp.module}, which does not exist: {imp.where()}")
        elif path.name == "__init__.py":
            have = exported(path)
            for n in imp.names:
                if n not in have and f"{imp.module}.{n}" not in mods:
                    bad.append(f"{imp.importer} imports {n} from {imp.module}, whose __init__ does not list it: {imp.where()}")
    return bad


def layer_loops(package: Path) -> list[str]:
    """`module:line` of every `lax.scan` over the stacked blocks and every call of the per-layer `block`."""
    mods = modules(package)
    found = []
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if (fname == "scan" and "blocks" in ast.unparse(node)) or fname == "block":
                found.append(f"{mod}:{node.lineno} `{ast.unparse(node)[:80]}`")
    return found


# ---------------------------------------------------------------- the tests


def test_every_import_follows_the_layers():
    bad = layer_violations(PACKAGE)
    assert not bad, "imports that break the layer table (see this file's docstring):\n" + "\n".join(bad)


def test_core_imports_nothing_above_it():
    bad = [b for b in layer_violations(PACKAGE) if b.startswith(("circuits_jax.core", "circuits_jax.scale"))]
    assert not bad, "core (and scale below it) may import only scale:\n" + "\n".join(bad)


def test_techniques_meet_only_through_core():
    mods = modules(PACKAGE)
    bad = [f"{imp.importer} imports {t}: {imp.where()}" for imp in imports(PACKAGE) for t in targets(imp, mods)
           if layer(imp.importer) in TECHNIQUES and layer(t) in TECHNIQUES and layer(t) != layer(imp.importer)]  # fmt: skip
    assert not bad, "a technique imports another technique (move what they share into core):\n" + "\n".join(bad)


def test_nothing_imports_app():
    mods = modules(PACKAGE)
    bad = [f"{imp.importer} imports {t}: {imp.where()}" for imp in imports(PACKAGE) for t in targets(imp, mods)
           if layer(t) == "app" and layer(imp.importer) != "app"]  # fmt: skip
    assert not bad, "app is the top: nothing outside it may import it:\n" + "\n".join(bad)


def test_no_import_cycles():
    bad = cycles(PACKAGE)
    assert not bad, "\n".join(bad)


def test_few_modules_in_the_package_root():
    root = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(root) <= MAX_ROOT_MODULES, f"{len(root)} modules in circuits_jax/ (at most {MAX_ROOT_MODULES}): {root}"


def test_no_private_names_across_modules():
    bad = private_imports(PACKAGE)
    assert not bad, ("underscore names imported from another module (make the name public in its module and list it "
                     "in the package's __init__):\n" + "\n".join(bad))  # fmt: skip


def test_other_subpackages_are_imported_through_their_package():
    bad = around_packages(PACKAGE)
    assert not bad, "imports that go around a subpackage's __init__:\n" + "\n".join(bad)


def test_the_layer_loop_is_written_once():
    found = layer_loops(PACKAGE)
    home = [f for f in found if f.startswith(LAYER_LOOP_HOME + ":")]
    others = [f for f in found if not f.startswith(LAYER_LOOP_HOME + ":")]
    assert home, f"no lax.scan over the stacked blocks found in {LAYER_LOOP_HOME}: the check would be vacuous"
    assert not others, (f"a layer loop outside {LAYER_LOOP_HOME} (pass a Tap to core.forward instead):\n"
                        + "\n".join(others))  # fmt: skip


def test_the_checks_catch_what_they_forbid(tmp_path):
    """A small package that breaks every rule once: each check names the offending module and import."""
    pkg = tmp_path / "circuits_jax"
    files = {
        "__init__.py": "from .core import run as run\n",
        "plot.py": "",
        "core/__init__.py": "from ._forward import run as run\n",
        "core/_forward.py": "from jax import lax\n\ndef run(model):\n    return lax.scan(f, x, model.blocks)\n",
        "core/_model.py": "def f():\n    from ..graph import acdc\n    from . import run\n",
        "scale/__init__.py": "",
        "graph/__init__.py": "from ._acdc import acdc as acdc\n",
        "graph/_acdc.py": ("from ..core._forward import run\nfrom ..core import missing\nfrom ..core._forward import _secret\n"
                           "from ..patching import sweep\nfrom ..app import cli\nfrom jax import lax\n"
                           "def acdc(model):\n    return lax.scan(body, x, (model.blocks, xs))\n"),
        "patching/__init__.py": "from ._sweep import sweep as sweep\n",
        "patching/_sweep.py": "def sweep():\n    from ..graph import acdc\n",
        "app/__init__.py": "",
        "app/cli.py": "",
        "extra.py": "",
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    layers = "\n".join(layer_violations(pkg))
    assert "circuits_jax.core._model (core) imports circuits_jax.graph (graph)" in layers
    assert "circuits_jax.graph._acdc (graph) imports circuits_jax.patching (patching)" in layers
    assert "circuits_jax.graph._acdc (graph) imports circuits_jax.app.cli (app)" in layers
    assert "circuits_jax.extra: in no layer" in layers
    assert "graph/_acdc.py:4 `from ..patching import sweep`" in layers
    cyc = "\n".join(cycles(pkg))
    assert "import cycle among circuits_jax.graph, circuits_jax.graph._acdc, circuits_jax.patching, circuits_jax.patching._sweep" in cyc
    assert "circuits_jax.core._model imports circuits_jax.core, a package it sits in" in cyc
    priv = "\n".join(private_imports(pkg))
    assert "circuits_jax.graph._acdc imports the private name _secret from circuits_jax.core._forward" in priv
    around = "\n".join(around_packages(pkg))
    assert "circuits_jax.graph._acdc imports from circuits_jax.core._forward, inside circuits_jax.core" in around
    assert "circuits_jax.graph._acdc imports missing from circuits_jax.core, whose __init__ does not list it" in around
    loops = layer_loops(pkg)
    assert [f.split(" ")[0] for f in loops] == ["circuits_jax.core._forward:4", "circuits_jax.graph._acdc:8"]
