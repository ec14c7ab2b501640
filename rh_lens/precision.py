"""Detection at several floating-point precisions, each compared with the first (float32).

The same sweep (cells, needles, haystacks) is run once per dtype, the model loaded anew in that
dtype, and every run is compared with the reference run (the first dtype) by four measures:

- **positions**: the share of ``(trial, step, layer, head)`` entries whose top-1 key position
  equals the reference's, over the steps both runs decoded (per trial the first
  ``min(steps)``: once the generated tokens part, later steps see different inputs, so
  ``same_input_agreement`` also reports the share over the steps whose inputs are still
  identical, up to and including the first step whose token differs);
- **scores**: the largest and the mean absolute difference of the per-head mean scores;
- **head sets**: the Jaccard index of the retrieval heads (score > the threshold) and of the
  top-K heads (ties in layer-major order) with the reference's; two empty sets agree fully;
- **tokens**: the share of trials whose generated tokens equal the reference's.

The comparison functions are pure (numpy in, numbers out); :func:`compute_precision` runs the
sweeps (:func:`rh_lens.detect.compute_detect`, resumable with ``out_dir``: one sweep store per
dtype under ``sweeps/<dtype>``).  A dtype this machine cannot run detection in (a kernel missing
for it on this device) is refused with a :class:`PrecisionError` naming the dtype and device;
float16 and bfloat16 run on the CPU with torch >= 2.1, slowly.
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from jaxtyping import Float, Int

from rh_lens.detect import DetectConfig, DetectResult, Score, compute_detect
from rh_lens.errors import RhLensError
from rh_lens.heads import THRESHOLD, top_heads
from rh_lens.models import DTYPES
from rh_lens.niah import Haystack, Needle
from rh_lens.results import RunMetadata, save_result, to_jsonable
from rh_lens.stats import jaccard

KIND = "precision"
DEFAULT_DTYPES = ("float32", "bfloat16", "float16")
TOP_K = 10


class PrecisionError(RhLensError):
    """Detection could not run in a requested dtype."""


# --------------------------------------------------------------------------------------------
# Comparisons (pure)


def _steps(ref: np.ndarray, other: np.ndarray, limit: int | None) -> int:
    n = min(len(ref), len(other))
    return n if limit is None else min(n, int(limit))


def position_matches(
    reference: Sequence[np.ndarray], other: Sequence[np.ndarray], *,
    steps: Sequence[int] | None = None,
) -> tuple[int, int]:
    """``(equal, compared)`` entries of two runs' per-trial position tables (each ``[step,
    n_layers, n_heads]``, its own number of steps), over the steps both
    decoded (with ``steps``, at most ``steps[i]`` steps of trial ``i``)."""
    if len(reference) != len(other):
        raise ValueError(f"{len(reference)} reference trials but {len(other)} to compare")
    if steps is not None and len(steps) != len(reference):
        raise ValueError(f"{len(steps)} step limits for {len(reference)} trials")
    equal = compared = 0
    for i, (a, b) in enumerate(zip(reference, other, strict=True)):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape[1:] != b.shape[1:]:
            raise ValueError(f"trial {i}: position tables of shape {a.shape} and {b.shape} are "
                             "not of one model")
        n = _steps(a, b, None if steps is None else steps[i])
        equal += int((a[:n] == b[:n]).sum())
        compared += int(a[:n].size)
    return equal, compared


def position_agreement(reference, other, *, steps: Sequence[int] | None = None) -> float:
    """The share of :func:`position_matches`' entries that are equal (NaN when none)."""
    equal, compared = position_matches(reference, other, steps=steps)
    return equal / compared if compared else float("nan")


def same_input_steps(reference: Int[np.ndarray, " ref_step"],
                     other: Int[np.ndarray, " other_step"]) -> int:
    """The steps two decodings of one prompt took with identical inputs: step ``t`` reads the
    tokens before ``t``, so up to and including the first differing token (all common steps
    when none differs)."""
    a, b = np.asarray(reference), np.asarray(other)
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return n if differ.size == 0 else int(differ[0]) + 1


def token_agreement(reference: Sequence[np.ndarray], other: Sequence[np.ndarray]) -> float:
    """The share of trials whose generated tokens are equal (NaN for no trial)."""
    if len(reference) != len(other):
        raise ValueError(f"{len(reference)} reference trials but {len(other)} to compare")
    if not reference:
        return float("nan")
    return float(np.mean([np.array_equal(a, b) for a, b in zip(reference, other, strict=True)]))


def score_difference(reference: Float[np.ndarray, "n_layers n_heads"],
                     other: Float[np.ndarray, "n_layers n_heads"]) -> tuple[float, float]:
    """``(max, mean)`` absolute difference of two score tables (NaN when either has none)."""
    a, b = np.asarray(reference, dtype=np.float64), np.asarray(other, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"score tables of shape {a.shape} and {b.shape} are not of one model")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan"), float("nan")
    diff = np.abs(a - b)
    return float(diff.max()), float(diff.mean())


def _finite_or_none(table: np.ndarray) -> np.ndarray | None:
    table = np.asarray(table, dtype=np.float64)
    return table if np.isfinite(table).all() else None


def retrieval_jaccard(reference, other, *, threshold: float = THRESHOLD) -> float:
    """Jaccard index of the heads scoring above ``threshold`` in two tables (NaN when either
    has no scores)."""
    a, b = _finite_or_none(reference), _finite_or_none(other)
    if a is None or b is None:
        return float("nan")
    above = lambda t: {tuple(h) for h in np.argwhere(t > threshold).tolist()}  # noqa: E731
    return jaccard(above(a), above(b))


def topk_jaccard(reference, other, *, k: int = TOP_K) -> float:
    """Jaccard index of the top-``k`` heads of two tables (``k`` capped at the head count;
    NaN when either has no scores)."""
    a, b = _finite_or_none(reference), _finite_or_none(other)
    if a is None or b is None:
        return float("nan")
    k = min(k, a.size)
    return jaccard(top_heads(a, k), top_heads(b, k))


# --------------------------------------------------------------------------------------------
# One run against the reference


@dataclass(frozen=True)
class PrecisionRow:
    """One dtype's detection against the reference dtype's (NaN: nothing to compare)."""

    dtype: str
    n_trials: int
    n_success: int
    n_retrieval: int | None  # heads above the threshold (None without a scored trial)
    position_agreement: float
    same_input_agreement: float
    compared_steps: int
    max_abs_score_diff: float
    mean_abs_score_diff: float
    retrieval_jaccard: float
    topk_jaccard: float
    token_agreement: float
    seconds: float  # wall time of this dtype's sweep (0 for cells read back from a store)

    def to_json(self) -> dict:
        return to_jsonable(asdict(self), nan_to_none=True, where=f"row {self.dtype}")


def compare_runs(reference: DetectResult, other: DetectResult, *, dtype: str,
                 score: Score = "step", threshold: float = THRESHOLD, k: int = TOP_K,
                 seconds: float = 0.0) -> PrecisionRow:
    """``other`` (run in ``dtype``) against ``reference``, trial by trial over the same cells."""
    keys = [r.cell.key for r in reference.records]
    if keys != [r.cell.key for r in other.records]:
        raise ValueError("the two detection runs do not hold the same cells in the same order")
    ref_pos = [r.positions for r in reference.records]
    oth_pos = [r.positions for r in other.records]
    ref_tok = [r.tokens for r in reference.records]
    oth_tok = [r.tokens for r in other.records]
    same = [same_input_steps(a, b) for a, b in zip(ref_tok, oth_tok, strict=True)]
    a, b = reference.mean_scores(score), other.mean_scores(score)
    max_diff, mean_diff = score_difference(a, b)
    table = _finite_or_none(b)
    return PrecisionRow(
        dtype=dtype, n_trials=len(other.records), n_success=other.n_success,
        n_retrieval=None if table is None else int((table > threshold).sum()),
        position_agreement=position_agreement(ref_pos, oth_pos),
        same_input_agreement=position_agreement(ref_pos, oth_pos, steps=same),
        compared_steps=sum(_steps(x, y, None) for x, y in zip(ref_pos, oth_pos, strict=True)),
        max_abs_score_diff=max_diff, mean_abs_score_diff=mean_diff,
        retrieval_jaccard=retrieval_jaccard(a, b, threshold=threshold),
        topk_jaccard=topk_jaccard(a, b, k=k),
        token_agreement=token_agreement(ref_tok, oth_tok), seconds=float(seconds),
    )


# --------------------------------------------------------------------------------------------
# The sweeps


@dataclass(frozen=True)
class PrecisionResult:
    """Detection in each of ``dtypes`` (the first the reference), compared with the reference;
    ``scores[i]`` is ``dtypes[i]``'s per-head mean score table."""

    config: DetectConfig
    dtypes: tuple[str, ...]
    rows: tuple[PrecisionRow, ...]
    scores: Float[np.ndarray, "dtype n_layers n_heads"]
    score: Score
    threshold: float
    k: int

    @property
    def reference(self) -> str:
        return self.dtypes[0]

    def summary(self) -> dict:
        return {"reference": self.reference, "score": self.score, "threshold": self.threshold,
                "k": self.k, "rows": [r.to_json() for r in self.rows]}

    def save(self, directory: str | Path, *, meta: RunMetadata, config: dict | None = None
             ) -> dict:
        """``result.json`` + ``arrays.npz`` in ``directory``; ``config`` (model, inputs, ...)
        joins the sweep's.  Returns the summary."""
        summary = self.summary()
        save_result(directory, kind=KIND,
                    config={**self.config.to_dict(), "dtypes": list(self.dtypes),
                            **(config or {})},
                    meta=meta, summary=summary,
                    arrays={"scores": self.scores, "dtypes": np.array(self.dtypes)})
        return summary


def check_dtypes(dtypes: Sequence[str]) -> tuple[str, ...]:
    """``dtypes`` as a tuple of :data:`rh_lens.models.DTYPES` names, each once; the first is the
    reference."""
    dtypes = tuple(dtypes)
    if not dtypes:
        raise ValueError("precision needs at least one dtype (the first is the reference)")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise ValueError(f"unknown dtype {unknown[0]!r}; expected names of {sorted(DTYPES)}")
    repeated = sorted({d for d in dtypes if dtypes.count(d) > 1})
    if repeated:
        raise ValueError(f"dtypes repeat {repeated}: give each dtype once")
    return dtypes


def compute_precision(
    load: Callable[[str], object],
    needles: Sequence[Needle],
    haystacks: Sequence[Haystack],
    cfg: DetectConfig,
    *,
    dtypes: Sequence[str] = DEFAULT_DTYPES,
    score: Score = "step",
    threshold: float = THRESHOLD,
    k: int = TOP_K,
    out_dir: str | Path | None = None,
    identity: Callable[[object], dict] | None = None,
    progress: bool = True,
) -> PrecisionResult:
    """Run the sweep ``cfg`` once per dtype (``load(name)`` returns the model in that dtype) and
    compare each run with the first.  With ``out_dir`` each dtype's cells go to
    ``out_dir/sweeps/<dtype>`` (a rerun reads them back); ``identity(model)`` is each store's
    identity (model, inputs, dtype, ...)."""
    dtypes = check_dtypes(dtypes)
    if k < 1:
        raise ValueError(f"top-K needs K >= 1, got {k}")
    runs, seconds = [], []
    for name in dtypes:
        model = None
        try:
            model = load(name)
            got = str(model.cfg.dtype).removeprefix("torch.")
            if got != name:
                raise ValueError(f"the loader gave a {got} model when asked for {name}")
            start = time.perf_counter()
            runs.append(compute_detect(
                model, needles, haystacks, cfg, progress=progress,
                out_dir=None if out_dir is None else Path(out_dir) / "sweeps" / name,
                identity=None if identity is None else identity(model)))
            seconds.append(time.perf_counter() - start)
        except (RuntimeError, NotImplementedError) as err:
            where = "" if model is None else f" on {model.cfg.device}"
            raise PrecisionError(f"detection in {name}{where} failed: {err}") from err
        del model
    rows = tuple(compare_runs(runs[0], run, dtype=name, score=score, threshold=threshold, k=k,
                              seconds=s)
                 for name, run, s in zip(dtypes, runs, seconds, strict=True))
    return PrecisionResult(cfg, dtypes, rows, np.stack([r.mean_scores(score) for r in runs]),
                           score, float(threshold), int(k))
