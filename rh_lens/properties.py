"""The paper's properties of retrieval heads, from detection results and released score files.

Wu et al. (docs/retrieval-heads.md, sections 1 and 4): retrieval heads are *universal* (every
model has heads with mean score > 0.1), *sparse* (few heads), *intrinsic* (base and derived models
share them: per-head scores correlate) and *dynamically activated* (some heads copy in every
successful trial, "always-on"; the others depend on the context).

Input is a :class:`HeadScores` (per-trial scores of the successful trials), read by
:func:`load_head_scores` from an rh_lens detection directory (``python -m analyses.detect``) or a
reference-format ``{"layer-head": [score per trial]}`` file.  Definitions used throughout:

- a head's *retrieval score* is its mean over successful trials; a *retrieval head* has a score
  strictly above ``threshold`` (0.1);
- score bins are ``=0``, ``(0, 0.1]``, ``(0.1, 0.5]``, ``(0.5, inf)``: the paper's top bin is
  ``(0.5, 1]``, but the reference's step score can exceed 1 (Qwen1.5-14B has a head at 1.003);
- a head is *active* in a trial when it copied at least one token (rh_lens: ``trial_active``;
  reference file: score > 0, which is the same for step and set scores); its *activation
  frequency* is the share of successful trials in which it was active; *always-on* means
  frequency exactly 1, and ``level`` (0.95) gives a looser list; *context-dependent* heads are
  retrieval heads with frequency < 1;
- which context (needle, length, depth) switches a head on needs the per-trial cells, which only
  rh_lens directories hold (``trials.jsonl``); reference files carry no context.
"""

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
from jaxtyping import Bool, Float, Int

from rh_lens.heads import (
    THRESHOLD,
    HeadLike,
    group_size,
    group_table,
    label,
    ranked_heads,
    score_table,
)
from rh_lens.results import ResultFileError, import_reference_json, load_result
from rh_lens.types import HeadTable

ALWAYS_ON_LEVEL = 0.95
TOPK = (10, 20, 50, 100)
BIN_LABELS = ("0", "(0, 0.1]", "(0.1, 0.5]", "(0.5, inf)")
FACTORS = ("needle", "length", "depth")

Table = HeadTable


# --------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class TrialContext:
    """Where a trial's needle sat: needle index, context length (tokens), depth (%)."""

    needle: int
    length: int
    depth: float


@dataclass(frozen=True)
class HeadScores:
    """One model's per-head scores on its successful trials (``trial_active`` defaults to
    ``trial_scores > 0``); ``contexts`` (one per successful trial) only from rh_lens runs."""

    name: str
    trial_scores: Float[np.ndarray, "trial n_layers n_heads"]
    trial_active: Bool[np.ndarray, "trial n_layers n_heads"] | None = None
    n_kv_heads: int | None = None
    contexts: tuple[TrialContext, ...] | None = None
    n_trials_run: int | None = None
    source: str = ""
    score: str = "step"

    def __post_init__(self):
        scores = np.asarray(self.trial_scores, dtype=np.float64)
        if scores.ndim != 3 or 0 in scores.shape[1:]:
            raise ValueError(f"{self.name}: trial_scores must be [n_trials, n_layers, n_heads], "
                             f"got shape {scores.shape}")
        if scores.shape[0] == 0:
            raise ValueError(f"{self.name}: zero successful trials, so no head has a retrieval "
                             "score (a failed trial is dropped, not scored 0)")
        if not np.isfinite(scores).all() or (scores < 0).any():
            raise ValueError(f"{self.name}: scores must be finite and >= 0")
        active = scores > 0 if self.trial_active is None else np.asarray(self.trial_active, bool)
        if active.shape != scores.shape:
            raise ValueError(f"{self.name}: trial_active has shape {active.shape}, "
                             f"trial_scores {scores.shape}")
        if self.contexts is not None and len(self.contexts) != scores.shape[0]:
            raise ValueError(f"{self.name}: {len(self.contexts)} contexts for "
                             f"{scores.shape[0]} successful trials")
        n_heads = scores.shape[2]
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or n_heads % self.n_kv_heads):
            raise ValueError(f"{self.name}: n_kv_heads={self.n_kv_heads} does not divide "
                             f"n_heads={n_heads}")
        object.__setattr__(self, "trial_scores", scores)
        object.__setattr__(self, "trial_active", active)

    @classmethod
    def from_detect(cls, result, *, name: str = "model", score: Literal["step", "set"] = "step",
                    source: str = "") -> "HeadScores":
        """The scores of an in-memory :class:`~rh_lens.detect.DetectResult` (the same as
        :func:`load_head_scores` reads from the directory it is saved in)."""
        if score not in ("step", "set"):
            raise ValueError(f"score must be 'step' or 'set', got {score!r}")
        contexts = tuple(TrialContext(int(r.cell.needle), int(r.cell.length), float(r.cell.depth))
                         for r in result.records if r.success)
        return cls(name, result.trial_scores(score),
                   trial_active=result.trial_scores("active") > 0, n_kv_heads=result.n_kv_heads,
                   contexts=contexts, n_trials_run=len(result.records), source=source,
                   score=score)

    @property
    def n_trials(self) -> int:
        return int(self.trial_scores.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.trial_scores.shape[1]), int(self.trial_scores.shape[2])

    @property
    def n_silent_trials(self) -> int:
        """Successful trials in which no head copied a token (they cap every frequency below 1)."""
        return int((~self.trial_active.any(axis=(1, 2))).sum())

    @property
    def mean(self) -> Table:
        """The retrieval score of every head (mean over successful trials)."""
        return self.trial_scores.mean(axis=0)

    @property
    def frequency(self) -> Table:
        """Share of successful trials in which each head copied at least one token."""
        return self.trial_active.mean(axis=0)


def load_head_scores(path: str | Path, *, name: str | None = None,
                     score: Literal["step", "set"] = "step",
                     n_kv_heads: int | None = None) -> HeadScores:
    """Read an rh_lens detection directory or a reference-format score file.

    ``score`` picks the rh_lens score (a reference file holds one kind: step scores in the
    reference's own files).  ``n_kv_heads`` sets the GQA grouping where the input does not say.
    The default name is the directory's model spec, or the file's stem (its folder's name for
    ``head_score.json``).  Bad input raises a ``ValueError`` naming the file.
    """
    path = Path(path)
    if score not in ("step", "set"):
        raise ValueError(f"score must be 'step' or 'set', got {score!r}")
    if path.is_dir():
        return _load_detect_dir(path, name=name, score=score, n_kv_heads=n_kv_heads)
    trials = import_reference_json(path)
    default = path.parent.name if path.stem == "head_score" and path.parent.name else path.stem
    return HeadScores(name or default, trials, n_kv_heads=n_kv_heads, source=str(path),
                      score="reference file")


def _load_detect_dir(path: Path, *, name, score, n_kv_heads) -> HeadScores:
    res = load_result(path)
    if res.kind != "detect":
        raise ResultFileError(f"{path}: a {res.kind!r} result, not a detection result")
    missing = {f"trial_{score}", "trial_active", "success"} - set(res.arrays)
    if missing:
        raise ResultFileError(f"{path}: arrays.npz lacks {sorted(missing)}")
    success = res.arrays["success"].astype(bool)
    trials = res.arrays[f"trial_{score}"]
    if trials.ndim != 3 or trials.shape[0] != int(success.sum()):
        raise ResultFileError(f"{path}: trial_{score} has shape {trials.shape} but "
                              f"{int(success.sum())} trials succeeded")
    if trials.shape[0] == 0:
        raise ResultFileError(f"{path}: zero successful trials (of {success.size}), so no head "
                              "has a retrieval score")
    shape = res.config.get("shape") or {}
    contexts = None
    if (path / "trials.jsonl").is_file():
        contexts = _read_contexts(path / "trials.jsonl", success)
    return HeadScores(
        name or str(res.config.get("model") or path.name), trials,
        trial_active=res.arrays["trial_active"] > 0,
        n_kv_heads=n_kv_heads or shape.get("n_kv_heads"), contexts=contexts,
        n_trials_run=int(success.size), source=str(path), score=score,
    )


def _read_contexts(path: Path, success: np.ndarray) -> tuple[TrialContext, ...]:
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) != success.size:
        raise ResultFileError(f"{path}: {len(lines)} trials, arrays.npz has {success.size}")
    out = []
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
            cell, ok = rec["cell"], rec["success"]
            ctx = TrialContext(int(cell["needle"]), int(cell["length"]), float(cell["depth"]))
        except (ValueError, KeyError, TypeError) as err:
            raise ResultFileError(f"{path}: line {i + 1}: bad trial record ({err})") from None
        if bool(ok) != bool(success[i]):
            raise ResultFileError(f"{path}: line {i + 1}: success differs from arrays.npz")
        if ok:
            out.append(ctx)
    return tuple(out)


def retrieval_heads(table: Table, *, threshold: float = THRESHOLD) -> list[tuple[int, int, float]]:
    """Heads whose score is strictly above ``threshold``, highest first."""
    return [h for h in ranked_heads(table) if h[2] > threshold]


# --------------------------------------------------------------------------------------------
# Sparse


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


# --------------------------------------------------------------------------------------------
# Dynamically activated


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


# --------------------------------------------------------------------------------------------
# Universal


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


# --------------------------------------------------------------------------------------------
# Intrinsic


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


# --------------------------------------------------------------------------------------------
# Grouped-query attention


def group_scores(scores: HeadScores, *, reduce: Literal["mean", "max"] = "mean") -> HeadScores:
    """The same scores per (layer, KV group): a group's trial score is the mean (or max) of its
    query heads' scores, and it is active in a trial when any of its heads is."""
    if scores.n_kv_heads is None:
        raise ValueError(f"{scores.name}: number of KV heads unknown (give n_kv_heads)")
    active = group_table(scores.trial_active, scores.n_kv_heads, reduce="any")
    return replace(scores, name=f"{scores.name} (KV groups)", n_kv_heads=None,
                   trial_scores=group_table(scores.trial_scores, scores.n_kv_heads, reduce=reduce),
                   trial_active=active)


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
