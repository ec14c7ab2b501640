"""Universality: one summary row per model, of any shape."""

import numpy as np
import plotly.graph_objects as go
import pytest

from rh_lens import plotting
from rh_lens import properties as P

pytestmark = pytest.mark.tl4


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
