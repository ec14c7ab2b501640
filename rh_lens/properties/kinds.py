"""Scores of one model: do other head scores rank the heads as the retrieval score does?

A detection directory can hold several scores of the same trials: the copy scores (``step``,
``set``) and the attention scores (``mass``: attention on the answer span while decoding;
``qr``: QRHead's question-to-needle attention, calibrated by a null question).  For one model
:func:`compute_score_comparison` compares each other score's mean table with the one read as
the model's score (:attr:`HeadScores.score`), as :mod:`~rh_lens.properties.intrinsic` compares
two models: Pearson, Spearman, top-K Jaccard, and the Jaccard of the sets above the threshold.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

from rh_lens.heads import THRESHOLD
from rh_lens.properties.intrinsic import TOPK, IntrinsicResult, compute_intrinsic
from rh_lens.properties.scores import SCORES, HeadScores


@dataclass(frozen=True)
class ScoreComparison:
    """One model's score (``score``) against each of its other scores, in :data:`SCORES`
    order; ``results[i].names`` is ``(score, other)``."""

    name: str
    score: str
    topk: tuple[int, ...]
    results: tuple[IntrinsicResult, ...]

    def table(self) -> list[dict]:
        """One row per other score (null: a K above the number of heads, a constant map)."""
        return [{"a": r.names[0], "b": r.names[1], "pearson": r.pearson, "spearman": r.spearman,
                 "topk_jaccard": {str(k): r.topk_jaccard.get(k, math.nan) for k in self.topk},
                 "retrieval_jaccard": r.retrieval_jaccard} for r in self.results]

    def lines(self) -> list[str]:
        head = " ".join(f"{'J@' + str(k):>6}" for k in self.topk)
        out = [f"  scores of {self.name} against its {self.score} score:",
               f"    {'score':<6} {'pearson':>7} {'spearman':>8}  {head}  {'J(>thr)':>8}"]
        for row in self.table():
            jac = " ".join(_f(v, 6, 2) for v in row["topk_jaccard"].values())
            out.append(f"    {row['b']:<6} {_f(row['pearson'], 7, 3)} "
                       f"{_f(row['spearman'], 8, 3)}  {jac}  {_f(row['retrieval_jaccard'], 8, 2)}")
        return out


def _f(value: float, width: int, digits: int) -> str:
    return f"{value:{width}.{digits}f}" if value == value else f"{'-':>{width}}"


def compute_score_comparison(scores: HeadScores, *, topk: Sequence[int] = TOPK,
                             threshold: float = THRESHOLD) -> ScoreComparison | None:
    """``scores``'s mean table against each table of :attr:`HeadScores.others`; None when it
    has no other score.  Top-K values above the number of heads are left out (NaN)."""
    others = scores.others or {}
    if not others:
        return None
    n = scores.mean.size
    ks = [k for k in topk if 1 <= k <= n]
    results = tuple(
        compute_intrinsic(scores.mean, others[kind], names=(scores.score, kind), ks=ks,
                          threshold=threshold)
        for kind in sorted(others, key=lambda k: SCORES.index(k) if k in SCORES else len(SCORES)))
    return ScoreComparison(scores.name, scores.score, tuple(int(k) for k in topk), results)
