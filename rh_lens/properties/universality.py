"""Universal: every model has retrieval heads; one summary row per model."""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from jaxtyping import Float

from rh_lens.heads import THRESHOLD, label, ranked_heads
from rh_lens.properties.activation import ALWAYS_ON_LEVEL, compute_activation
from rh_lens.properties.scores import HeadScores
from rh_lens.properties.sparsity import SparsityResult, compute_sparsity


@dataclass(frozen=True)
class ModelSummary:
    """One model's row of the universality table (``mean`` is its score table)."""

    name: str
    mean: Float[np.ndarray, "n_layers n_heads"]
    n_kv_heads: int | None
    n_trials: int
    n_trials_run: int | None
    sparsity: SparsityResult
    top_heads: tuple[tuple[int, int, float], ...]
    n_always_on: int
    n_always_on_at_level: int


@dataclass(frozen=True)
class UniversalityResult:
    models: tuple[ModelSummary, ...]
    threshold: float
    level: float

    def format_table(self) -> str:
        """A plain-text table, one row per model."""
        head = (f"{'model':<24} {'LxH':>7} {'trials':>6} {'>' + str(self.threshold):>12} "
                f"{'bins % (0|<=.1|<=.5|>.5)':>25} {'on=1':>4} {'>=' + str(self.level):>6}  top")
        lines = [head]
        for m in self.models:
            sp = m.sparsity
            bins = "|".join(f"{100 * s:.1f}" for s in sp.bins.values())
            top = " ".join(f"{label((a, b))}({s:.2f})" for a, b, s in m.top_heads)
            lines.append(
                f"{m.name[:24]:<24} {m.mean.shape[0]:>3}x{m.mean.shape[1]:<3} {m.n_trials:>6} "
                f"{sp.n_retrieval:>4} ({100 * sp.share_retrieval:4.1f}%) {bins:>25} "
                f"{m.n_always_on:>4} {m.n_always_on_at_level:>6}  {top}")
        return "\n".join(lines)


def compute_universality(models: Sequence[HeadScores], *, threshold: float = THRESHOLD,
                         level: float = ALWAYS_ON_LEVEL, top: int = 5) -> UniversalityResult:
    """Retrieval-head counts and shares, bins, top heads and always-on counts per model."""
    if not models:
        raise ValueError("no models to summarise")
    rows = []
    for s in models:
        act = compute_activation(s, threshold=threshold, level=level)
        rows.append(ModelSummary(
            name=s.name, mean=s.mean, n_kv_heads=s.n_kv_heads, n_trials=s.n_trials,
            n_trials_run=s.n_trials_run, sparsity=compute_sparsity(s.mean, threshold=threshold),
            top_heads=tuple(ranked_heads(s.mean)[:top]), n_always_on=len(act.always_on),
            n_always_on_at_level=len(act.always_on_at_level),
        ))
    return UniversalityResult(tuple(rows), float(threshold), float(level))
