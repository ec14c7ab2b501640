"""Intrinsic: a base model and the models derived from it share their retrieval heads.

Per-head agreement of same-shape score tables (Pearson, Spearman, top-K and retrieval-set
Jaccard) for one pair, and the correlations of every pair as a matrix.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from jaxtyping import Float

from rh_lens.heads import THRESHOLD, score_table

TOPK = (10, 20, 50, 100)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum() / denom) if denom > 0 else math.nan


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (as scipy.stats.rankdata)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse]


def _top_k(x: np.ndarray, k: int) -> set[int]:
    return set(np.argsort(-x, kind="stable")[:k].tolist())


@dataclass(frozen=True)
class IntrinsicResult:
    """Per-head agreement of two same-shape models.  Pearson/Spearman are NaN for a constant
    map; top-K sets break ties in layer-major order."""

    names: tuple[str, str]
    a: Float[np.ndarray, "n_layers n_heads"]
    b: Float[np.ndarray, "n_layers n_heads"]
    pearson: float
    spearman: float
    topk_jaccard: dict[int, float]
    retrieval_jaccard: float
    threshold: float


def compute_intrinsic(a: Float[np.ndarray, "a_layers a_heads"],
                      b: Float[np.ndarray, "b_layers b_heads"], *,
                      names: tuple[str, str] = ("a", "b"), ks: Sequence[int] = TOPK,
                      threshold: float = THRESHOLD) -> IntrinsicResult:
    """Pearson and Spearman of per-head scores, Jaccard of the top-K heads for each K, and of the
    retrieval-head sets; a ``ValueError`` for tables of different shapes."""
    a = score_table(a, name=f"scores of {names[0]!r}")
    b = score_table(b, name=f"scores of {names[1]!r}")
    if a.shape != b.shape:
        raise ValueError(
            f"cannot compare {names[0]!r} ({a.shape[0]}x{a.shape[1]}) with {names[1]!r} "
            f"({b.shape[0]}x{b.shape[1]}): heads of models of different shapes do not "
            "correspond; compare their summaries instead")
    x, y = a.ravel(), b.ravel()
    jac = {}
    for k in ks:
        if not 1 <= k <= x.size:
            raise ValueError(f"top-K needs 1 <= K <= {x.size} heads, got K={k}")
        sa, sb = _top_k(x, k), _top_k(y, k)
        jac[int(k)] = len(sa & sb) / len(sa | sb)
    ra, rb = set(np.flatnonzero(x > threshold)), set(np.flatnonzero(y > threshold))
    return IntrinsicResult(
        names=(str(names[0]), str(names[1])), a=a, b=b, pearson=_pearson(x, y),
        spearman=_pearson(_average_ranks(x), _average_ranks(y)), topk_jaccard=jac,
        retrieval_jaccard=len(ra & rb) / len(ra | rb) if ra | rb else math.nan,
        threshold=float(threshold),
    )


@dataclass(frozen=True)
class CorrelationMatrix:
    """Model x model correlations of per-head scores; NaN where shapes differ."""

    names: tuple[str, ...]
    pearson: Float[np.ndarray, "model model"]
    spearman: Float[np.ndarray, "model model"]


def compute_correlation_matrix(tables: dict[str, np.ndarray]) -> CorrelationMatrix:
    """Pearson and Spearman between every pair of same-shape score tables."""
    names = tuple(tables)
    if not names:
        raise ValueError("no tables to correlate")
    n = len(names)
    pear, spear = np.full((n, n), np.nan), np.full((n, n), np.nan)
    for i in range(n):
        for j in range(i, n):
            a, b = np.asarray(tables[names[i]]), np.asarray(tables[names[j]])
            if a.shape == b.shape:
                r = compute_intrinsic(a, b, names=(names[i], names[j]), ks=())
                pear[i, j] = pear[j, i] = r.pearson
                spear[i, j] = spear[j, i] = r.spearman
    return CorrelationMatrix(names, pear, spear)
