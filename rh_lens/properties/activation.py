"""Dynamically activated: how often each head copies, and which heads always do.

A head's *activation frequency* is the share of successful trials in which it was active;
*always-on* means frequency exactly 1, and ``level`` (0.95) gives a looser list;
*context-dependent* heads are retrieval heads with frequency < 1.
"""

from dataclasses import dataclass

import numpy as np
from jaxtyping import Float

from rh_lens.heads import THRESHOLD, HeadLike, ranked_heads
from rh_lens.properties.scores import HeadScores

ALWAYS_ON_LEVEL = 0.95


@dataclass(frozen=True)
class ActivationResult:
    """Activation frequency per head; always-on and context-dependent heads, highest score first."""

    mean: Float[np.ndarray, "n_layers n_heads"]
    frequency: Float[np.ndarray, "n_layers n_heads"]
    n_trials: int
    threshold: float
    level: float
    always_on: tuple[HeadLike, ...]
    always_on_at_level: tuple[HeadLike, ...]
    context_dependent: tuple[HeadLike, ...]


def compute_activation(scores: HeadScores, *, threshold: float = THRESHOLD,
                       level: float = ALWAYS_ON_LEVEL) -> ActivationResult:
    """Always-on: active in every successful trial (and, separately, in >= ``level`` of them);
    context-dependent: retrieval heads (score > ``threshold``) with frequency below 1."""
    if not 0 < level <= 1:
        raise ValueError(f"level must be in (0, 1], got {level}")
    mean, freq = scores.mean, scores.frequency
    ranked = [(layer, head) for layer, head, _ in ranked_heads(mean)]
    return ActivationResult(
        mean=mean, frequency=freq, n_trials=scores.n_trials, threshold=float(threshold),
        level=float(level),
        always_on=tuple(h for h in ranked if freq[h] == 1.0),
        always_on_at_level=tuple(h for h in ranked if freq[h] >= level),
        context_dependent=tuple(h for h in ranked if mean[h] > threshold and freq[h] < 1.0),
    )
