"""The scores of one model compared with each other, on hand-made tables."""

import json

import numpy as np
import pytest

from analyses import properties as script
from rh_lens.properties import HeadScores, compute_score_comparison, load_head_scores
from tests.properties.conftest import detect_dir, switch_setup

pytestmark = pytest.mark.tl4

STEP = np.array([[0.9, 0.5, 0.0], [0.3, 0.0, 0.2]])


def test_comparison_of_known_tables():
    same_order = STEP * 0.5 + 0.01  # the same ranking, other values
    reversed_ = -STEP  # a QR-like signed score ranking every head the other way
    swapped = np.array([[0.9, 0.0, 0.0], [0.3, 0.5, 0.2]])  # top-2 {L0H0, L1H1}: 1 of 3 shared
    scores = HeadScores("m", STEP[None], others={"qr": reversed_, "mass": same_order,
                                                 "set": swapped})
    cmp = compute_score_comparison(scores, topk=(1, 2, 7), threshold=0.1)
    rows = {row["b"]: row for row in cmp.table()}
    assert list(rows) == ["set", "mass", "qr"]  # the detection order of scores
    assert rows["mass"]["spearman"] == pytest.approx(1.0)
    assert rows["mass"]["topk_jaccard"] == {"1": 1.0, "2": 1.0, "7": pytest.approx(np.nan,
                                                                                  nan_ok=True)}
    assert rows["qr"]["spearman"] == pytest.approx(-1.0)
    assert rows["qr"]["topk_jaccard"]["1"] == 0.0
    assert rows["qr"]["retrieval_jaccard"] == 0.0  # no QR value is above 0.1
    assert rows["set"]["topk_jaccard"]["2"] == pytest.approx(1 / 3)
    assert rows["set"]["topk_jaccard"]["1"] == 1.0
    text = "\n".join(cmp.lines())
    assert "against its step score" in text and "-1.000" in text
    assert compute_score_comparison(HeadScores("m", STEP[None])) is None


def test_signed_scores_only_for_qr():
    HeadScores("m", -STEP[None], score="qr")
    with pytest.raises(ValueError, match="finite and >= 0"):
        HeadScores("m", -STEP[None], score="mass")
    with pytest.raises((ValueError, TypeError)):  # TypeError: the shape check of the test run
        HeadScores("m", STEP[None], others={"qr": np.zeros((3, 3))})


def test_directory_with_several_scores(tmp_path, capsys):
    cells, trials = switch_setup()
    extra = {"trial_mass": trials[:, ::-1, ::-1] * 0.5,  # heads in reverse order
             "trial_qr": trials - 0.25}  # the same order, shifted below 0 in places
    run = detect_dir(tmp_path / "run", trials, np.ones(len(cells), bool), cells, model="zoo:x",
                     arrays=extra)
    loaded = load_head_scores(run, score="mass")
    assert loaded.score == "mass" and set(loaded.others) == {"step", "set", "qr"}
    np.testing.assert_allclose(loaded.mean, trials[:, ::-1, ::-1].mean(0) * 0.5)

    out = tmp_path / "out"
    assert script.main(["--scores", str(run), "--out", str(out), "--topk", "1", "3"]) == 0
    text = capsys.readouterr().out
    rows = {r["b"]: r for r in json.loads((out / "summary.json").read_text())
            ["models"]["zoo:x"]["scores_of_one_model"]}
    assert set(rows) == {"set", "mass", "qr"}
    assert rows["qr"]["spearman"] == pytest.approx(1.0)
    assert rows["qr"]["topk_jaccard"] == {"1": 1.0, "3": 1.0}
    step_mean = trials.mean(0).ravel()
    mass_mean = trials[:, ::-1, ::-1].mean(0).ravel()
    assert rows["mass"]["pearson"] == pytest.approx(np.corrcoef(step_mean, mass_mean)[0, 1])
    assert "scores of zoo:x against its step score" in text

    with pytest.raises(Exception, match="ran without the qr score|lacks"):
        load_head_scores(detect_dir(tmp_path / "plain", trials, np.ones(len(cells), bool),
                                    cells), score="qr")


def test_kv_groups_carry_the_other_scores_grouped():
    from rh_lens.properties import group_scores

    table = np.array([[0.9, 0.5, 0.0, 0.2], [0.3, 0.0, 0.2, 0.4]])
    scores = HeadScores("m", table[None], n_kv_heads=2, others={"mass": table * 2})
    grouped = group_scores(scores)
    np.testing.assert_allclose(grouped.others["mass"], [[1.4, 0.2], [0.3, 0.6]])
    assert compute_score_comparison(grouped, topk=(1,)).results[0].spearman == pytest.approx(1.0)
