"""The package's import structure, read statically: no cycles, training and plotting kept apart,
and a light ``import rh_lens``.

Every ``import`` and ``from ... import`` counts, at module level or inside a function, since a
lazy import that closes a cycle only moves the failure to the first call.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rh_lens"

pytestmark = pytest.mark.tl4


def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for __init__)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_names(name: str, path: Path) -> set[str]:
    """The dotted names ``path`` (module ``name``) imports; ``from X import Y`` gives ``X.Y``,
    a submodule or an attribute of ``X`` (:func:`resolve` tells them apart)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level - 1 >= len(base_parts):
                    raise ValueError(f"{path}:{node.lineno}: relative import beyond the package")
                base = ".".join(base_parts[: len(base_parts) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            names.update(base if alias.name == "*" else f"{base}.{alias.name}"
                         for alias in node.names)
    return names


def resolve(imported: str, modules: dict[str, Path]) -> str | None:
    """The module of the tree that ``imported`` names most specifically (``X.Y`` is ``X``
    when ``Y`` is not a submodule), or None outside the tree."""
    parts = imported.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules of the same tree it imports (no edge to itself)."""
    modules = module_files(package)
    graph = {}
    for name, path in modules.items():
        targets = {resolve(imported, modules) for imported in imported_names(name, path)}
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module, each written as the
    path ``[a, b, ..., a]``."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def connect(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                connect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(set(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_cycle_in(component, graph) for component in components]


def _cycle_in(component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A cycle through the smallest name of a strongly connected ``component`` (breadth-first, so
    the shortest one)."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for succ in sorted(graph[node] & component):
                if succ == start:
                    return [*paths[node], start]
                if succ not in paths:
                    paths[succ] = [*paths[node], succ]
                    following.append(succ)
        frontier = following
    raise AssertionError(f"{sorted(component)} is not strongly connected")


def importers_of(graph: dict[str, set[str]], target: str) -> dict[str, set[str]]:
    """Module -> the modules in or under ``target`` it imports, for modules outside ``target``."""
    def inside(name: str) -> bool:
        return name == target or name.startswith(f"{target}.")

    found = {}
    for name, targets in graph.items():
        hits = {t for t in targets if inside(t)}
        if hits and not inside(name):
            found[name] = hits
    return found


def third_party_importers(package: Path, top_level: str) -> set[str]:
    """Modules of ``package`` that import the third-party package ``top_level`` anywhere."""
    return {
        name
        for name, path in module_files(package).items()
        if any(imported.split(".")[0] == top_level for imported in imported_names(name, path))
    }


# --------------------------------------------------------------------------------------------
# The checks on rh_lens


def test_rh_lens_has_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles in rh_lens: " + "; ".join(" -> ".join(c) for c in cycles)


def test_only_the_zoos_training_imports_the_zoos_training():
    training = "rh_lens.zoo.training"
    graph = import_graph()
    assert training in graph, f"no package {training}"
    importers = importers_of(graph, training)
    assert not importers, f"the library imports the zoo's training: {importers}"


def test_only_the_plotting_package_imports_plotly():
    outside = {
        name for name in third_party_importers(PACKAGE, "plotly")
        if name != "rh_lens.plotting" and not name.startswith("rh_lens.plotting.")
    }
    assert not outside, f"modules outside rh_lens.plotting import plotly: {sorted(outside)}"


def test_import_rh_lens_loads_neither_torch_nor_transformer_lens():
    code = (
        "import sys, rh_lens\n"
        "print(sorted(m for m in ('torch', 'transformer_lens') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", f"import rh_lens loaded {done.stdout.strip()}"


# --------------------------------------------------------------------------------------------
# The checks check: a small tree with known imports


def _write(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_the_graph_resolves_absolute_relative_and_lazy_imports(tmp_path):
    package = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "import pkg.sub.c\nfrom pkg import b\nimport os\n",
        "pkg/b.py": "def f():\n    from .sub import c\n    from . import a\n    from . import *\n",
        "pkg/sub/__init__.py": "from .c import thing\n",
        "pkg/sub/c.py": "from ..b import f\nthing = 1\nimport numpy.linalg\n",
        "pkg/sub/d.py": "from pkg.sub.c import thing\nfrom pkg.sub import nothing\n",
    })
    assert import_graph(package) == {
        "pkg": set(),
        "pkg.a": {"pkg.sub.c", "pkg.b"},
        "pkg.b": {"pkg.sub.c", "pkg.a", "pkg"},
        "pkg.sub": {"pkg.sub.c"},
        "pkg.sub.c": {"pkg.b"},
        "pkg.sub.d": {"pkg.sub.c", "pkg.sub"},
    }
    assert third_party_importers(package, "numpy") == {"pkg.sub.c"}
    assert third_party_importers(package, "os") == {"pkg.a"}


def test_a_cycle_is_found_and_named(tmp_path):
    package = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\n",
        "pkg/b.py": "def f():\n    from pkg.c import x\n",
        "pkg/c.py": "from . import a\n",
        "pkg/d.py": "from pkg import a, e\n",
        "pkg/e.py": "",
    })
    assert find_cycles(import_graph(package)) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
    (package / "c.py").write_text("x = 1\n")
    assert find_cycles(import_graph(package)) == []
    assert importers_of(import_graph(package), "pkg.c") == {"pkg.b": {"pkg.c"}}
