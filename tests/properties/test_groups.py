"""KV groups: grouped scores and the clustering of retrieval heads."""

import itertools

import numpy as np
import plotly.graph_objects as go
import pytest

from rh_lens import plotting
from rh_lens import properties as P

pytestmark = pytest.mark.tl4


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
