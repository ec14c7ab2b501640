"""The properties of several models' retrieval heads in one result: what
``python -m analyses.properties`` prints, saves and plots.

:func:`compute_property_summary` runs every property of :mod:`rh_lens.properties` on a list of
:class:`~rh_lens.properties.HeadScores` (sparsity, activation, KV groups, switch-on, and the
correlations of every same-shape pair) and keeps both the JSON summary and the results the
figures are drawn from.  ``summary.json`` holds::

    {"threshold", "always_on_level", "topk", "bin_labels",
     "models": {name: {"n_layers", "n_heads", "n_trials" (successful = scored trials),
                       "retrieval_heads": [[layer, head, mean_score], ...] (highest first),
                       "share_retrieval", "bins": {label: share}, "always_on": [[layer, head]],
                       "always_on_at_level", "context_dependent", "retrieval_per_layer",
                       "n_kv_heads", "n_trials_run", "n_silent_trials" (trials in which
                       no head copied), "source", "score",
                       "groups": {...} or null (GQA models), "switch_on": [...] or null,
                       "thresholds": [{"threshold", "n_retrieval", "share",
                                       "jaccard_with_default"}],
                       "stability": {"k", "draws", "seed", "level", "stable_after",
                                     "curve": [{"n_trials", "topk_jaccard", ...}]},
                       "scores_of_one_model": [{"a" (the model's score), "b" (another score
                                                of the same trials), "pearson", "spearman",
                                                "topk_jaccard": {K: J},
                                                "retrieval_jaccard"}] or null}},
     "pairs": [{"a", "b", "pearson", "spearman", "topk_jaccard": {K: J}, "retrieval_jaccard"}],
     "not_compared": [{"a", "b", "reason"}]}

Only same-shape models are paired.  null stands for an undefined value: a correlation of a
constant score map, a top-K Jaccard with K above the number of heads.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rh_lens.heads import THRESHOLD, label, labels
from rh_lens.properties.activation import ALWAYS_ON_LEVEL, ActivationResult, compute_activation
from rh_lens.properties.groups import GroupResult, compute_groups, group_scores
from rh_lens.properties.intrinsic import (
    TOPK,
    CorrelationMatrix,
    IntrinsicResult,
    compute_correlation_matrix,
    compute_intrinsic,
)
from rh_lens.properties.kinds import ScoreComparison, compute_score_comparison
from rh_lens.properties.scores import HeadScores
from rh_lens.properties.sparsity import BIN_LABELS, compute_sparsity, retrieval_heads
from rh_lens.properties.stability import (
    STABLE_JACCARD,
    THRESHOLDS,
    StabilityCurve,
    ThresholdSweep,
    compute_stability,
    compute_threshold_sweep,
)
from rh_lens.properties.switch_on import SwitchOnResult, compute_switch_on
from rh_lens.properties.universality import UniversalityResult, compute_universality
from rh_lens.results import ResultFileError, read_json, to_jsonable, write_json_atomic

SUMMARY_JSON = "summary.json"
TABLE_TXT = "table.txt"


@dataclass(frozen=True)
class PropertySummary:
    """The summary (``summary``, as saved), its printed table (``text``) and the results the
    figures are drawn from (empty when the summary was loaded from disk)."""

    summary: dict
    text: str
    universality: UniversalityResult | None = None
    activation: dict[str, ActivationResult] | None = None
    groups: dict[str, GroupResult] | None = None
    switch_on: dict[str, SwitchOnResult] | None = None
    intrinsic: tuple[IntrinsicResult, ...] = ()
    correlations: CorrelationMatrix | None = None
    thresholds: dict[str, ThresholdSweep] | None = None
    stability: dict[str, StabilityCurve] | None = None
    score_kinds: dict[str, ScoreComparison] | None = None

    def save(self, directory: str | Path) -> Path:
        """``summary.json`` and ``table.txt`` in ``directory`` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_json_atomic(directory / SUMMARY_JSON, to_jsonable(self.summary, nan_to_none=True),
                          indent=1)
        (directory / TABLE_TXT).write_text(self.text + "\n", encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "PropertySummary":
        directory = Path(directory)
        summary = read_json(directory / SUMMARY_JSON)
        if not isinstance(summary, dict) or "models" not in summary:
            raise ResultFileError(f"{directory / SUMMARY_JSON}: not a properties summary")
        table = directory / TABLE_TXT
        text = table.read_text(encoding="utf-8").rstrip("\n") if table.is_file() else ""
        return cls(summary, text)


def compute_property_summary(
    models: Sequence[HeadScores], *, threshold: float = THRESHOLD,
    level: float = ALWAYS_ON_LEVEL, topk: Sequence[int] = TOPK, top: int = 5,
    switch_on_heads: int = 10, thresholds: Sequence[float] = THRESHOLDS, stability_k: int = 10,
    stability_draws: int = 100, seed: int = 0,
) -> PropertySummary:
    """Every property of every model, and the correlations of every same-shape pair.  The
    threshold sweep and the stability curve (top-``stability_k``, ``stability_draws`` seeded
    resamples per trial count) are per model."""
    if any(k < 1 for k in topk):
        raise ValueError(f"top-K values must be >= 1, got {list(topk)}")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"two inputs have the same name: {names}")
    uni = compute_universality(models, threshold=threshold, level=level, top=top)
    acts = {m.name: compute_activation(m, threshold=threshold, level=level) for m in models}
    groups, switch_on, entries, sweeps, curves, kinds = {}, {}, {}, {}, {}, {}
    lines = [uni.format_table(), ""]
    for m, row in zip(models, uni.models, strict=True):
        act, sp = acts[m.name], row.sparsity
        entry = {
            "n_layers": m.shape[0], "n_heads": m.shape[1], "n_trials": m.n_trials,
            "retrieval_heads": [list(h) for h in retrieval_heads(m.mean, threshold=threshold)],
            "share_retrieval": sp.share_retrieval, "bins": sp.bins,
            "always_on": [list(h) for h in act.always_on],
            "always_on_at_level": [list(h) for h in act.always_on_at_level],
            "context_dependent": [list(h) for h in act.context_dependent],
            "retrieval_per_layer": sp.per_layer.tolist(), "n_kv_heads": m.n_kv_heads,
            "n_trials_run": m.n_trials_run, "n_silent_trials": m.n_silent_trials,
            "source": m.source, "score": m.score,
            "groups": None, "switch_on": None,
        }
        on = " ".join(labels(act.always_on)) or "none"
        lines.append(f"{m.name}: always-on (frequency 1): {on}; >= {level}: "
                     f"{len(act.always_on_at_level)} heads; context-dependent retrieval heads: "
                     f"{len(act.context_dependent)}")
        if m.n_silent_trials:
            lines.append(f"  {m.n_silent_trials} of {m.n_trials} successful trials have no head "
                         "that copied a token, so no head reaches frequency 1")
        if m.n_kv_heads is not None and m.n_kv_heads < m.shape[1]:
            g = groups[m.name] = compute_groups(m.mean, m.n_kv_heads, threshold=threshold)
            gs = compute_sparsity(group_scores(m).mean, threshold=threshold)
            entry["groups"] = {
                "n_kv_heads": g.n_kv_heads, "groups_with_retrieval_heads": g.groups_hit,
                "expected_at_random": g.expected_groups_hit,
                "heads_sharing_a_group": g.shared, "expected_sharing_at_random": g.expected_shared,
                "retrieval_groups_by_mean": {"n": gs.n_retrieval, "share": gs.share_retrieval,
                                             "bins": gs.bins},
            }
            lines.append(f"  {m.n_kv_heads} KV groups/layer: {g.n_retrieval} retrieval heads in "
                         f"{g.groups_hit} groups ({g.expected_groups_hit:.1f} expected at random);"
                         f" {g.shared} share a group with another ({g.expected_shared:.1f} "
                         "expected)")
        if m.contexts is not None:
            sw = switch_on[m.name] = compute_switch_on(m, threshold=threshold,
                                                       max_heads=switch_on_heads)
            entry["switch_on"] = sw.table()
            lines.extend(_switch_on_lines(sw))
        sweep = sweeps[m.name] = compute_threshold_sweep(m.mean, thresholds=thresholds,
                                                         default=threshold)
        curve = curves[m.name] = compute_stability(
            m, k=min(stability_k, m.mean.size), threshold=threshold, draws=stability_draws,
            seed=seed)
        stable = {"topk_jaccard_mean": curve.stable_after(),
                  "topk_jaccard_p05": curve.stable_after(percentile=5),
                  "retrieval_jaccard_mean": curve.stable_after("retrieval_jaccard")}
        entry["thresholds"] = sweep.table()
        entry["stability"] = {"k": curve.k, "draws": stability_draws, "seed": seed,
                              "level": STABLE_JACCARD, "stable_after": stable,
                              "curve": curve.table()}
        lines.append(f"  top-{curve.k} set (Jaccard with all {m.n_trials} trials >= "
                     f"{STABLE_JACCARD}): from {_n(stable['topk_jaccard_mean'])} trials on "
                     f"average, {_n(stable['topk_jaccard_p05'])} in 95 % of resamples; "
                     f"retrieval-head set: {_n(stable['retrieval_jaccard_mean'])}")
        lines.append("  retrieval heads by threshold: " + ", ".join(
            f"{t:g}: {n}" for t, n in zip(sweep.thresholds, sweep.n_retrieval, strict=True)))
        comparison = compute_score_comparison(m, topk=topk, threshold=threshold)
        entry["scores_of_one_model"] = None if comparison is None else comparison.table()
        if comparison is not None:
            kinds[m.name] = comparison
            lines.extend(comparison.lines())
        entries[m.name] = entry

    pairs, skipped, intrinsic = [], [], []
    jac_head = " ".join(f"{'J@' + str(k):>6}" for k in topk)
    lines += ["", f"{'a':<22} {'b':<22} {'pearson':>7} {'spearman':>8}  {jac_head}  "
              f"{'J(>' + str(threshold) + ')':>8}"]
    for i, a in enumerate(models):
        for b in models[i + 1:]:
            if a.shape != b.shape:
                skipped.append({"a": a.name, "b": b.name, "reason": f"shapes {a.shape[0]}x"
                                f"{a.shape[1]} and {b.shape[0]}x{b.shape[1]} differ"})
                continue
            r = compute_intrinsic(a.mean, b.mean, names=(a.name, b.name), threshold=threshold,
                                  ks=[k for k in topk if k <= a.mean.size])
            intrinsic.append(r)
            jac = {k: r.topk_jaccard.get(k, math.nan) for k in topk}  # NaN: K > heads
            pairs.append({"a": a.name, "b": b.name, "pearson": r.pearson, "spearman": r.spearman,
                          "topk_jaccard": {str(k): v for k, v in jac.items()},
                          "retrieval_jaccard": r.retrieval_jaccard})
            lines.append(f"{a.name[:22]:<22} {b.name[:22]:<22} {r.pearson:7.3f} "
                         f"{r.spearman:8.3f}  " + " ".join(f"{v:6.2f}" if v == v else f"{'-':>6}"
                                                   for v in jac.values())
                         + f"  {r.retrieval_jaccard:8.2f}")
    if not pairs:
        lines.append("(no two inputs have the same shape)")
    if skipped:
        lines.append(f"{len(skipped)} pairs of different shapes are only summarised")
    summary = {"threshold": threshold, "always_on_level": level, "topk": list(topk),
               "bin_labels": list(BIN_LABELS), "models": entries, "pairs": pairs,
               "not_compared": skipped}
    corr = compute_correlation_matrix({m.name: m.mean for m in models})
    return PropertySummary(summary, "\n".join(lines), uni, acts, groups, switch_on,
                           tuple(intrinsic), corr, sweeps, curves, kinds)


def _n(trials: int | None) -> str:
    return "never" if trials is None else str(trials)


def _switch_on_lines(sw: SwitchOnResult) -> list[str]:
    if not sw.heads:
        return ["  no context-dependent retrieval heads"]
    out = [f"  {'head':<8} {'score':>5} {'freq':>5}  factor (eta2)     on when            "
           "off when"]
    for row in sw.table():
        (on_v, on_r), (off_v, off_r) = row["on_when"], row["off_when"]
        eta = row["eta2"][row["factor"]]
        eta_text = "-" if eta is None else f"{eta:.2f}"
        name = label((row["layer"], row["head"]))
        out.append(f"  {name:<{len(str(row['layer'])) + 7}} {row['mean_score']:5.2f} "
                   f"{row['frequency']:5.2f}  {row['factor']:<6} ({eta_text})     "
                   f"{row['factor']} {on_v:g}: {on_r:.2f}   {row['factor']} {off_v:g}: "
                   f"{off_r:.2f}")
    return out
