"""An ablation sweep's records per condition, and their aggregates (the K-curve, grids, error
types, where the watched heads look)."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from jaxtyping import Float, Int

from rh_lens.ablation.conditions import Condition
from rh_lens.ablation.config import AblationConfig
from rh_lens.ablation.controls import CONTROLS, ControlComparison, compare_to_control
from rh_lens.ablation.records import AblationRecord
from rh_lens.ablation.taxonomy import ERROR_TYPES, PLACES
from rh_lens.detect import cells
from rh_lens.heads import HeadLike
from rh_lens.results import (
    ResultFileError,
    RunMetadata,
    atomic_open,
    load_result,
    save_result,
    to_jsonable,
    write_json_atomic,
)
from rh_lens.store import SweepStore


@dataclass(frozen=True)
class KCurve:
    """The paper's Figure 7: a metric vs the number of masked heads K.  ``ks`` starts at 0
    (no head masked) when the sweep has the ``none`` condition; NaN where a K was not run."""

    metric: str
    ks: Int[np.ndarray, " n_k"]
    top: Float[np.ndarray, " n_k"]
    random: Float[np.ndarray, "n_draws n_k"]


@dataclass(frozen=True)
class AblationResult:
    """Every condition's records (in cell order) and their aggregates."""

    config: AblationConfig
    conditions: tuple[Condition, ...]
    records: tuple[tuple[AblationRecord, ...], ...]
    watch: tuple[HeadLike, ...]
    n_layers: int
    n_heads: int
    mean_z: Float[np.ndarray, "n_layers n_heads d_head"] | None = None

    def condition(self, name: str) -> tuple[AblationRecord, ...]:
        for cond, recs in zip(self.conditions, self.records, strict=True):
            if cond.name == name:
                return recs
        raise KeyError(f"no condition {name!r}; have {[c.name for c in self.conditions]}")

    def mean_rouge(self) -> Float[np.ndarray, " n_conditions"]:
        return np.array([np.mean([r.rouge1_recall for r in recs]) if recs else np.nan
                         for recs in self.records])

    def success_rate(self) -> Float[np.ndarray, " n_conditions"]:
        return np.array([np.mean([r.success for r in recs]) if recs else np.nan
                         for recs in self.records])

    def grids(self, metric: Literal["rouge", "success"] = "rouge"
              ) -> Float[np.ndarray, "n_conditions n_depths n_lengths"]:
        """Mean per (depth, context length) over needles, per condition."""
        sweep = self.config.sweep
        out = np.full((len(self.conditions), len(sweep.depths), len(sweep.lengths)), np.nan)
        for c, recs in enumerate(self.records):
            for i, depth in enumerate(sweep.depths):
                for j, length in enumerate(sweep.lengths):
                    vals = [r.rouge1_recall if metric == "rouge" else float(r.success)
                            for r in recs if r.cell.length == length
                            and np.isclose(r.cell.depth, depth)]
                    if vals:
                        out[c, i, j] = float(np.mean(vals))
        return out

    def error_counts(self) -> Int[np.ndarray, "n_conditions n_errors"]:
        return np.array([[sum(r.error == e for r in recs) for e in ERROR_TYPES]
                         for recs in self.records], dtype=np.int64).reshape(-1, len(ERROR_TYPES))

    def attention_shares(self, *, failed: bool = True
                         ) -> Float[np.ndarray, "n_conditions n_places"]:
        """Share of the watched heads' decode steps per place, over failed (ROUGE-1 recall
        <= 0.5) or successful trials; under ``uniform``, masked heads are left out."""
        out = np.full((len(self.conditions), len(PLACES)), np.nan)
        for c, (cond, recs) in enumerate(zip(self.conditions, self.records, strict=True)):
            keep = [i for i, h in enumerate(self.watch)
                    if not (self.config.mode == "uniform" and h in cond.heads)]
            counts = sum((r.watch_places[keep].sum(axis=0) for r in recs
                          if r.success != failed), np.zeros(len(PLACES)))
            if counts.sum() > 0:
                out[c] = counts / counts.sum()
        return out

    def k_curve(self, metric: Literal["rouge", "success"] = "rouge") -> KCurve:
        values = self.mean_rouge() if metric == "rouge" else self.success_rate()
        by_name = dict(zip((c.name for c in self.conditions), values, strict=True))
        ks = sorted({c.k for c in self.conditions if c.kind in ("top", "random")})
        has_none = "none" in by_name
        ks = ([0] if has_none else []) + ks
        draws = sorted({c.draw for c in self.conditions if c.kind == "random"}) or [0]
        top = np.full(len(ks), np.nan)
        random = np.full((len(draws), len(ks)), np.nan)
        for j, k in enumerate(ks):
            if k == 0:
                top[j] = random[:, j] = by_name["none"]
                continue
            top[j] = by_name.get(f"top-{k}", np.nan)
            for d_i, d in enumerate(draws):
                random[d_i, j] = by_name.get(f"random-{k}-d{d}", np.nan)
        return KCurve(metric, np.array(ks, dtype=np.int64), top, random)

    def per_trial(self, metric: Literal["rouge", "success"] = "rouge"
                  ) -> dict[str, Float[np.ndarray, " trial"]]:
        """Per condition name, the metric of every trial in cell order."""
        return {cond.name: np.array([r.rouge1_recall if metric == "rouge" else float(r.success)
                                     for r in recs])
                for cond, recs in zip(self.conditions, self.records, strict=True)}

    def controls(self, metric: Literal["rouge", "success"] = "rouge", *, seed: int = 0
                 ) -> tuple[ControlComparison, ...]:
        """Top-K against every control kind the sweep ran (random, matched, bottom), with
        bootstrap intervals and permutation tests (:mod:`rh_lens.ablation.controls`)."""
        values = self.per_trial(metric)
        found = (compare_to_control(values, control=c, metric=metric, seed=seed)
                 for c in CONTROLS)
        return tuple(c for c in found if c is not None)

    def group_names(self) -> list[str]:
        return list(dict.fromkeys(c.group for c in self.conditions))

    def by_group(self, values: np.ndarray) -> np.ndarray:
        """Per-condition values (first axis) averaged within each display group, NaN skipped."""
        groups = [c.group for c in self.conditions]
        return np.stack([_nanmean(values[[i for i, g in enumerate(groups) if g == name]])
                         for name in self.group_names()])


    # ----------------------------------------------------------------------------------------
    # On disk

    def arrays(self) -> dict[str, np.ndarray]:
        """The aggregates as saved in ``arrays.npz``."""
        curves = {m: self.k_curve(m) for m in ("rouge", "success")}
        arrays = {
            "mean_rouge": self.mean_rouge(),
            "success_rate": self.success_rate(),
            "rouge_grids": self.grids("rouge"),
            "success_grids": self.grids("success"),
            "error_counts": self.error_counts(),
            "failure_attention": self.attention_shares(failed=True),
            "success_attention": self.attention_shares(failed=False),
            "k": curves["rouge"].ks,
            "k_top_rouge": curves["rouge"].top,
            "k_random_rouge": curves["rouge"].random,
            "k_top_success": curves["success"].top,
            "k_random_success": curves["success"].random,
        }
        for metric in ("rouge", "success"):
            for comp in self.controls(metric):
                name = f"ctl_{comp.control}_{metric}"
                arrays.update({f"{name}_k": comp.ks, f"{name}_top": comp.top,
                               f"{name}_control": comp.control_values,
                               f"{name}_diff": comp.diff, f"{name}_p": comp.p,
                               f"{name}_q": comp.q})
        if self.mean_z is not None:
            arrays["mean_z"] = self.mean_z
        return arrays

    def summary(self) -> dict:
        """Per condition: ROUGE, success rate, output types, where the watched heads looked in
        failed trials; and the K-curves (NaN as None)."""
        arrays = self.arrays()
        rows = [{
            **cond.to_json(), "group": cond.group,
            "mean_rouge1_recall": arrays["mean_rouge"][c],
            "success_rate": arrays["success_rate"][c],
            "errors": dict(zip(ERROR_TYPES, arrays["error_counts"][c].tolist(), strict=True)),
            "failure_attention": dict(zip(PLACES, arrays["failure_attention"][c], strict=True)),
        } for c, cond in enumerate(self.conditions)]
        curves = {m: self.k_curve(m) for m in ("rouge", "success")}
        return to_jsonable({
            "mode": self.config.mode, "positions": self.config.positions,
            "n_cells": len(self.records[0]), "watch": [list(h) for h in self.watch],
            "conditions": rows,
            "k_curve": {m: {"k": c.ks, "top": c.top, "random": c.random}
                        for m, c in curves.items()},
            "controls": {m: [c.to_json() for c in self.controls(m)]
                         for m in ("rouge", "success")},
        }, nan_to_none=True, where="summary")

    def save(self, directory: str | Path, *, meta: RunMetadata, identity: dict | None = None,
             scores: Float[np.ndarray, "n_layers n_heads"] | None = None) -> dict:
        """Write the result beside its cells: ``result.json`` + ``arrays.npz`` (config with the
        conditions, provenance, aggregates, and the ranking ``scores`` when given),
        ``summary.json`` and ``trials.jsonl`` (one line per condition and cell).  Returns the
        summary."""
        directory = Path(directory)
        arrays = self.arrays()
        if scores is not None:
            arrays["scores"] = np.asarray(scores)
        summary = self.summary()
        config = {**self.config.to_dict(), **(identity or {}),
                  "conditions": [c.to_json() for c in self.conditions]}
        save_result(directory, kind="ablation", config=config, meta=meta, summary=summary,
                    arrays=arrays)
        write_json_atomic(directory / "summary.json", summary, indent=2)
        lines = [json.dumps(r.to_json()) for recs in self.records for r in recs]
        with atomic_open(directory / "trials.jsonl", "w") as f:
            f.write("".join(line + "\n" for line in lines))
        return summary

    @classmethod
    def load(cls, directory: str | Path) -> "AblationResult":
        """The saved result in ``directory``, its records read back from the sweep store."""
        directory = Path(directory)
        saved = load_result(directory, kind="ablation")
        store = SweepStore(directory)
        identity = store.identity()
        cfg = AblationConfig.from_dict(identity["config"])
        conditions = tuple(Condition.from_json(c) for c in saved.config["conditions"])
        n_needles = len(identity.get("needles") or saved.config.get("needles") or [])
        if not n_needles:
            raise ResultFileError(f"{directory}: the sweep does not list its needles")
        todo = cells(n_needles, cfg.sweep)
        records = []
        for cond in conditions:
            sub = SweepStore(directory / "conditions" / cond.name, "condition.json")
            done = sub.finished()
            missing = [c.key for c in todo if c.key not in done]
            if missing:
                raise ResultFileError(f"{sub.root}: {len(missing)} of {len(todo)} cells are "
                                      f"missing (first: {missing[0]})")
            records.append(tuple(AblationRecord.from_record(sub.read(c.key)) for c in todo))
        shape = identity.get("shape") or {}
        n_layers, n_heads = (shape.get("n_layers"), shape.get("n_heads"))
        if n_layers is None:
            n_layers, n_heads = records[0][0].step_score.shape
        return cls(cfg, conditions, tuple(records),
                   tuple(tuple(h) for h in identity.get("watch", [])), n_layers, n_heads,
                   saved.arrays.get("mean_z"))


def _nanmean(rows: np.ndarray) -> np.ndarray:
    """Mean over the first axis ignoring NaN; NaN (no warning) where a column has no value."""
    finite = np.isfinite(rows)
    count = finite.sum(axis=0)
    total = np.where(finite, rows, 0.0).sum(axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)
