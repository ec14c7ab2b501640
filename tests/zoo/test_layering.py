"""The zoo sits beside the library, not inside it: the library core never imports the zoo, and
only the training package imports the training package."""

import ast
from pathlib import Path

import rh_lens

ROOT = Path(rh_lens.__file__).resolve().parent


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def _modules(under: Path, *, outside: Path | None = None) -> list[Path]:
    return [p for p in sorted(under.rglob("*.py")) if outside is None or outside not in p.parents]


def _importers(prefix: str, files: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in files
            if any(m == prefix or m.startswith(prefix + ".") for m in _imports(p))]


def test_the_library_core_never_imports_the_zoo():
    assert _importers("rh_lens.zoo", _modules(ROOT, outside=ROOT / "zoo")) == []


def test_nothing_outside_the_training_package_imports_it():
    outside = _modules(ROOT, outside=ROOT / "zoo" / "training")
    scripts = _modules(ROOT.parent / "analyses")
    assert _importers("rh_lens.zoo.training", outside + scripts) == []


def test_the_check_sees_an_import():  # the checks above can fail
    assert _importers("rh_lens.zoo.training", _modules(ROOT / "zoo" / "training"))
    assert "rh_lens.zoo.tasks" in _imports(ROOT / "zoo" / "inputs.py")
