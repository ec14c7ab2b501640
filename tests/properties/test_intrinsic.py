"""Intrinsic: pairwise agreement of score maps and the correlation matrix."""

import math

import numpy as np
import plotly.graph_objects as go
import pytest

from rh_lens import plotting
from rh_lens import properties as P

pytestmark = pytest.mark.tl4


def slow_spearman(x, y):
    """Spearman as Pearson of average ranks, ranks counted pairwise."""
    def ranks(v):
        return np.array([1 + (v < a).sum() + ((v == a).sum() - 1) / 2 for a in v])
    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


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
