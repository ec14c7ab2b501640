"""Activation frequency: always-on and context-dependent heads."""

import numpy as np
import pytest

from rh_lens import properties as P

pytestmark = pytest.mark.tl4


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
