"""How firm the retrieval-head set is: across thresholds, and across the number of trials.

:func:`compute_threshold_sweep` counts the heads above each threshold of a sweep (0.05-0.3 by
default) and the overlap of each set with the set at the default threshold (0.1).
:func:`compute_stability` answers "how many trials give stable scores": it resamples ``n`` of a
model's successful trials with replacement, ``draws`` times for each ``n``, and compares the
resampled mean scores with those of all trials: the Jaccard index of the top-K sets and of the
retrieval-head sets, and the Spearman correlation of the whole score maps.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from jaxtyping import Float, Int

from rh_lens.heads import THRESHOLD, score_table
from rh_lens.properties.intrinsic import _average_ranks, _pearson, _top_k
from rh_lens.properties.scores import HeadScores, Table
from rh_lens.stats import jaccard

THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
STABLE_JACCARD = 0.8


def _above(flat: np.ndarray, threshold: float) -> set[int]:
    return set(np.flatnonzero(flat > threshold).tolist())


@dataclass(frozen=True)
class ThresholdSweep:
    """Retrieval heads (mean score > threshold) at each threshold of a sweep."""

    thresholds: tuple[float, ...]
    n_retrieval: Int[np.ndarray, " threshold"]
    share: Float[np.ndarray, " threshold"]
    jaccard_with_default: Float[np.ndarray, " threshold"]  # vs the set at ``default``
    default: float

    def table(self) -> list[dict]:
        return [{"threshold": t, "n_retrieval": int(n), "share": float(s),
                 "jaccard_with_default": float(j)}
                for t, n, s, j in zip(self.thresholds, self.n_retrieval, self.share,
                                      self.jaccard_with_default, strict=True)]


def compute_threshold_sweep(table: Table, *, thresholds: Sequence[float] = THRESHOLDS,
                            default: float = THRESHOLD) -> ThresholdSweep:
    """The retrieval-head count, share and overlap with the ``default`` set at each threshold
    (two empty sets overlap fully)."""
    if not thresholds:
        raise ValueError("the threshold sweep needs at least one threshold")
    flat = score_table(table).ravel()
    base = _above(flat, default)
    sets = [_above(flat, t) for t in thresholds]
    return ThresholdSweep(
        thresholds=tuple(float(t) for t in thresholds),
        n_retrieval=np.array([len(s) for s in sets], dtype=np.int64),
        share=np.array([len(s) / flat.size for s in sets]),
        jaccard_with_default=np.array([jaccard(s, base) for s in sets]),
        default=float(default),
    )


@dataclass(frozen=True)
class StabilityCurve:
    """Resampled agreement with the full set of trials, ``[size, draw]`` for each measure."""

    name: str
    sizes: Int[np.ndarray, " size"]
    k: int
    threshold: float
    topk_jaccard: Float[np.ndarray, "size draw"]
    retrieval_jaccard: Float[np.ndarray, "size draw"]
    spearman: Float[np.ndarray, "size draw"]  # NaN where a resampled map is constant
    seed: int

    def stable_after(self, measure: str = "topk_jaccard", *, level: float = STABLE_JACCARD,
                     percentile: float | int | None = None) -> int | None:
        """The smallest number of trials from which ``measure`` stays at or above ``level`` for
        every larger size (None when even all trials fall short): its mean over draws, or with
        ``percentile`` (e.g. 5) that percentile of the draws, so that 95 % of them reach it."""
        values = getattr(self, measure)
        stat = (np.nanmean(values, axis=1) if percentile is None
                else np.nanpercentile(values, percentile, axis=1))
        below = np.flatnonzero(~(stat >= level))
        if below.size == 0:
            return int(self.sizes[0])
        if below[-1] == len(self.sizes) - 1:
            return None
        return int(self.sizes[below[-1] + 1])

    def table(self) -> list[dict]:
        rows = []
        for i, n in enumerate(self.sizes):
            rows.append({"n_trials": int(n), "k": self.k,
                         "topk_jaccard": float(np.nanmean(self.topk_jaccard[i])),
                         "topk_jaccard_p05": float(np.nanpercentile(self.topk_jaccard[i], 5)),
                         "retrieval_jaccard": float(np.nanmean(self.retrieval_jaccard[i])),
                         "spearman": _nanmean(self.spearman[i])})
        return rows


def _nanmean(x: np.ndarray) -> float:
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def default_sizes(n_trials: int, points: int = 16) -> list[int]:
    """About ``points`` sizes from 1 to ``n_trials``, spaced geometrically, ending at all."""
    return sorted({int(round(x)) for x in np.geomspace(1, n_trials, points)} | {n_trials})


def compute_stability(scores: HeadScores, *, k: int = 10, threshold: float = THRESHOLD,
                      sizes: Sequence[int] | None = None, draws: int = 100,
                      seed: int = 0) -> StabilityCurve:
    """Bootstrap the successful trials: for each size ``n``, ``draws`` resamples of ``n`` trials
    (with replacement, seeded), each compared with the mean over all trials."""
    n = scores.n_trials
    n_heads = scores.shape[0] * scores.shape[1]
    if not 1 <= k <= n_heads:
        raise ValueError(f"{scores.name}: top-K needs 1 <= K <= {n_heads} heads, got K={k}")
    if draws < 1:
        raise ValueError(f"draws must be at least 1, got {draws}")
    sizes = default_sizes(n) if sizes is None else sorted(set(int(s) for s in sizes))
    if not sizes or sizes[0] < 1:
        raise ValueError(f"trial counts must be >= 1, got {list(sizes)}")
    flat = scores.trial_scores.reshape(n, -1)
    full = flat.mean(axis=0)
    full_top, full_set, full_ranks = _top_k(full, k), _above(full, threshold), _average_ranks(full)
    rng = np.random.default_rng(seed)
    shape = (len(sizes), draws)
    top_j, set_j, rho = np.empty(shape), np.empty(shape), np.empty(shape)
    for i, size in enumerate(sizes):
        for d in range(draws):
            mean = flat[rng.integers(0, n, size)].mean(axis=0)
            top_j[i, d] = jaccard(_top_k(mean, k), full_top)
            set_j[i, d] = jaccard(_above(mean, threshold), full_set)
            rho[i, d] = _pearson(_average_ranks(mean), full_ranks)
    return StabilityCurve(scores.name, np.array(sizes, dtype=np.int64), k, float(threshold),
                          top_j, set_j, rho, seed)
