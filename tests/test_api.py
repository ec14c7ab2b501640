"""The public API: every exported name resolves, and the notebooks use nothing else.

A notebook imports the package one way, ``import rh_lens as rl`` (or ``from rh_lens import X``
for an exported ``X``), reaches everything as ``rl.X`` with ``X`` in ``rh_lens.__all__``, and
never runs an analysis script (``analyses.*``) to get an object.
"""

import ast
import json
from pathlib import Path

import pytest

import rh_lens as rl

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_every_exported_name_resolves():
    missing = []
    for name in rl.__all__:
        try:
            getattr(rl, name)
        except (AttributeError, ImportError) as err:
            missing.append(f"{name}: {err}")
    assert not missing, missing


def test_dir_lists_the_exports():
    assert set(rl.__all__) <= set(dir(rl))
    assert len(rl.__all__) == len(set(rl.__all__))
    assert {"load_model", "compute_detect", "HeadScores", "plotting", "heads"} <= set(rl.__all__)


def test_kv_cache_head_file_and_score_names_are_exported():
    from rh_lens import headfiles, kvcache, qr
    from rh_lens.kvcache import sweep

    for module in (kvcache, headfiles, qr):
        assert module.__name__.rsplit(".", 1)[1] in rl.__all__
        assert getattr(rl, module.__name__.rsplit(".", 1)[1]) is module
    for name in ("KVPolicy", "kv_policies", "policy_hooks", "decode_kv_policy_slow",
                 "cache_bytes", "matched_window", "kept_positions"):
        assert name in rl.__all__ and getattr(rl, name) is getattr(kvcache, name), name
    assert rl.compute_kv_compress is sweep.compute_kv_compress
    for name in ("read_duo_tsv", "write_duo_tsv", "read_qrhead_yaml", "write_qrhead_yaml",
                 "head_set_table"):
        assert name in rl.__all__ and getattr(rl, name) is getattr(headfiles, name), name
    assert rl.qr_scores is qr.qr_scores and rl.question_mass is qr.question_mass
    assert rl.compute_score_comparison.__module__ == "rh_lens.properties.kinds"


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        rl.no_such_name  # noqa: B018


def code_cells(path: Path) -> list[str]:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


def api_violations(source: str, *, exported: set[str] = frozenset(rl.__all__)) -> list[str]:
    """What in one code cell reaches past the public API (empty when nothing does)."""
    lines = [line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))]
    tree = ast.parse("\n".join(lines))
    aliases, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top == "analyses":
                    found.append(f"line {node.lineno}: imports {alias.name}")
                elif top == "rh_lens":
                    if alias.name != "rh_lens":
                        found.append(f"line {node.lineno}: imports {alias.name}, not rh_lens")
                    aliases.add(alias.asname or "rh_lens")
        elif isinstance(node, ast.ImportFrom) and node.module:
            top = node.module.split(".")[0]
            if top == "analyses":
                found.append(f"line {node.lineno}: imports from {node.module}")
            elif top == "rh_lens":
                if node.module != "rh_lens":
                    found.append(f"line {node.lineno}: imports from {node.module}, not rh_lens")
                found.extend(f"line {node.lineno}: imports {a.name}, not exported by rh_lens"
                             for a in node.names if a.name not in exported)
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id == "analyses":
            found.append(f"line {node.lineno}: uses analyses")
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id in aliases and node.attr not in exported):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr} is not exported")
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and any(
                isinstance(n, ast.Name) and n.id in aliases for n in ast.walk(node.value)):
            found.append(f"line {node.lineno}: private name {node.attr}")
    return found


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 6


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_uses_only_the_public_api(path):
    cells = code_cells(path)
    assert any("import rh_lens as rl" in cell for cell in cells), "no `import rh_lens as rl`"
    found = [f"cell {i}, {v}" for i, cell in enumerate(cells) for v in api_violations(cell)]
    assert not found, found


def test_the_scan_finds_what_the_rule_forbids():
    assert api_violations("import rh_lens as rl\nmodel = rl.load_model('zoo:llama-s')\n"
                          "rl.plotting.plot_head_heatmap(rl.heads.top_heads(x, 2))") == []
    assert api_violations("from rh_lens import HeadScores, plotting") == []
    assert api_violations("%matplotlib inline\nimport numpy as np") == []
    bad = {
        "from rh_lens.heads import label": "imports from rh_lens.heads",
        "import rh_lens.zoo.inputs": "imports rh_lens.zoo.inputs",
        "from rh_lens import _loading": "not exported",
        "from analyses import detect": "imports from analyses",
        "import analyses.detect": "imports analyses.detect",
        "import rh_lens as rl\nanalyses.detect.main(['--quiet'])": "uses analyses",
        "import rh_lens as rl\nrl.properties.load_head_scores('x')": "rl.properties",
        "import rh_lens as rl\nrl.plotting._style.NIAH_SCALE": "private name _style",
    }
    for source, message in bad.items():
        found = api_violations(source)
        assert found and any(message in f for f in found), (source, found)
