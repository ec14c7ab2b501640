"""Grouped-query attention: scores per KV group, and whether retrieval heads cluster in groups."""

import math
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from jaxtyping import Float, Int

from rh_lens.heads import THRESHOLD, group_size, group_table, score_table
from rh_lens.properties.scores import HeadScores, Table


def group_scores(scores: HeadScores, *, reduce: Literal["mean", "max"] = "mean") -> HeadScores:
    """The same scores per (layer, KV group): a group's trial score is the mean (or max) of its
    query heads' scores, and it is active in a trial when any of its heads is."""
    if scores.n_kv_heads is None:
        raise ValueError(f"{scores.name}: number of KV heads unknown (give n_kv_heads)")
    active = group_table(scores.trial_active, scores.n_kv_heads, reduce="any")
    return replace(scores, name=f"{scores.name} (KV groups)", n_kv_heads=None,
                   trial_scores=group_table(scores.trial_scores, scores.n_kv_heads, reduce=reduce),
                   trial_active=active,
                   others={k: group_table(t, scores.n_kv_heads, reduce=reduce)
                           for k, t in scores.others.items()} if scores.others else None)


@dataclass(frozen=True)
class GroupResult:
    """Retrieval heads per KV group and whether they cluster: ``groups_hit`` groups hold at
    least one, and ``shared`` heads have another retrieval head in their group, against the
    counts expected if as many heads were placed at random (``expected_*``)."""

    n_kv_heads: int
    group_mean: Float[np.ndarray, "n_layers n_kv_heads"]
    retrieval_per_group: Int[np.ndarray, "n_layers n_kv_heads"]
    n_retrieval: int
    groups_hit: int
    expected_groups_hit: float
    shared: int
    expected_shared: float
    threshold: float = THRESHOLD


def compute_groups(table: Table, n_kv_heads: int, *, threshold: float = THRESHOLD) -> GroupResult:
    """Aggregate a score table per KV group and test the clustering of retrieval heads."""
    table = score_table(table)
    group_mean = group_table(table, n_kv_heads, reduce="mean")  # checks the divisibility
    count = group_table(table > threshold, n_kv_heads, reduce="sum").astype(np.int64)
    size = group_size(table.shape[1], n_kv_heads)
    n_slots, k = table.size, int(count.sum())
    n_groups = count.size

    def none_in(slots: int, taken: int, draw: int) -> float:  # P(no hit among `draw` of `slots`)
        return math.prod((slots - taken - i) / (slots - i) for i in range(draw)) \
            if taken <= slots - draw else 0.0

    return GroupResult(
        n_kv_heads=int(n_kv_heads), group_mean=group_mean,
        retrieval_per_group=count, n_retrieval=k, groups_hit=int((count > 0).sum()),
        expected_groups_hit=n_groups * (1 - none_in(n_slots, k, size)),
        shared=int(count[count > 1].sum()),
        expected_shared=k * (1 - none_in(n_slots - 1, k - 1, size - 1)) if k else 0.0,
        threshold=float(threshold),
    )
