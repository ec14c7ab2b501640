"""Intervals and tests for per-trial measurements: bootstrap confidence intervals, a paired
permutation test and the Benjamini-Hochberg adjustment.  Numpy only; every random choice is
drawn from ``numpy.random.default_rng(seed)``.

- :func:`bootstrap_ci`: the percentile bootstrap interval of a mean over trials ``[n_trials]``,
  or over draws and trials ``[n_draws, n_trials]`` (each resample draws the draws and the trials
  with replacement, so the interval holds both sources of variation).
- :func:`paired_permutation_test`: the two conditions of each trial are exchangeable under the
  null hypothesis, so the sign of each per-trial difference is flipped at random; the statistic
  is the mean difference.  With ``2**n`` at most ``n_perm`` every sign assignment is enumerated
  (the exact p-value), otherwise ``n_perm`` random assignments give ``(1 + hits) / (1 + n_perm)``.
- :func:`benjamini_hochberg`: adjusted p-values (q-values) controlling the false discovery rate
  over a family of tests, e.g. one test per K of a masking curve.
"""

import itertools
from dataclasses import dataclass
from typing import Literal

import numpy as np
from jaxtyping import Float
from numpy.typing import ArrayLike

Alternative = Literal["two-sided", "greater", "less"]
LEVEL = 0.95
N_BOOT = 2000
N_PERM = 10000


@dataclass(frozen=True)
class Interval:
    """A mean and its ``level`` bootstrap interval ``[low, high]``."""

    mean: float
    low: float
    high: float
    level: float = LEVEL


def _finite(values, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError(f"{name}: no values")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: values must be finite (NaN or inf found)")
    return arr


def bootstrap_ci(values: ArrayLike, *, level: float = LEVEL,
                 n_boot: int = N_BOOT, seed: int = 0) -> Interval:
    """The mean of ``values`` and its percentile bootstrap interval: ``[n_trials]`` resamples
    trials; ``[n_draws, n_trials]`` resamples draws and trials (the same trials for every draw,
    as the draws of a masking sweep share their cells)."""
    arr = _finite(values, "bootstrap_ci")
    if arr.ndim not in (1, 2):
        raise ValueError(f"bootstrap_ci: values must be [n_trials] or [n_draws, n_trials], got "
                         f"shape {arr.shape}")
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"bootstrap_ci: level must be in (0, 1) and n_boot >= 1, got {level}, "
                         f"{n_boot}")
    arr2 = arr[None] if arr.ndim == 1 else arr
    n_draws, n_trials = arr2.shape
    rng = np.random.default_rng(seed)
    trials = rng.integers(0, n_trials, size=(n_boot, n_trials))
    draws = (np.zeros((n_boot, 1), dtype=np.int64) if n_draws == 1
             else rng.integers(0, n_draws, size=(n_boot, n_draws)))
    means = arr2[draws[:, :, None], trials[:, None, :]].mean(axis=(1, 2))
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(float(arr.mean()), float(low), float(high), level)


def paired_permutation_test(a: ArrayLike, b: ArrayLike, *,
                            alternative: Alternative = "two-sided", n_perm: int = N_PERM,
                            seed: int = 0) -> float:
    """p-value of mean(a - b) under random sign flips of the per-trial differences (the trials'
    two conditions swapped).  ``greater``: a > b; ``less``: a < b.  Exact by enumeration when
    ``2**n_trials <= n_perm``."""
    a, b = _finite(a, "permutation test"), _finite(b, "permutation test")
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"permutation test: a and b must be paired [n_trials] arrays, got shapes "
                         f"{a.shape} and {b.shape}")
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative must be 'two-sided', 'greater' or 'less', got "
                         f"{alternative!r}")
    if n_perm < 1:
        raise ValueError(f"n_perm must be >= 1, got {n_perm}")
    diff = a - b
    n = diff.size
    exact = n <= 62 and 2**n <= n_perm
    if exact:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
    else:
        signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(n_perm, n))
    stats = signs @ diff / n
    observed = diff.mean()
    tol = 1e-12 * max(1.0, float(np.abs(diff).max()))
    if alternative == "two-sided":
        hits = np.abs(stats) >= abs(observed) - tol
    elif alternative == "greater":
        hits = stats >= observed - tol
    else:
        hits = stats <= observed + tol
    if exact:
        return float(hits.mean())
    return float((1 + hits.sum()) / (1 + n_perm))


def benjamini_hochberg(p_values: ArrayLike) -> Float[np.ndarray, " test"]:
    """Benjamini-Hochberg adjusted p-values: ``q_(i) = min_{j >= i} p_(j) m / j`` over the
    ``m`` finite p-values sorted ascending, capped at 1; NaN entries stay NaN and do not count."""
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"benjamini_hochberg: p-values must be one-dimensional, got {p.shape}")
    finite = np.isfinite(p)
    if ((p[finite] < 0) | (p[finite] > 1)).any():
        raise ValueError("benjamini_hochberg: p-values must lie in [0, 1]")
    q = np.full(p.shape, np.nan)
    vals = p[finite]
    m = vals.size
    if m == 0:
        return q
    order = np.argsort(vals, kind="stable")
    scaled = vals[order] * m / np.arange(1, m + 1)
    adjusted = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    out = np.empty(m)
    out[order] = adjusted
    q[finite] = out
    return q


def jaccard(a, b) -> float:
    """``|a & b| / |a | b|`` of two collections (1 when both are empty)."""
    a, b = set(a), set(b)
    return 1.0 if not (a or b) else len(a & b) / len(a | b)
