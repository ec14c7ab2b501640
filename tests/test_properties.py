"""Properties of retrieval heads: known answers on hand-made scores, both formats, bad input."""

import itertools
import json
import math

import numpy as np
import plotly.graph_objects as go
import pytest

from analyses import properties as script
from rh_lens import plotting
from rh_lens import properties as P
from rh_lens.results import RunMetadata, export_reference_json, save_result
from tests.conftest import shared_path

pytestmark = pytest.mark.tl4

# ------------------------------------------------------------------------------ helpers


def detect_dir(path, trial_step, success, cells, *, n_kv_heads=None, model="hand-made"):
    """A detection directory as analyses.detect writes it (only what properties reads)."""
    trial_step = np.asarray(trial_step, dtype=np.float64)
    n_layers, n_heads = trial_step.shape[1:]
    save_result(
        path, kind="detect", meta=RunMetadata(model_spec=model), summary={},
        config={"model": model, "shape": {"n_layers": n_layers, "n_heads": n_heads,
                                          "n_kv_heads": n_kv_heads or n_heads}},
        arrays={"trial_step": trial_step, "trial_set": np.minimum(trial_step, 1.0),
                "trial_active": (trial_step > 0).astype(np.float64),
                "success": np.asarray(success, dtype=bool)},
    )
    with open(path / "trials.jsonl", "w") as f:
        for (needle, length, depth), ok in zip(cells, success, strict=True):
            f.write(json.dumps({"cell": {"needle": needle, "length": length, "depth": depth},
                                "success": bool(ok), "generated": "x"}) + "\n")
    return path


def switch_setup():
    """12 trials: needles {0, 1} x lengths {100, 200} x depths {0, 50, 100}; all succeed.

    Head (0, 1) copies exactly when the needle is 1; head (0, 2) when depth is 0; head (0, 0)
    always; head (1, *) never.
    """
    cells = list(itertools.product((0, 1), (100, 200), (0.0, 50.0, 100.0)))
    trials = np.zeros((len(cells), 2, 3))
    for t, (needle, _, depth) in enumerate(cells):
        trials[t, 0, 0] = 0.5
        trials[t, 0, 1] = 1.0 if needle == 1 else 0.0
        trials[t, 0, 2] = 1.0 if depth == 0.0 else 0.0
    return cells, trials


def slow_spearman(x, y):
    """Spearman as Pearson of average ranks, ranks counted pairwise."""
    def ranks(v):
        return np.array([1 + (v < a).sum() + ((v == a).sum() - 1) / 2 for a in v])
    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


# ------------------------------------------------------------------------------ activation


def test_always_on_needs_every_trial():
    trials = np.zeros((4, 1, 3))
    trials[:, 0, 0] = [0.2, 0.5, 1.0, 0.05]  # active in every trial
    trials[:, 0, 1] = [0.9, 0.9, 0.0, 0.9]  # one zero trial
    scores = P.HeadScores("m", trials)
    act = P.compute_activation(scores, threshold=0.1, level=0.75)
    assert act.frequency.tolist() == [[1.0, 0.75, 0.0]]
    assert act.always_on == ((0, 0),)
    assert act.always_on_at_level == ((0, 1), (0, 0))  # highest mean score first
    assert act.context_dependent == ((0, 1),)
    assert P.compute_activation(scores, level=0.8).always_on_at_level == ((0, 0),)
    with pytest.raises(ValueError, match="level must be in"):
        P.compute_activation(scores, level=0.0)


def test_rh_lens_activity_is_used_not_the_score():
    trials = np.ones((2, 1, 2))
    active = np.array([[[True, False]], [[True, True]]])
    scores = P.HeadScores("m", trials, trial_active=active)
    assert scores.frequency.tolist() == [[1.0, 0.5]]
    assert P.HeadScores("m", trials).n_silent_trials == 0
    assert P.HeadScores("m", np.zeros((3, 1, 2))).n_silent_trials == 3


def test_switch_on_finds_the_factor():
    cells, trials = switch_setup()
    scores = P.HeadScores("m", trials, contexts=tuple(P.TrialContext(*c) for c in cells))
    sw = P.compute_switch_on(scores)
    assert sw.heads == ((0, 1), (0, 2))  # context-dependent, highest mean first (0.5 > 0.33)
    rows = sw.table()
    assert rows[0]["factor"] == "needle" and rows[0]["eta2"]["needle"] == pytest.approx(1.0)
    assert rows[0]["eta2"]["length"] == pytest.approx(0.0)
    assert rows[0]["on_when"] == [1.0, 1.0] and rows[0]["off_when"] == [0.0, 0.0]
    assert rows[1]["factor"] == "depth" and rows[1]["on_when"] == [0.0, 1.0]
    assert sw.values == ((0.0, 1.0), (100.0, 200.0), (0.0, 50.0, 100.0))
    assert sw.counts == ((6, 6), (6, 6), (4, 4, 4))
    np.testing.assert_array_equal(sw.grid[1], [[1, 1], [0, 0], [0, 0]])  # depth x length
    np.testing.assert_array_equal(sw.grid[0], np.full((3, 2), 0.5))
    # a head that always fires has no variance to explain
    always = P.compute_switch_on(scores, heads=[(0, 0)])
    assert np.isnan(always.eta2).all() and always.table()[0]["eta2"]["needle"] is None
    assert isinstance(plotting.plot_switch_on(sw), go.Figure)
    assert isinstance(plotting.plot_switch_on_grid(sw, (0, 2)), go.Figure)
    with pytest.raises(ValueError, match="not among"):
        plotting.plot_switch_on_grid(sw, (1, 1))
    with pytest.raises(ValueError, match="outside 2x3"):
        P.compute_switch_on(scores, heads=[(2, 0)])
    empty = P.compute_switch_on(scores, heads=[])
    assert empty.eta2.shape == (0, 3) and empty.table() == []


def test_switch_on_needs_contexts():
    with pytest.raises(ValueError, match="needs an rh_lens detection directory"):
        P.compute_switch_on(P.HeadScores("ref", np.ones((2, 1, 1))))


# ------------------------------------------------------------------------------ sparsity


def test_bins_and_threshold_at_boundaries():
    table = np.array([[0.0, 0.1, 0.5, 1.003], [1e-9, 0.1 + 1e-9, 0.5 + 1e-9, 0.3]])
    sp = P.compute_sparsity(table)
    assert sp.bin_labels == ("0", "(0, 0.1]", "(0.1, 0.5]", "(0.5, inf)")
    assert sp.bin_counts == (1, 2, 3, 2)  # 0.1 -> (0,0.1]; 0.5 -> (0.1,0.5]; 1.003 -> top bin
    assert sum(sp.bins.values()) == pytest.approx(1.0) and sp.bins["0"] == 1 / 8
    assert sp.n_retrieval == 5 and sp.share_retrieval == 5 / 8  # 0.1 itself is not
    assert sp.per_layer.tolist() == [2, 3]
    assert [h[:2] for h in P.retrieval_heads(table)] == [(0, 3), (1, 2), (0, 2), (1, 3), (1, 1)]
    assert P.compute_sparsity(table, threshold=0.5).n_retrieval == 2
    with pytest.raises(ValueError, match="never negative"):
        P.compute_sparsity(-table)
    with pytest.raises(ValueError, match="NaN"):
        P.compute_sparsity(np.full((2, 2), np.nan))


def test_universality_table_for_different_shapes():
    a = P.HeadScores("a", np.array([[[0.9, 0.0], [0.2, 0.05]]] * 3))
    b = P.HeadScores("b", np.zeros((2, 3, 4)))
    uni = P.compute_universality([a, b], top=2)
    assert [m.sparsity.n_retrieval for m in uni.models] == [2, 0]
    assert [h[:2] for h in uni.models[0].top_heads] == [(0, 0), (1, 0)]
    assert uni.models[0].top_heads[1][2] == pytest.approx(0.2)
    assert uni.models[0].n_always_on == 3 and uni.models[1].n_always_on == 0
    text = uni.format_table()
    assert "2x2" in text and "3x4" in text and "L0H0(0.90)" in text
    assert isinstance(plotting.plot_universality(uni), go.Figure)


# ------------------------------------------------------------------------------ intrinsic


def test_identical_and_permuted_maps():
    a = np.array([[0.0, 1.0], [2.0, 3.0]])
    same = P.compute_intrinsic(a, a.copy(), ks=(1, 2, 4))
    assert same.pearson == pytest.approx(1.0) and same.spearman == pytest.approx(1.0)
    assert same.topk_jaccard == {1: 1.0, 2: 1.0, 4: 1.0}
    swapped = P.compute_intrinsic(a, np.array([[1.0, 0.0], [3.0, 2.0]]), ks=(1, 2, 3))
    assert swapped.pearson == pytest.approx(0.6) and swapped.spearman == pytest.approx(0.6)
    assert swapped.topk_jaccard == {1: 0.0, 2: 1.0, 3: pytest.approx(0.5)}
    reversed_ = P.compute_intrinsic(a, 3 - a, ks=(1,))
    assert reversed_.spearman == pytest.approx(-1.0) and reversed_.pearson == pytest.approx(-1)


def test_spearman_with_ties_matches_slow_ranks():
    rng = np.random.default_rng(0)
    a = rng.choice([0.0, 0.0, 0.05, 0.2, 0.7], size=(6, 5))
    b = np.where(rng.random((6, 5)) < 0.3, 0.0, a + rng.random((6, 5)) * 0.1)
    r = P.compute_intrinsic(a, b, ks=(5,))
    assert r.spearman == pytest.approx(slow_spearman(a.ravel(), b.ravel()))
    assert r.pearson == pytest.approx(float(np.corrcoef(a.ravel(), b.ravel())[0, 1]))


def test_intrinsic_refuses_different_shapes_and_bad_k():
    with pytest.raises(ValueError, match=r"cannot compare 'base' \(2x2\) with 'long' \(3x2\)"):
        P.compute_intrinsic(np.ones((2, 2)), np.ones((3, 2)), names=("base", "long"))
    with pytest.raises(ValueError, match="1 <= K <= 4"):
        P.compute_intrinsic(np.ones((2, 2)), np.ones((2, 2)), ks=(5,))
    flat = P.compute_intrinsic(np.ones((2, 2)), np.eye(2), ks=(1,))
    assert math.isnan(flat.pearson) and math.isnan(flat.spearman)


def test_correlation_matrix_blank_for_other_shapes():
    a = np.array([[0.0, 1.0], [2.0, 3.0]])
    cm = P.compute_correlation_matrix({"a": a, "b": a[:, ::-1], "c": np.ones((3, 3))})
    assert cm.names == ("a", "b", "c")
    assert cm.pearson[0, 0] == pytest.approx(1.0) and cm.pearson[0, 1] == pytest.approx(0.6)
    assert np.isnan(cm.pearson[0, 2]) and np.isnan(cm.spearman[2, 1])
    assert isinstance(plotting.plot_correlation_matrix(cm, method="spearman"), go.Figure)


# ------------------------------------------------------------------------------ GQA groups


def test_group_scores_and_clustering():
    trials = np.zeros((2, 1, 4))
    trials[:, 0, 0] = [0.4, 0.0]
    trials[:, 0, 1] = [0.0, 0.8]
    scores = P.HeadScores("m", trials, n_kv_heads=2)
    grouped = P.group_scores(scores)
    np.testing.assert_allclose(grouped.mean, [[0.3, 0.0]])
    assert grouped.frequency.tolist() == [[1.0, 0.0]]  # head 0 or head 1 fired in each trial
    # max per trial, then the mean over trials: (0.4 + 0.8) / 2
    np.testing.assert_allclose(P.group_scores(scores, reduce="max").mean, [[0.6, 0.0]])
    with pytest.raises(ValueError, match="KV heads unknown"):
        P.group_scores(P.HeadScores("m", trials))
    with pytest.raises(ValueError, match="does not divide"):
        P.HeadScores("m", trials, n_kv_heads=3)

    g = P.compute_groups(scores.mean, 2)
    assert g.retrieval_per_group.tolist() == [[2, 0]]
    assert (g.n_retrieval, g.groups_hit, g.shared) == (2, 1, 2)
    # the expectations against every placement of 2 retrieval heads in 2 groups of 2
    hits, shared = [], []
    for slots in itertools.combinations(range(4), 2):
        groups = [s // 2 for s in slots]
        hits.append(len(set(groups)))
        shared.append(sum(groups.count(x) > 1 for x in groups))
    assert g.expected_groups_hit == pytest.approx(np.mean(hits))  # 5/3
    assert g.expected_shared == pytest.approx(np.mean(shared))  # 2/3
    assert isinstance(plotting.plot_groups(g, title="groups"), go.Figure)


# ------------------------------------------------------------------------------ file formats


def test_reference_file_round_trip(tmp_path):
    trials = np.random.default_rng(1).random((3, 2, 4)) * (np.arange(4) % 2)
    path = export_reference_json(tmp_path / "Some-Model.json", trials)
    scores = P.load_head_scores(path)
    assert scores.name == "Some-Model" and scores.contexts is None
    np.testing.assert_array_equal(scores.trial_scores, trials)
    np.testing.assert_array_equal(scores.trial_active, trials > 0)
    (tmp_path / "run").mkdir()
    named = P.load_head_scores(export_reference_json(tmp_path / "run" / "head_score.json", trials))
    assert named.name == "run"


def test_detection_directory_round_trip(tmp_path):
    cells, trials = switch_setup()
    success = np.ones(len(cells), dtype=bool)
    success[[0, 5]] = False
    d = detect_dir(tmp_path / "run", trials[success], success, cells, n_kv_heads=1)
    scores = P.load_head_scores(d)
    assert scores.name == "hand-made" and scores.n_kv_heads == 1
    assert scores.n_trials == 10 and scores.n_trials_run == 12
    assert scores.contexts == tuple(P.TrialContext(*c) for c, ok in zip(cells, success, strict=True)
                                    if ok)
    np.testing.assert_array_equal(scores.trial_scores, trials[success])
    assert P.load_head_scores(d, score="set").trial_scores.max() == 1.0
    # the exported reference file of the same run gives the same scores, without contexts
    ref = P.load_head_scores(export_reference_json(tmp_path / "x.json", trials[success]))
    np.testing.assert_array_equal(ref.mean, scores.mean)


@pytest.mark.parametrize(("content", "message"), [
    ("{}", "non-empty object"),
    ('{"0-0": [], "0-1": []}', "zero trials"),
    ('{"0-0": [0.1, 0.2], "0-1": [0.3]}', "ragged trials"),
])
def test_bad_reference_files(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        P.load_head_scores(path)
    assert script.main(["--scores", str(path), "--out", str(tmp_path / "out")]) == 2


def test_bad_detection_directories(tmp_path, capsys):
    cells = [(0, 100, 0.0), (0, 100, 50.0)]
    none_ok = detect_dir(tmp_path / "none", np.zeros((0, 1, 2)), [False, False], cells)
    with pytest.raises(ValueError, match="zero successful trials"):
        P.load_head_scores(none_ok)
    assert script.main(["--scores", str(none_ok), "--out", str(tmp_path / "o")]) == 2
    assert "zero successful trials (of 2)" in capsys.readouterr().err
    short = detect_dir(tmp_path / "short", np.ones((2, 1, 2)), [True, True], cells)
    (short / "trials.jsonl").write_text(
        (short / "trials.jsonl").read_text().splitlines()[0] + "\n")
    with pytest.raises(ValueError, match="1 trials, arrays.npz has 2"):
        P.load_head_scores(short)
    other = tmp_path / "other"
    save_result(other, kind="ablate", config={}, meta=RunMetadata(model_spec="m"), summary={},
                arrays={"x": np.zeros(1)})
    with pytest.raises(ValueError, match="not a detection result"):
        P.load_head_scores(other)
    with pytest.raises(ValueError, match="zero successful trials"):
        P.HeadScores("m", np.zeros((0, 2, 2)))
    with pytest.raises(ValueError, match="finite and >= 0"):
        P.HeadScores("m", -np.ones((1, 2, 2)))


# ------------------------------------------------------------------------------ the script


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
                 "switch_on_zoo_x", "switch_on_grid_zoo_x"):
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


@pytest.mark.needs_shared
def test_released_llama_2_7b_scores_match_the_paper():
    scores = P.load_head_scores(
        shared_path("data", "official_head_scores", "llama-2-7b-80k.json"))
    assert scores.shape == (32, 32) and scores.n_trials == 586
    sp = P.compute_sparsity(scores.mean)
    assert sp.n_retrieval == 33
    assert [round(100 * s, 1) for s in sp.bins.values()] == [70.2, 26.6, 2.6, 0.6]
    assert [h[:2] for h in P.retrieval_heads(scores.mean)[:3]] == [(16, 19), (11, 15), (8, 26)]
    assert len(P.compute_activation(scores).always_on) == 12
