"""The input of every property: one model's per-trial head scores, and how they are read.

A :class:`HeadScores` holds the scores of the successful trials, read by
:func:`load_head_scores` from an rh_lens detection directory (``python -m analyses.detect``) or a
reference-format ``{"layer-head": [score per trial]}`` file, or built in memory from a
:class:`~rh_lens.detect.DetectResult` (:meth:`HeadScores.from_detect`).  A head is *active* in a
trial when it copied at least one token (rh_lens: ``trial_active``; reference file: score > 0,
which is the same for step and set scores).  Which context (needle, length, depth) a trial had
only rh_lens directories say (``trials.jsonl``); reference files carry no context.

An rh_lens directory may hold several scores of the same trials (``step``, ``set``, and the
attention scores ``mass`` and ``qr`` when detection ran them); one is read as the trial scores,
the mean tables of the others come along in :attr:`HeadScores.others`.  Scores are never
negative, except QR scores (a difference of two attention masses).
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from jaxtyping import Bool, Float

from rh_lens.results import ResultFileError, import_reference_json, load_result
from rh_lens.types import HeadTable

Table = HeadTable
SCORES = ("step", "set", "mass", "qr")
SIGNED = ("qr",)  # scores that may be negative
Score = Literal["step", "set", "mass", "qr"]


def _check_score(score: str) -> None:
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")


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
    others: dict[str, Table] | None = None  # mean tables of the directory's other scores

    def __post_init__(self):
        scores = np.asarray(self.trial_scores, dtype=np.float64)
        if scores.ndim != 3 or 0 in scores.shape[1:]:
            raise ValueError(f"{self.name}: trial_scores must be [n_trials, n_layers, n_heads], "
                             f"got shape {scores.shape}")
        if scores.shape[0] == 0:
            raise ValueError(f"{self.name}: zero successful trials, so no head has a retrieval "
                             "score (a failed trial is dropped, not scored 0)")
        if not np.isfinite(scores).all() or (self.score not in SIGNED and (scores < 0).any()):
            raise ValueError(f"{self.name}: scores must be finite and >= 0")
        for kind, table in (self.others or {}).items():
            if np.shape(table) != scores.shape[1:]:
                raise ValueError(f"{self.name}: the {kind} table has shape {np.shape(table)}, "
                                 f"the heads are {scores.shape[1:]}")
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
    def from_detect(cls, result, *, name: str = "model", score: Score = "step",
                    source: str = "") -> "HeadScores":
        """The scores of an in-memory :class:`~rh_lens.detect.DetectResult` (the same as
        :func:`load_head_scores` reads from the directory it is saved in)."""
        _check_score(score)
        contexts = tuple(TrialContext(int(r.cell.needle), int(r.cell.length), float(r.cell.depth))
                         for r in result.records if r.success)
        return cls(name, result.trial_scores(score),
                   trial_active=result.trial_scores("active") > 0, n_kv_heads=result.n_kv_heads,
                   contexts=contexts, n_trials_run=len(result.records), source=source,
                   score=score, others={k: result.mean_scores(k) for k in result.scores
                                        if k != score} or None)

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
                     score: Score = "step",
                     n_kv_heads: int | None = None,
                     shape: tuple[int, int] | None = None) -> HeadScores:
    """Read an rh_lens detection directory, a reference-format score file, a DuoAttention
    ``*.tsv`` (gate values, one trial) or a QRHead ``*.yaml`` head set (1 for its heads, 0
    elsewhere; needs the model's ``shape``, ``(n_layers, n_heads)``).

    ``score`` picks the rh_lens score (a reference file holds one kind: step scores in the
    reference's own files); a directory's other scores come along as mean tables
    (:attr:`HeadScores.others`).  ``n_kv_heads`` sets the GQA grouping where the input does not say.
    The default name is the directory's model spec, or the file's stem (its folder's name for
    ``head_score.json``).  Bad input raises a ``ValueError`` naming the file.
    """
    path = Path(path)
    _check_score(score)
    if path.is_dir():
        return _load_detect_dir(path, name=name, score=score, n_kv_heads=n_kv_heads)
    if path.suffix in (".tsv", ".yaml", ".yml"):
        from rh_lens import headfiles

        if path.suffix == ".tsv":
            table, kind = headfiles.read_duo_tsv(path), "DuoAttention gates"
        else:
            if shape is None:
                raise ValueError(f"{path}: a QRHead head set needs the model's shape (pass it "
                                 "with a score file of the same model)")
            table = headfiles.head_set_table(
                headfiles.read_qrhead_yaml(path, n_layers=shape[0], n_heads=shape[1]),
                n_layers=shape[0], n_heads=shape[1])
            kind = "QRHead head set"
        return HeadScores(name or path.stem, table[None], n_kv_heads=n_kv_heads,
                          source=str(path), score=kind)
    trials = import_reference_json(path)
    default = path.parent.name if path.stem == "head_score" and path.parent.name else path.stem
    return HeadScores(name or default, trials, n_kv_heads=n_kv_heads, source=str(path),
                      score="reference file")


def _load_detect_dir(path: Path, *, name, score, n_kv_heads) -> HeadScores:
    res = load_result(path, kind="detect")
    missing = {f"trial_{score}", "trial_active", "success"} - set(res.arrays)
    if missing:
        hint = (f" (detection ran without the {score} score)" if f"trial_{score}" in missing
                and score in ("mass", "qr") else "")
        raise ResultFileError(f"{path}: arrays.npz lacks {sorted(missing)}{hint}")
    success = res.arrays["success"].astype(bool)
    if "span_found" in res.arrays:  # the reference protocol scores no trial without its span
        success &= res.arrays["span_found"].astype(bool)
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
        others={k: res.arrays[f"trial_{k}"].mean(axis=0) for k in SCORES
                if k != score and f"trial_{k}" in res.arrays} or None,
    )


def _read_contexts(path: Path, success: np.ndarray) -> tuple[TrialContext, ...]:
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) != success.size:
        raise ResultFileError(f"{path}: {len(lines)} trials, arrays.npz has {success.size}")
    out = []
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
            cell, ok = rec["cell"], rec["success"] and rec.get("answer_span") != [-1, -1]
            ctx = TrialContext(int(cell["needle"]), int(cell["length"]), float(cell["depth"]))
        except (ValueError, KeyError, TypeError) as err:
            raise ResultFileError(f"{path}: line {i + 1}: bad trial record ({err})") from None
        if bool(ok) != bool(success[i]):
            raise ResultFileError(f"{path}: line {i + 1}: success differs from arrays.npz")
        if ok:
            out.append(ctx)
    return tuple(out)
