"""The retrieval-head set across thresholds and across the number of trials."""

import numpy as np
import pytest

from rh_lens.properties import HeadScores
from rh_lens.properties.stability import compute_stability, compute_threshold_sweep

pytestmark = pytest.mark.tl4


def test_threshold_sweep_counts_and_overlaps_on_a_hand_made_table():
    table = np.array([[0.0, 0.06, 0.12], [0.2, 0.31, 0.5]])
    sweep = compute_threshold_sweep(table, thresholds=(0.05, 0.1, 0.15, 0.2, 0.3))
    assert sweep.n_retrieval.tolist() == [5, 4, 3, 2, 2]  # strictly above: 0.2 is not > 0.2
    np.testing.assert_allclose(sweep.share, np.array([5, 4, 3, 2, 2]) / 6)
    np.testing.assert_allclose(sweep.jaccard_with_default, [4 / 5, 1, 3 / 4, 2 / 4, 2 / 4])
    assert compute_threshold_sweep(np.zeros((2, 2)), thresholds=(0.3,)).jaccard_with_default[0] == 1
    with pytest.raises(ValueError, match="at least one threshold"):
        compute_threshold_sweep(table, thresholds=())


def test_identical_trials_are_stable_from_the_first():
    trials = np.tile(np.array([[0.9, 0.0], [0.3, 0.05]]), (5, 1, 1))
    curve = compute_stability(HeadScores("same", trials), k=2, draws=20)
    assert curve.sizes.tolist() == [1, 2, 3, 4, 5]
    for measure in (curve.topk_jaccard, curve.retrieval_jaccard, curve.spearman):
        np.testing.assert_allclose(measure, 1.0)
    assert curve.stable_after() == 1 and curve.stable_after(percentile=5) == 1


def test_a_head_that_ties_the_top_one_in_one_trial_of_four_has_the_known_rates():
    # Head 0 copies in trial 0 only; head 1 in every trial.  A resample of m trials ranks head 0
    # first (a tie, broken in layer-major order) only when all m draws are trial 0: 1 / 4**m.
    trials = np.zeros((4, 1, 3))
    trials[0, 0, 0] = 1.0
    trials[:, 0, 1] = 1.0
    curve = compute_stability(HeadScores("tie", trials), k=1, draws=4000, seed=1)
    expected = [1 - 1 / 4, 1 - 1 / 16, 1 - 1 / 64, 1 - 1 / 256]
    np.testing.assert_allclose(curve.topk_jaccard.mean(axis=1), expected, atol=0.03)
    # Retrieval heads (> 0.1) of all trials: both.  One draw keeps head 0 only if it is trial 0.
    assert curve.retrieval_jaccard[0].mean() == pytest.approx(1 / 4 + 3 / 4 * 1 / 2, abs=0.03)
    assert curve.stable_after() == 2
    assert curve.stable_after(level=0.999) is None  # 1 - 1/256 in expectation never reaches it
    table = curve.table()
    assert [row["n_trials"] for row in table] == [1, 2, 3, 4] and table[0]["k"] == 1


def test_resamples_are_seeded_and_inputs_checked():
    rng = np.random.default_rng(0)
    scores = HeadScores("random", rng.random((30, 2, 4)))
    a, b = (compute_stability(scores, draws=10, k=3, seed=7) for _ in range(2))
    np.testing.assert_array_equal(a.topk_jaccard, b.topk_jaccard)
    np.testing.assert_array_equal(a.spearman, b.spearman)
    other = compute_stability(scores, draws=10, k=3, seed=8)
    assert not np.array_equal(a.spearman, other.spearman)
    with pytest.raises(ValueError, match="1 <= K <= 8"):
        compute_stability(scores, k=9)
    with pytest.raises(ValueError, match="draws must be at least 1"):
        compute_stability(scores, k=3, draws=0)
    with pytest.raises(ValueError, match="trial counts must be >= 1"):
        compute_stability(scores, k=3, sizes=[0, 5])
