"""Switch-on: which context makes a head copy."""

import numpy as np
import plotly.graph_objects as go
import pytest

from rh_lens import plotting
from rh_lens import properties as P
from tests.properties.conftest import switch_setup

pytestmark = pytest.mark.tl4


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
