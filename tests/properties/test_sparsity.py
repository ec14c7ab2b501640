"""Sparsity: score bins and the threshold, on hand-made and released scores."""

import numpy as np
import pytest

from rh_lens import properties as P
from tests.conftest import shared_path

pytestmark = pytest.mark.tl4


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
