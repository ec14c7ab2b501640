"""Bootstrap intervals, the paired permutation test and Benjamini-Hochberg, on hand-made data
whose answers are known by construction or by exhaustive enumeration."""

import itertools

import numpy as np
import pytest

from rh_lens import stats

pytestmark = pytest.mark.tl4


def test_bootstrap_of_constant_values_is_a_point():
    ci = stats.bootstrap_ci(np.full(9, 0.25))
    assert (ci.mean, ci.low, ci.high) == (0.25, 0.25, 0.25)


def test_bootstrap_of_binary_trials_follows_the_binomial():
    # 20 trials, 10 successes: a resampled mean is Binomial(20, 1/2) / 20, whose 2.5 % and
    # 97.5 % quantiles are 6/20 and 14/20 (P(X <= 5) = 0.021, P(X <= 6) = 0.058).
    values = np.array([0.0, 1.0] * 10)
    ci = stats.bootstrap_ci(values, n_boot=20000, seed=3)
    assert ci.mean == 0.5
    assert (ci.low, ci.high) == (0.3, 0.7)
    assert stats.bootstrap_ci(values, seed=3) == stats.bootstrap_ci(values, seed=3)


def test_bootstrap_over_draws_holds_the_variation_between_draws():
    # Two draws, constant over trials: resampling trials alone sees no variation; resampling
    # the draws gives means 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4.
    draws = np.array([[0.0] * 6, [1.0] * 6])
    ci = stats.bootstrap_ci(draws, n_boot=4000)
    assert (ci.mean, ci.low, ci.high) == (0.5, 0.0, 1.0)
    single = stats.bootstrap_ci(draws.mean(axis=0))
    assert (single.low, single.high) == (0.5, 0.5)


def slow_exact_p(a, b, alternative):
    """Every relabelling of the pairs (swap a_i and b_i or not), by brute force."""
    observed = np.mean(a) - np.mean(b)
    hits = 0
    combos = list(itertools.product((False, True), repeat=len(a)))
    for swap in combos:
        x = [bi if s else ai for ai, bi, s in zip(a, b, swap, strict=True)]
        y = [ai if s else bi for ai, bi, s in zip(a, b, swap, strict=True)]
        stat = np.mean(x) - np.mean(y)
        if alternative == "two-sided":
            hits += abs(stat) >= abs(observed) - 1e-12
        elif alternative == "greater":
            hits += stat >= observed - 1e-12
        else:
            hits += stat <= observed + 1e-12
    return hits / len(combos)


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_permutation_p_value_equals_exhaustive_enumeration(alternative):
    rng = np.random.default_rng(0)
    a = rng.normal(0.4, 1.0, size=10)
    b = rng.normal(0.0, 1.0, size=10)
    p = stats.paired_permutation_test(a, b, alternative=alternative)
    assert p == pytest.approx(slow_exact_p(a, b, alternative), abs=1e-12)


def test_permutation_known_answers():
    # differences 1, 2, 3: the 8 sign assignments give sums 6, 4, 2, 0, 0, -2, -4, -6
    a, b = np.array([1.0, 2.0, 3.0]), np.zeros(3)
    assert stats.paired_permutation_test(a, b) == 2 / 8
    assert stats.paired_permutation_test(a, b, alternative="greater") == 1 / 8
    assert stats.paired_permutation_test(a, b, alternative="less") == 1.0
    # one head matters: masking it fails every trial, the control none -> p = 2 / 2**n
    assert stats.paired_permutation_test(np.ones(12), np.zeros(12)) == 2 / 2**12
    assert stats.paired_permutation_test(np.ones(5), np.ones(5)) == 1.0


def test_monte_carlo_p_value_is_seeded_and_close_to_the_exact_one():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.3, 1, size=16), rng.normal(0, 1, size=16)
    exact = stats.paired_permutation_test(a, b, n_perm=2**16)  # enumerates all 65536
    approx = stats.paired_permutation_test(a, b, n_perm=5000, seed=4)
    assert approx == stats.paired_permutation_test(a, b, n_perm=5000, seed=4)
    assert abs(approx - exact) < 0.02
    assert stats.paired_permutation_test(np.ones(40), np.zeros(40), n_perm=999) == 1 / 1000


def test_benjamini_hochberg_against_a_hand_computation():
    # sorted 0.005, 0.01, 0.03, 0.04, 0.5 (m = 5) -> p m / rank = 0.025, 0.025, 0.05, 0.05, 0.5;
    # the running minimum from the top leaves them as they are
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.5])
    np.testing.assert_allclose(stats.benjamini_hochberg(p), [0.025, 0.05, 0.05, 0.025, 0.5])
    # 0.02, 0.021 (m = 2): 0.04, 0.021 -> the minimum from the top makes both 0.021
    np.testing.assert_allclose(stats.benjamini_hochberg([0.02, 0.021]), [0.021, 0.021])
    q = stats.benjamini_hochberg([0.9, np.nan, 0.6])
    np.testing.assert_allclose(q, [0.9, np.nan, 0.9])
    np.testing.assert_allclose(stats.benjamini_hochberg([0.3]), [0.3])


def test_jaccard():
    assert stats.jaccard({1, 2, 3}, [2, 3, 4]) == 0.5
    assert stats.jaccard([], []) == 1.0


@pytest.mark.parametrize("call, message", [
    (lambda: stats.bootstrap_ci([]), "no values"),
    (lambda: stats.bootstrap_ci([1.0, np.nan]), "finite"),
    (lambda: stats.bootstrap_ci(np.zeros((2, 2, 2))), "n_draws, n_trials"),
    (lambda: stats.paired_permutation_test([1.0, 2.0], [1.0]), "paired"),
    (lambda: stats.benjamini_hochberg([0.5, 1.5]), r"\[0, 1\]"),
])
def test_bad_input_gives_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
