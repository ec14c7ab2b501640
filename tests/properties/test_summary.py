"""The all-properties summary, as python -m analyses.properties writes it."""

import json

import numpy as np
import pytest

from analyses import properties as script
from rh_lens.results import export_reference_json
from tests.properties.conftest import detect_dir, switch_setup

pytestmark = pytest.mark.tl4


def test_script_writes_the_summary(tmp_path, capsys):
    base = np.zeros((4, 2, 4))
    base[:, 0, 1] = 0.9  # always on
    base[:, 1, 2] = [0.0, 0.6, 0.6, 0.6]  # context-dependent
    derived = base.copy()
    derived[:, 1, 3] = 0.05
    export_reference_json(tmp_path / "base.json", base)
    export_reference_json(tmp_path / "derived.json", derived)
    export_reference_json(tmp_path / "wide.json", np.ones((2, 2, 3)))
    cells, trials = switch_setup()
    run = detect_dir(tmp_path / "run", trials, np.ones(len(cells), bool), cells, model="zoo:x")
    out = tmp_path / "out"
    code = script.main(["--scores", str(tmp_path / "base.json"), str(tmp_path / "derived.json"),
                        str(tmp_path / "wide.json"), str(run), "--out", str(out),
                        "--kv-heads", "base=2", "--topk", "1", "2", "7"])
    text = capsys.readouterr().out
    assert code == 0, text
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["models"]) == ["base", "derived", "wide", "zoo:x"]
    m = summary["models"]["base"]
    for key in ("n_layers", "n_heads", "n_trials", "retrieval_heads", "share_retrieval", "bins",
                "always_on"):
        assert key in m
    assert (m["n_layers"], m["n_heads"], m["n_trials"]) == (2, 4, 4)
    assert m["retrieval_heads"] == [[0, 1, 0.9], [1, 2, pytest.approx(0.45)]]
    assert m["share_retrieval"] == 2 / 8 and m["always_on"] == [[0, 1]]
    assert m["bins"] == {"0": 0.75, "(0, 0.1]": 0.0, "(0.1, 0.5]": 0.125, "(0.5, inf)": 0.125}
    assert m["groups"]["n_kv_heads"] == 2 and summary["models"]["derived"]["groups"] is None
    assert summary["models"]["zoo:x"]["switch_on"][0]["factor"] == "needle"
    assert summary["models"]["base"]["switch_on"] is None
    assert [row["n_retrieval"] for row in m["thresholds"]] == [2] * 6  # 0.9 and 0.45
    assert m["stability"]["k"] == 8  # 10 capped at the model's 8 heads: every set is all of them
    assert m["stability"]["stable_after"]["topk_jaccard_p05"] == 1
    pairs = {(p["a"], p["b"]): p for p in summary["pairs"]}
    assert set(pairs) == {("base", "derived"), ("wide", "zoo:x")}
    assert pairs[("base", "derived")]["topk_jaccard"] == {"1": 1.0, "2": 1.0, "7": 0.75}
    assert pairs[("wide", "zoo:x")]["topk_jaccard"]["7"] is None  # 6 heads: K = 7 undefined
    assert pairs[("base", "derived")]["pearson"] == pytest.approx(
        float(np.corrcoef(base.mean(0).ravel(), derived.mean(0).ravel())[0, 1]))
    assert pairs[("wide", "zoo:x")]["pearson"] is None  # the wide map is constant
    assert len(summary["not_compared"]) == 4
    for name in ("heatmaps", "sparsity_bins", "layer_profile", "activation",
                 "correlation_pearson", "correlation_spearman", "groups_base",
                 "intrinsic_base_vs_derived_scatter", "intrinsic_base_vs_derived_heatmaps",
                 "switch_on_zoo_x", "switch_on_grid_zoo_x", "thresholds", "stability_base"):
        assert (out / f"{name}.html").is_file(), name
    assert (out / "plotly.min.js").is_file() and (out / "table.txt").read_text() in text + "\n"
    assert "always-on (frequency 1): L0H1" in text


def test_script_reports_bad_arguments(tmp_path, capsys):
    path = export_reference_json(tmp_path / "a.json", np.ones((1, 1, 2)))
    args = ["--scores", str(path), str(path), "--out", str(tmp_path / "o")]
    assert script.main(args) == 2
    assert "two inputs are named 'a'" in capsys.readouterr().err
    assert script.main([*args, "--names", "x", "y", "--kv-heads", "z=1"]) == 2
    assert "--kv-heads names no input: ['z']" in capsys.readouterr().err
    assert script.main([*args, "--names", "x"]) == 2
    assert "1 --names for 2 --scores" in capsys.readouterr().err
    assert script.main([*args, "--names", "x", "y", "--topk", "0"]) == 2
    assert "--topk values must be >= 1" in capsys.readouterr().err
