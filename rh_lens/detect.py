"""Retrieval-score detection: a sweep of NIAH trials, scored per head, resumable and shardable.

A sweep is the grid needles x context lengths x depths.  Each cell is one trial (build the
prompt, decode greedily while recording every head's top-1 key, score it) and, when an output
directory is given, one file written atomically (``cells/<id>.json`` + ``.npz``): rerunning
skips finished cells, and ``shard=(i, n)`` takes every n-th cell so that n machines can split a
sweep and :meth:`DetectResult.merge` can combine their directories.  A result saves itself
(:meth:`DetectResult.save`) beside its cells and loads back from them (:meth:`DetectResult.load`).

Every trial has the copy scores (``step``, ``set``).  Two attention scores are computed when
asked (``compute_detect(..., scores=...)``), on the same trials: ``mass``, the mean over decoding
steps of each head's attention mass on the answer span (read in the decode's own reduction,
:func:`rh_lens.scoring.span_mass`), and ``qr``, QRHead's question-to-needle mass calibrated by a
null question (one more prefill of the prompt, :mod:`rh_lens.qr`).  A cell stores the scores it
was run with; a sweep resumed with a score its stored cells lack runs those cells again.
"""

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from jaxtyping import Bool, Float

from rh_lens import protocols, qr, scoring
from rh_lens.decode import decode_greedy
from rh_lens.heads import THRESHOLD, group_table, ranked_heads
from rh_lens.models import model_facts
from rh_lens.niah import Haystack, Needle
from rh_lens.results import (
    RunMetadata,
    atomic_open,
    export_reference_json,
    save_result,
    write_json_atomic,
)
from rh_lens.store import (
    Record,
    StoreError,
    SweepStore,
    as_read_back,
    merge,
    read_finished,
    read_record,
)
from rh_lens.store import shard as shard_cells

HEAD_SCORE_JSON = "head_score.json"
TRIALS_JSONL = "trials.jsonl"
SUMMARY_JSON = "summary.json"
Score = Literal["step", "set", "mass", "qr"]
SCORES: tuple[str, ...] = ("step", "set", "mass", "qr")
EXTRA_SCORES: tuple[str, ...] = ("mass", "qr")  # computed only when asked


def check_scores(kinds) -> tuple[str, ...]:
    """The attention scores among ``kinds`` (step and set are always computed), in order."""
    unknown = sorted(set(kinds) - set(SCORES))
    if unknown:
        raise ValueError(f"unknown scores {unknown}; expected some of {', '.join(SCORES)}")
    return tuple(k for k in EXTRA_SCORES if k in kinds)


@dataclass(frozen=True)
class DetectConfig:
    """Everything that decides a detection sweep's numbers."""

    lengths: tuple[int, ...]
    depths: tuple[float, ...] = tuple(float(d) for d in np.linspace(0, 100, 10))
    buffer: int = 200
    max_new_tokens: int = 50
    chunk_size: int = 512
    chat: bool = False
    batch_size: int = 1
    protocol: protocols.Protocol = "paper"  # or "reference": the reference code's (protocols)

    def __post_init__(self):
        protocols.check_protocol(self.protocol)
        if not self.lengths or not self.depths:
            raise ValueError("a sweep needs at least one context length and one depth")
        if any(d < 0 or d > 100 for d in self.depths):
            raise ValueError(f"depths are percentages in [0, 100], got {self.depths}")
        for name in ("batch_size", "max_new_tokens", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name, values in (("lengths", [int(v) for v in self.lengths]),
                             ("depths", [float(v) for v in self.depths])):
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:
                raise ValueError(f"{name} repeat {repeated}: give each grid value once (a "
                                 "repeated value would weight its trials twice in every mean)")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        if data["protocol"] == "paper":  # the default is left out: older sweeps stay the same
            del data["protocol"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "DetectConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown detection settings: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass(frozen=True)
class Cell:
    needle: int
    length: int
    depth: float

    @property
    def key(self) -> str:
        return f"n{self.needle:03d}_L{self.length:07d}_d{self.depth:06.2f}"


def cells(n_needles: int, cfg: DetectConfig, shard: tuple[int, int] = (0, 1)) -> list[Cell]:
    """The sweep's cells in a fixed order; shard ``(i, n)`` keeps cells ``i, i+n, i+2n, ...``
    (:func:`rh_lens.store.shard`)."""
    grid = [Cell(n, int(length), float(depth)) for n in range(n_needles)
            for length in cfg.lengths for depth in cfg.depths]
    return shard_cells(grid, *shard)


@dataclass(frozen=True)
class TrialRecord:
    """One trial's outcome.  Per-head arrays are ``[n_layers, n_heads]``."""

    cell: Cell
    n_tokens: int
    answer_span: tuple[int, int]
    question: str
    answer: str
    generated: str
    rouge1_recall: float
    success: bool
    step_score: Float[np.ndarray, "n_layers n_heads"]
    set_score: Float[np.ndarray, "n_layers n_heads"]
    active: Bool[np.ndarray, "n_layers n_heads"]
    tokens: np.ndarray
    positions: np.ndarray
    mass_score: Float[np.ndarray, "n_layers n_heads"] | None = None
    qr_score: Float[np.ndarray, "n_layers n_heads"] | None = None

    @property
    def scores(self) -> tuple[str, ...]:
        """The attention scores this trial holds (:data:`EXTRA_SCORES`)."""
        return tuple(k for k in EXTRA_SCORES if getattr(self, f"{k}_score") is not None)

    def to_json(self) -> dict:
        return {
            "cell": dataclasses.asdict(self.cell),
            "n_tokens": self.n_tokens,
            "answer_span": list(self.answer_span),
            "question": self.question,
            "answer": self.answer,
            "generated": self.generated,
            "rouge1_recall": self.rouge1_recall,
            "success": self.success,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        return {"step_score": self.step_score, "set_score": self.set_score,
                "active": self.active, "tokens": self.tokens, "positions": self.positions,
                **{f"{k}_score": getattr(self, f"{k}_score") for k in self.scores}}

    @classmethod
    def from_record(cls, record: Record) -> "TrialRecord":
        data, arr = record.fields, record.arrays
        try:
            return cls(
                cell=Cell(**data["cell"]), n_tokens=data["n_tokens"],
                answer_span=tuple(data["answer_span"]), question=data["question"],
                answer=data["answer"], generated=data["generated"],
                rouge1_recall=data["rouge1_recall"], success=data["success"],
                step_score=arr["step_score"], set_score=arr["set_score"], active=arr["active"],
                tokens=arr["tokens"], positions=arr["positions"],
                mass_score=arr.get("mass_score"), qr_score=arr.get("qr_score"),
            )
        except (KeyError, TypeError) as err:
            raise StoreError(f"cell {record.key}: not a detection trial record (missing or bad "
                             f"{err})") from None


def run_trials(
    model, needles: Sequence[Needle], haystacks: Sequence[Haystack], todo: Sequence[Cell],
    cfg: DetectConfig, *, scores: Sequence[str] = (),
) -> list[TrialRecord]:
    """Build, decode and score the given cells, in ``todo``'s order.  Trials are decoded
    ``cfg.batch_size`` at a time, shortest prompts together (left-padded to the longest of
    their batch; each decodes exactly what it decodes alone).  ``scores`` adds attention
    scores (:data:`EXTRA_SCORES`) to the copy scores."""
    extra = check_scores(scores)
    trials = [
        protocols.build(
            cfg.protocol, model, needles[c.needle], haystacks[c.needle], context_length=c.length,
            depth=c.depth, buffer=cfg.buffer, max_new_tokens=cfg.max_new_tokens, chat=cfg.chat,
            lengths=cfg.lengths,
        )
        for c in todo
    ]
    records: list[TrialRecord | None] = [None] * len(todo)
    order = sorted(range(len(trials)), key=lambda i: trials[i].n_tokens)
    for start in range(0, len(order), cfg.batch_size):
        batch = order[start : start + cfg.batch_size]
        outs = decode_greedy(model, [trials[i].tokens for i in batch],
                             max_new_tokens=cfg.max_new_tokens, chunk_size=cfg.chunk_size,
                             stop=protocols.stop_rule(cfg.protocol),
                             spans=([trials[i].answer_span for i in batch] if "mass" in extra
                                    else None))
        for i, out in zip(batch, outs, strict=True):
            text = protocols.response(cfg.protocol, model.tokenizer, out.tokens, out.text)
            qr_table = (qr.qr_scores(model, trials[i], chunk_size=cfg.chunk_size)
                        if "qr" in extra else None)
            records[i] = score_trial(todo[i], trials[i], out, text=text, qr_score=qr_table)
    return [r for r in records if r is not None]


def score_trial(cell: Cell, trial, out, *, text: str | None = None,
                qr_score: np.ndarray | None = None) -> TrialRecord:
    """``text`` (default ``out.text``) is what ROUGE reads.  A trial whose answer span was not
    found (the reference protocol) has NaN scores and no copy.  The mass score is read from
    ``out.span_mass`` when the decode recorded it; ``qr_score`` is stored as given."""
    text = out.text if text is None else text
    sequence = torch.cat([trial.tokens, torch.from_numpy(out.tokens)])
    emitted = torch.from_numpy(out.tokens)
    positions = torch.from_numpy(out.positions).long()
    copies = scoring.copy_events(positions, emitted, sequence, trial.answer_span)
    recall = scoring.rouge1_recall(trial.needle.answer, text)
    found = protocols.span_found(trial.answer_span)
    nan = torch.full(copies.shape[1:], float("nan"), dtype=torch.float64)
    return TrialRecord(
        cell=cell,
        n_tokens=trial.n_tokens,
        answer_span=trial.answer_span,
        question=trial.needle.question,
        answer=trial.needle.answer,
        generated=text,
        rouge1_recall=recall,
        success=scoring.succeeded(recall),
        step_score=(scoring.step_scores(copies, trial.answer_span) if found else nan).numpy(),
        set_score=(scoring.set_scores(copies, emitted, sequence, trial.answer_span) if found
                   else nan).numpy(),
        active=scoring.activation(copies).numpy(),
        tokens=out.tokens,
        positions=out.positions,
        mass_score=None if out.span_mass is None else (
            scoring.mass_scores(torch.from_numpy(out.span_mass)) if found else nan).numpy(),
        qr_score=qr_score,
    )


# --------------------------------------------------------------------------------------------
# Cells in the sweep store


def write_cell(store: SweepStore, record: TrialRecord) -> None:
    store.write(record.cell.key, record.to_json(), record.arrays())


def read_cell(json_path: Path) -> TrialRecord:
    return TrialRecord.from_record(read_record(json_path))


# --------------------------------------------------------------------------------------------
# The sweep and its aggregates


@dataclass(frozen=True)
class DetectResult:
    """All trials of a sweep (in cell order) and their per-head aggregates.

    Aggregates are over *successful* trials only (ROUGE-1 recall > 0.5), as in the reference,
    whose answer span was found (always, but under the reference protocol): :attr:`scored`.
    """

    config: DetectConfig
    records: tuple[TrialRecord, ...]
    n_layers: int
    n_heads: int
    n_kv_heads: int
    missing: tuple[str, ...] = ()  # cells of the grid not run (a partial merge)

    @property
    def success(self) -> Bool[np.ndarray, " trial"]:
        return np.array([r.success for r in self.records], dtype=bool)

    @property
    def n_success(self) -> int:
        return int(self.success.sum())

    @property
    def span_found(self) -> Bool[np.ndarray, " trial"]:
        return np.array([protocols.span_found(r.answer_span) for r in self.records], dtype=bool)

    @property
    def scored(self) -> Bool[np.ndarray, " trial"]:
        """The trials the aggregates average: successful, with the answer span found."""
        return self.success & self.span_found

    @property
    def n_scored(self) -> int:
        return int(self.scored.sum())

    @property
    def scores(self) -> tuple[str, ...]:
        """Every score that all trials hold: step, set, and the attention scores run."""
        held = [k for k in EXTRA_SCORES if all(k in r.scores for r in self.records)]
        return ("step", "set", *held) if self.records else ("step", "set")

    def trial_scores(self, kind: str = "step") -> Float[np.ndarray, "trial n_layers n_heads"]:
        """Per scored trial: one of :data:`SCORES`, or ``"active"`` (0/1)."""
        if kind not in (*SCORES, "active"):
            raise ValueError(f"kind must be one of {', '.join(SCORES)} or 'active', got {kind!r}")
        if kind in EXTRA_SCORES and kind not in self.scores:
            lacking = sum(kind not in r.scores for r in self.records)
            raise ValueError(f"{lacking} of {len(self.records)} trials have no {kind} score: run "
                             f"the sweep again with the {kind} score (its cells are rerun)")
        rows = [getattr(r, "active" if kind == "active" else f"{kind}_score").astype(np.float64)
                for r, scored in zip(self.records, self.scored, strict=True) if scored]
        if not rows:
            return np.zeros((0, self.n_layers, self.n_heads))
        return np.stack(rows)

    def mean_scores(self, kind: str = "step") -> Float[np.ndarray, "n_layers n_heads"]:
        """A head's retrieval score (mean over scored trials; NaN when there is none)."""
        scores = self.trial_scores(kind)
        if scores.shape[0] == 0:
            return np.full((self.n_layers, self.n_heads), np.nan)
        return scores.mean(axis=0)

    def activation_frequency(self) -> Float[np.ndarray, "n_layers n_heads"]:
        """Share of successful trials in which the head copied at least one token."""
        return self.mean_scores("active")

    def group_scores(self, kind: str = "step") -> Float[np.ndarray, "n_layers n_kv_heads"]:
        """Mean of the query heads' scores within each key/value group."""
        return group_table(self.mean_scores(kind), self.n_kv_heads)

    def rouge_grid(self) -> Float[np.ndarray, "n_depths n_lengths"]:
        """Mean ROUGE-1 recall per (depth, context length), over needles."""
        cfg = self.config
        grid = np.full((len(cfg.depths), len(cfg.lengths)), np.nan)
        for i, depth in enumerate(cfg.depths):
            for j, length in enumerate(cfg.lengths):
                vals = [r.rouge1_recall for r in self.records
                        if r.cell.length == length and np.isclose(r.cell.depth, depth)]
                if vals:
                    grid[i, j] = float(np.mean(vals))
        return grid

    # ----------------------------------------------------------------------------------------
    # On disk

    def ranked(self, score: Score = "step") -> list[tuple[int, int, float]]:
        """Every head as ``(layer, head, score)``, highest first (empty if no trial succeeded)."""
        return ranked_heads(self.mean_scores(score)) if self.n_scored else []

    def arrays(self) -> dict[str, np.ndarray]:
        """The aggregates as saved in ``arrays.npz``."""
        return {
            "mean_step": self.mean_scores("step"),
            "mean_set": self.mean_scores("set"),
            "activation_frequency": self.activation_frequency(),
            "trial_step": self.trial_scores("step"),
            "trial_set": self.trial_scores("set"),
            "trial_active": self.trial_scores("active"),
            "group_step": self.group_scores("step"),
            "group_set": self.group_scores("set"),
            "rouge_grid": self.rouge_grid(),
            "success": self.success,
            "span_found": self.span_found,
            **{f"{prefix}_{kind}": fn(kind) for kind in self.scores if kind in EXTRA_SCORES
               for prefix, fn in (("mean", self.mean_scores), ("trial", self.trial_scores),
                                  ("group", self.group_scores))},
        }

    def summary(self, score: Score = "step") -> dict:
        """Trials, successes, the retrieval heads (score > the threshold) and the mean recall;
        ``partial`` lists the cells a partial merge lacks."""
        summary = {
            "n_trials": len(self.records),
            "n_success": self.n_success,
            "score": score,
            "scores": list(self.scores),
            "retrieval_heads": [[lay, h, s] for lay, h, s in self.ranked(score) if s > THRESHOLD],
            "mean_rouge1_recall": float(np.mean([r.rouge1_recall for r in self.records]))
            if self.records else None,
        }
        if self.config.protocol != "paper":
            lost = [r.cell.key for r in self.records if not protocols.span_found(r.answer_span)]
            summary["protocol"] = self.config.protocol
            summary["n_scored"] = self.n_scored
            summary["span_not_found"] = {"count": len(lost), "cells": lost}
        if self.missing:
            summary["partial"] = {"missing_cells": list(self.missing)}
        return summary

    def save(self, directory: str | Path, *, meta: RunMetadata | None = None,
             identity: dict | None = None, score: Score = "step") -> dict:
        """Write the result into ``directory``: its cells (those not there yet, so a result
        computed in memory loads back with :meth:`load`), ``result.json`` + ``arrays.npz``
        (config, provenance, aggregates), ``summary.json``, ``trials.jsonl`` (one line per
        trial) and ``head_score.json`` in the reference's format (when a trial succeeded).
        ``identity`` (model spec, inputs, ...) joins the sweep's identity and the config;
        ``meta`` defaults to this environment's provenance.  Returns the summary."""
        directory = Path(directory)
        if meta is None:
            meta = RunMetadata.collect(model_spec=str((identity or {}).get("model", "unknown")),
                                       seed=None, argv=None)
        shape = {"n_layers": self.n_layers, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads}
        store = SweepStore(directory)
        if (directory / store.identity_file).is_file():  # the sweep this result was run in
            if store.identity().get("config") != as_read_back(self.config.to_dict()):
                raise StoreError(f"{directory} holds cells of a different sweep (differs in: "
                                 "config); save into a new directory")
        else:
            store = SweepStore.open(directory, {"config": self.config.to_dict(), "shape": shape,
                                                **(identity or {})})
        done = store.finished()
        for record in self.records:  # a result computed in memory keeps its cells too
            if record.cell.key not in done:
                write_cell(store, record)
        arrays = self.arrays()
        summary = self.summary(score)
        config = {**self.config.to_dict(), **(identity or {})}
        config.setdefault("shape", shape)
        save_result(directory, kind="detect", config=config, meta=meta, summary=summary,
                    arrays=arrays)
        if self.n_scored and np.isfinite(arrays[f"trial_{score}"]).all():
            export_reference_json(directory / HEAD_SCORE_JSON, arrays[f"trial_{score}"])
        lines = [json.dumps({**r.to_json(), "step_score_max": float(r.step_score.max())
                              if protocols.span_found(r.answer_span) else None})
                 for r in self.records]
        with atomic_open(directory / TRIALS_JSONL, "w") as f:
            f.write("".join(line + "\n" for line in lines))
        write_json_atomic(directory / SUMMARY_JSON, summary)
        return summary

    @classmethod
    def load(cls, directory: str | Path) -> "DetectResult":
        """The sweep in ``directory`` read back from its cells (every cell must be there)."""
        return cls.merge([directory])[0]

    @classmethod
    def merge(cls, directories: Sequence[str | Path], *, allow_partial: bool = False
              ) -> tuple["DetectResult", dict]:
        """One result from the cells of the shard directories of one sweep, in the sweep's own
        cell order, and the sweep's identity.  Cells missing from every directory are refused,
        naming them, unless ``allow_partial``."""
        identity, found = merge(directories)
        try:
            cfg = DetectConfig.from_dict(identity["config"])
        except (KeyError, TypeError, ValueError) as err:
            raise StoreError(f"{directories[0]}: not a detection sweep ({err})") from None
        records = [read_cell(found[k]) for k in sorted(found)]
        n_needles = (len(identity["needles"]) if "needles" in identity
                     else 1 + max((r.cell.needle for r in records), default=-1))
        order = {c.key: i for i, c in enumerate(cells(n_needles, cfg))}
        missing = [key for key in order if key not in found]
        if missing and not allow_partial:
            raise StoreError(
                f"the directories hold {len(order) - len(missing)} of the sweep's {len(order)} "
                f"cells; missing {len(missing)}: {', '.join(missing[:3])}"
                f"{', ...' if len(missing) > 3 else ''} (merge every shard, or allow a partial "
                "result)")
        records.sort(key=lambda r: order.get(r.cell.key, len(order)))
        shape = identity.get("shape")
        if shape is None:
            if not records:
                raise StoreError(f"{directories[0]}: no finished cell and no model shape")
            n_layers, n_heads = records[0].step_score.shape
            shape = {"n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_heads}
        return (cls(cfg, tuple(records), shape["n_layers"], shape["n_heads"],
                    shape["n_kv_heads"], tuple(missing)), identity)


def compute_detect(
    model,
    needles: Sequence[Needle],
    haystacks: Sequence[Haystack],
    cfg: DetectConfig,
    *,
    out_dir: str | Path | None = None,
    shard: tuple[int, int] = (0, 1),
    identity: dict | None = None,
    progress: bool = True,
    recompute_bad_cells: bool = False,
    scores: Sequence[str] = (),
) -> DetectResult:
    """Run (or resume) a sweep.  With ``out_dir`` every finished cell is written at once to the
    directory's :class:`~rh_lens.store.SweepStore` and cells already there are read instead of
    rerun; ``identity`` (model spec, needle source, ...) is stored with the config so a directory
    never mixes two sweeps.  A stored cell that cannot be read is refused, naming its file, or
    computed again with ``recompute_bad_cells``.

    ``scores`` asks for attention scores beside the copy scores (``"mass"``, ``"qr"``; step and
    set are always there).  A stored cell that lacks one of them is run again, keeping the
    scores it had, and rewritten."""
    from tqdm.auto import tqdm

    extra = check_scores(scores)
    if len(needles) != len(haystacks):
        raise ValueError(f"{len(needles)} needles but {len(haystacks)} haystacks")
    todo = cells(len(needles), cfg, shard)
    store = None
    facts = model_facts(model)
    if out_dir is not None:
        shape = {"n_layers": facts.n_layers, "n_heads": facts.n_heads,
                 "n_kv_heads": facts.n_kv_heads}
        store = SweepStore.open(out_dir, {"config": cfg.to_dict(), "shape": shape,
                                          **(identity or {})})
    by_key: dict[str, TrialRecord] = {}
    if store is not None:
        by_key = read_finished(store, [c.key for c in todo], TrialRecord.from_record,
                               recompute_bad=recompute_bad_cells)
    stale = [r for r in by_key.values() if set(extra) - set(r.scores)]
    extra = check_scores({*extra, *(k for r in stale for k in r.scores)})
    for record in stale:
        del by_key[record.cell.key]
    pending = [c for c in todo if c.key not in by_key]
    step = max(cfg.batch_size, 1) * 4
    with tqdm(total=len(todo), initial=len(by_key), desc="NIAH trials",
              disable=not progress) as bar:
        for start in range(0, len(pending), step):
            for record in run_trials(model, needles, haystacks, pending[start : start + step],
                                     cfg, scores=extra):
                if store is not None:
                    write_cell(store, record)
                by_key[record.cell.key] = record
                bar.update(1)
    return DetectResult(cfg, tuple(by_key[c.key] for c in todo), facts.n_layers, facts.n_heads,
                        facts.n_kv_heads)



