"""Sparse: few heads are retrieval heads (mean score strictly above the threshold, 0.1).

Score bins are ``=0``, ``(0, 0.1]``, ``(0.1, 0.5]``, ``(0.5, inf)``: the paper's top bin is
``(0.5, 1]``, but the reference's step score can exceed 1 (Qwen1.5-14B has a head at 1.003).
"""

from dataclasses import dataclass

import numpy as np
from jaxtyping import Float, Int

from rh_lens.heads import THRESHOLD, ranked_heads, score_table
from rh_lens.properties.scores import Table

BIN_LABELS = ("0", "(0, 0.1]", "(0.1, 0.5]", "(0.5, inf)")


def retrieval_heads(table: Table, *, threshold: float = THRESHOLD) -> list[tuple[int, int, float]]:
    """Heads whose score is strictly above ``threshold``, highest first."""
    return [h for h in ranked_heads(table) if h[2] > threshold]


@dataclass(frozen=True)
class SparsityResult:
    """How few heads are retrieval heads, the score bins, and where they sit by layer."""

    threshold: float
    n_total: int
    n_retrieval: int
    share_retrieval: float
    bin_counts: tuple[int, ...]
    per_layer: Int[np.ndarray, " n_layers"]
    layer_mean: Float[np.ndarray, " n_layers"]
    bin_labels: tuple[str, ...] = BIN_LABELS

    @property
    def bins(self) -> dict[str, float]:
        """Share of heads in each score bin (fractions summing to 1)."""
        return {lab: c / self.n_total for lab, c in zip(self.bin_labels, self.bin_counts,
                                                         strict=True)}


def compute_sparsity(table: Table, *, threshold: float = THRESHOLD) -> SparsityResult:
    """Share of heads with score > ``threshold`` and the bins ``=0, (0,.1], (.1,.5], (.5,inf)``."""
    table = score_table(table)
    if (table < 0).any():
        raise ValueError("retrieval scores are never negative")
    flat = table.ravel()
    counts = (int((flat == 0).sum()), int(((flat > 0) & (flat <= 0.1)).sum()),
              int(((flat > 0.1) & (flat <= 0.5)).sum()), int((flat > 0.5).sum()))
    above = table > threshold
    return SparsityResult(
        threshold=float(threshold), n_total=int(flat.size), n_retrieval=int(above.sum()),
        share_retrieval=float(above.mean()), bin_counts=counts,
        per_layer=above.sum(axis=1).astype(np.int64), layer_mean=table.mean(axis=1),
    )
