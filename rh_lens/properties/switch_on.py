"""Which context (needle, length, depth) switches the context-dependent heads on.

Needs the per-trial contexts that only rh_lens detection directories hold.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from jaxtyping import Float

from rh_lens.heads import THRESHOLD, HeadLike, label
from rh_lens.properties.activation import compute_activation
from rh_lens.properties.scores import HeadScores

FACTORS = ("needle", "length", "depth")


@dataclass(frozen=True)
class SwitchOnResult:
    """For chosen heads: activation rate by needle, length and depth.

    ``rates[f]`` is ``[head, value]`` over the distinct ``values[f]`` of factor ``FACTORS[f]``
    (``counts[f]`` successful trials each); ``eta2[head, f]`` is the share of the variance of the
    0/1 activation that factor f explains on its own (NaN if the head never or always fires);
    ``grid[head]`` is the rate per (depth, length) over needles, NaN where no trial succeeded.
    """

    heads: tuple[HeadLike, ...]
    mean: Float[np.ndarray, " head"]
    frequency: Float[np.ndarray, " head"]
    values: tuple[tuple[float, ...], ...]
    counts: tuple[tuple[int, ...], ...]
    rates: tuple[np.ndarray, ...]
    eta2: Float[np.ndarray, "head factor"]
    grid: Float[np.ndarray, "head depth length"]

    def table(self) -> list[dict]:
        """Per head: the factor that explains most, and its values with the highest/lowest rate."""
        rows = []
        for i, (layer, head) in enumerate(self.heads):
            eta = self.eta2[i]
            f = int(np.nanargmax(eta)) if np.isfinite(eta).any() else 0
            rate = self.rates[f][i]
            rows.append({
                "layer": layer, "head": head, "mean_score": float(self.mean[i]),
                "frequency": float(self.frequency[i]), "factor": FACTORS[f],
                "eta2": {name: float(e) if np.isfinite(e) else None
                         for name, e in zip(FACTORS, eta, strict=True)},
                "on_when": [self.values[f][int(np.argmax(rate))], float(rate.max())],
                "off_when": [self.values[f][int(np.argmin(rate))], float(rate.min())],
            })
        return rows


def compute_switch_on(scores: HeadScores, *, heads: Sequence[HeadLike] | None = None,
                      threshold: float = THRESHOLD, max_heads: int = 10) -> SwitchOnResult:
    """Which contexts switch heads on; default heads: the ``max_heads`` highest-scoring
    context-dependent ones.  Needs per-trial contexts (an rh_lens detection directory)."""
    if scores.contexts is None:
        raise ValueError(f"{scores.name}: no per-trial contexts; the switch-on analysis needs an "
                         "rh_lens detection directory (a reference score file has none)")
    if heads is None:
        heads = compute_activation(scores, threshold=threshold).context_dependent[:max_heads]
    n_layers, n_heads = scores.shape
    heads = tuple((int(a), int(b)) for a, b in heads)
    for layer, head in heads:
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ValueError(f"head {label((layer, head))} is outside {n_layers}x{n_heads}")
    act = np.stack([scores.trial_active[:, a, b] for a, b in heads], axis=1) if heads else \
        np.zeros((scores.n_trials, 0), dtype=bool)
    act = act.astype(np.float64)
    ctx = np.array([[c.needle, c.length, c.depth] for c in scores.contexts], dtype=np.float64)
    p = act.mean(axis=0)
    ss_total = ((act - p) ** 2).sum(axis=0)
    values, counts, rates, eta2 = [], [], [], []
    for f in range(len(FACTORS)):
        vals, inverse = np.unique(ctx[:, f], return_inverse=True)
        n = np.bincount(inverse, minlength=vals.size)
        rate = np.stack([act[inverse == v].mean(axis=0) for v in range(vals.size)], axis=1)
        ss_between = (n[None, :] * (rate - p[:, None]) ** 2).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            eta2.append(np.where(ss_total > 0, ss_between / np.where(ss_total > 0, ss_total, 1),
                                 np.nan))
        values.append(tuple(float(v) for v in vals))
        counts.append(tuple(int(c) for c in n))
        rates.append(rate)
    grid = np.full((len(heads), len(values[2]), len(values[1])), np.nan)
    for i, depth in enumerate(values[2]):
        for j, length in enumerate(values[1]):
            sel = (ctx[:, 2] == depth) & (ctx[:, 1] == length)
            if sel.any():
                grid[:, i, j] = act[sel].mean(axis=0)
    mean = scores.mean
    return SwitchOnResult(
        heads=heads, mean=np.array([mean[h] for h in heads], dtype=np.float64),
        frequency=p, values=tuple(values), counts=tuple(counts), rates=tuple(rates),
        eta2=np.stack(eta2, axis=1) if heads else np.zeros((0, len(FACTORS))), grid=grid,
    )
