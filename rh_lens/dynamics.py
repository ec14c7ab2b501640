"""When retrieval heads form: detection, NIAH accuracy and induction across a checkpoint series.

For every checkpoint of a :class:`~rh_lens.series.CheckpointSeries` the detection sweep runs in
its own sub-store (``root/conditions/step-SSSSSS``, a detection directory that
:meth:`~rh_lens.detect.DetectResult.load` reads back), the NIAH accuracy is its share of
successful trials, and each head's induction score comes from :mod:`rh_lens.induction`.  Once a
checkpoint is done, one record in the series' store (``root/cells/step-SSSSSS``) holds its
per-head tables: a rerun skips finished checkpoints without loading them, resumes an unfinished
one cell by cell, and ``shard=(i, n)`` takes every n-th checkpoint (:func:`rh_lens.store.shard`).

:class:`DynamicsResult` stacks the records into trajectories (``[checkpoint, n_layers,
n_heads]``) and finds each head's first crossing of a threshold.
"""

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from jaxtyping import Float

from rh_lens.detect import DetectConfig, compute_detect
from rh_lens.heads import THRESHOLD
from rh_lens.induction import InductionConfig, induction_scores
from rh_lens.results import RunMetadata, save_result
from rh_lens.series import Checkpoint, CheckpointSeries
from rh_lens.store import StoreError, SweepStore, merge, read_record, shard

Score = Literal["step", "set"]
INDUCTION_THRESHOLD = 0.4  # an induction head's stripe attention (a uniform head gets ~1/pos)
_TABLES = ("retrieval_step", "retrieval_set", "induction")


@dataclass(frozen=True)
class DynamicsConfig:
    """What decides a series' numbers: the detection sweep and the induction tokens."""

    detect: DetectConfig
    induction: InductionConfig = InductionConfig()

    def to_dict(self) -> dict:
        return {"detect": self.detect.to_dict(), "induction": self.induction.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "DynamicsConfig":
        return cls(DetectConfig.from_dict(data["detect"]), InductionConfig(**data["induction"]))


def checkpoint_dir(root: str | Path, checkpoint: Checkpoint) -> Path:
    """The detection sub-store of ``checkpoint`` in the series store ``root``."""
    return Path(root) / "conditions" / checkpoint.label


def _shape(model) -> dict:
    from rh_lens.engine import model_facts

    facts = model_facts(model)
    return {"n_layers": facts.n_layers, "n_heads": facts.n_heads, "n_kv_heads": facts.n_kv_heads}


def declared_shape(checkpoint: Checkpoint) -> dict | None:
    """The head shape a local checkpoint's ``config.json`` declares (None where it is not a
    local directory or says nothing readable), read without loading the weights."""
    path = Path(checkpoint.spec)
    if checkpoint.revision is not None or not (path / "config.json").is_file():
        return None
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    cfg = config.get("hooked_config", config)
    layers = cfg.get("n_layers", cfg.get("num_hidden_layers", cfg.get("n_layer")))
    heads = cfg.get("n_heads", cfg.get("num_attention_heads", cfg.get("n_head")))
    kv = cfg.get("n_key_value_heads", cfg.get("num_key_value_heads")) or heads
    if not all(isinstance(v, int) for v in (layers, heads, kv)):
        return None
    return {"n_layers": layers, "n_heads": heads, "n_kv_heads": kv}


def _refuse_other_shape(checkpoint: Checkpoint, shape: dict, first: tuple[str, dict]) -> None:
    if shape != first[1]:
        def text(s):
            return f"{s['n_layers']} layers x {s['n_heads']} heads ({s['n_kv_heads']} kv)"

        raise ValueError(f"checkpoint {checkpoint.label} ({checkpoint.spec}) has {text(shape)}, "
                         f"but {first[0]} has {text(first[1])}: a series holds the checkpoints "
                         "of one model")


def compute_dynamics(
    series: CheckpointSeries,
    needles: Sequence,
    haystacks: Sequence,
    cfg: DynamicsConfig,
    *,
    out_dir: str | Path,
    inputs: dict | None = None,
    load: Callable[[Checkpoint], object] | None = None,
    shard_of: tuple[int, int] = (0, 1),
    progress: bool = True,
    recompute_bad_cells: bool = False,
) -> "DynamicsResult":
    """Run (or resume) the series in ``out_dir``; returns the finished checkpoints' result.

    ``load`` turns a checkpoint into a model (default ``checkpoint.load()``); ``inputs``
    describes where the needles came from (stored in the identities).  Checkpoints of another
    head shape than the first are refused before anything of theirs is computed."""
    from tqdm.auto import tqdm

    load = load or (lambda checkpoint: checkpoint.load())
    needle_dicts = [vars(n) for n in needles]
    store = SweepStore.open(out_dir, {"kind": "dynamics", "config": cfg.to_dict(),
                                      "inputs": inputs or {}, "needles": needle_dicts},
                            what="checkpoint series (other settings or inputs?)")
    done = _finished(store, series)
    first = next(((c.label, done[c.label].fields["shape"]) for c in series.checkpoints
                  if c.label in done), None)
    declared = [(c, declared_shape(c)) for c in series.checkpoints]
    known = [(c, s) for c, s in declared if s is not None]
    if known:
        first = first or (known[0][0].label, known[0][1])
        for checkpoint, shape in known:
            _refuse_other_shape(checkpoint, shape, first)
    todo = [c for c in shard(series.checkpoints, *shard_of) if c.label not in done]
    for checkpoint in tqdm(todo, desc="checkpoints", disable=not progress or not todo):
        model = load(checkpoint)
        shape = _shape(model)
        first = first or (checkpoint.label, shape)
        _refuse_other_shape(checkpoint, shape, first)
        _run_checkpoint(store, model, checkpoint, needles, haystacks, cfg, shape,
                        inputs=inputs or {}, progress=progress,
                        recompute_bad_cells=recompute_bad_cells)
        del model
    return DynamicsResult.from_stores([out_dir], series=series, allow_partial=True)


def _finished(store: SweepStore, series: CheckpointSeries) -> dict:
    """The series' finished checkpoints in ``store`` (label -> record); a record of another
    checkpoint under the same label is refused."""
    out = {}
    found = store.finished()
    for checkpoint in series.checkpoints:
        if checkpoint.label not in found:
            continue
        record = store.read(checkpoint.label)
        stored = {k: record.fields.get(k) for k in ("step", "spec", "revision")}
        if stored != checkpoint.to_dict():
            raise StoreError(f"{store.root} holds {checkpoint.label} of another series ({stored}, "
                             f"not {checkpoint.to_dict()}); use a new output directory")
        out[checkpoint.label] = record
    return out


def _run_checkpoint(store, model, checkpoint, needles, haystacks, cfg, shape, *, inputs,
                    progress, recompute_bad_cells) -> None:
    from rh_lens.engine import weights_fingerprint

    identity = {"model": checkpoint.spec, "revision": checkpoint.revision,
                "step": checkpoint.step, "inputs": inputs,
                "needles": [vars(n) for n in needles], "dtype": str(model.cfg.dtype),
                "weights": weights_fingerprint(model)}
    result = compute_detect(model, needles, haystacks, cfg.detect,
                            out_dir=checkpoint_dir(store.root, checkpoint), identity=identity,
                            progress=progress, recompute_bad_cells=recompute_bad_cells)
    induction = induction_scores(model, cfg.induction)
    fields = {**checkpoint.to_dict(), "shape": shape, "weights": identity["weights"],
              "n_trials": len(result.records), "n_success": result.n_success,
              "mean_rouge1_recall": float(np.mean([r.rouge1_recall for r in result.records]))}
    store.write(checkpoint.label, fields, {
        "retrieval_step": result.mean_scores("step"), "retrieval_set": result.mean_scores("set"),
        "induction": induction})


def first_crossing(steps: Sequence[int], table: Float[np.ndarray, "checkpoint n_layers n_heads"],
                   threshold: float) -> Float[np.ndarray, "n_layers n_heads"]:
    """Per head, the step of the first checkpoint whose value exceeds ``threshold`` (NaN when
    none does; a NaN value never exceeds)."""
    above = np.nan_to_num(np.asarray(table, dtype=np.float64), nan=-np.inf) > threshold
    out = np.full(above.shape[1:], np.nan)
    hit = above.any(axis=0)
    out[hit] = np.asarray(steps, dtype=np.float64)[above.argmax(axis=0)[hit]]
    return out


@dataclass(frozen=True)
class DynamicsResult:
    """Per-checkpoint tables of a series, in step order.  Retrieval scores are NaN at a
    checkpoint where no NIAH trial succeeded."""

    steps: tuple[int, ...]
    checkpoints: tuple[Checkpoint, ...]
    retrieval_step: Float[np.ndarray, "checkpoint n_layers n_heads"]
    retrieval_set: Float[np.ndarray, "checkpoint n_layers n_heads"]
    induction: Float[np.ndarray, "checkpoint n_layers n_heads"]
    n_trials: np.ndarray
    n_success: np.ndarray
    mean_recall: np.ndarray
    config: DynamicsConfig
    missing: tuple[str, ...] = ()  # checkpoints of the series not finished (a partial result)

    def retrieval(self, score: Score = "step") -> Float[np.ndarray, "checkpoint n_layers n_heads"]:
        if score not in ("step", "set"):
            raise ValueError(f"score must be 'step' or 'set', got {score!r}")
        return self.retrieval_step if score == "step" else self.retrieval_set

    @property
    def niah_accuracy(self) -> np.ndarray:
        """Share of each checkpoint's NIAH trials that succeeded (ROUGE-1 recall > 0.5)."""
        return self.n_success / np.maximum(self.n_trials, 1)

    def n_retrieval_heads(self, score: Score = "step", threshold: float = THRESHOLD
                          ) -> np.ndarray:
        """Heads scoring above ``threshold`` at each checkpoint."""
        return (np.nan_to_num(self.retrieval(score), nan=-np.inf) > threshold).sum(axis=(1, 2))

    def final_retrieval_heads(self, score: Score = "step", threshold: float = THRESHOLD
                              ) -> list[tuple[int, int]]:
        """The heads above ``threshold`` at the last checkpoint, highest first."""
        last = np.nan_to_num(self.retrieval(score)[-1], nan=-np.inf)
        heads = [(int(lay), int(h)) for lay, h in zip(*np.nonzero(last > threshold), strict=True)]
        return sorted(heads, key=lambda lh: -last[lh])

    def onsets(self, score: Score = "step", threshold: float = THRESHOLD,
               induction_threshold: float = INDUCTION_THRESHOLD) -> list[dict]:
        """For each final retrieval head: the step it first crosses ``threshold``, the step its
        induction score first crosses ``induction_threshold`` (None: never), its final
        scores."""
        retrieval = first_crossing(self.steps, self.retrieval(score), threshold)
        induction = first_crossing(self.steps, self.induction, induction_threshold)

        def step(value):
            return None if np.isnan(value) else int(value)

        return [{"head": [lay, h], "retrieval_onset": step(retrieval[lay, h]),
                 "induction_onset": step(induction[lay, h]),
                 "final_retrieval": float(self.retrieval(score)[-1, lay, h]),
                 "final_induction": float(self.induction[-1, lay, h])}
                for lay, h in self.final_retrieval_heads(score, threshold)]

    def arrays(self) -> dict[str, np.ndarray]:
        return {"steps": np.asarray(self.steps), "retrieval_step": self.retrieval_step,
                "retrieval_set": self.retrieval_set, "induction": self.induction,
                "n_trials": self.n_trials, "n_success": self.n_success,
                "mean_recall": self.mean_recall, "niah_accuracy": self.niah_accuracy}

    def summary(self, score: Score = "step", threshold: float = THRESHOLD,
                induction_threshold: float = INDUCTION_THRESHOLD) -> dict:
        summary = {
            "score": score, "threshold": threshold, "induction_threshold": induction_threshold,
            "steps": list(self.steps),
            "niah_accuracy": [float(a) for a in self.niah_accuracy],
            "n_retrieval_heads": [int(n) for n in self.n_retrieval_heads(score, threshold)],
            "onsets": self.onsets(score, threshold, induction_threshold),
        }
        if self.missing:
            summary["partial"] = {"missing_checkpoints": list(self.missing)}
        return summary

    def save(self, directory: str | Path, *, meta: RunMetadata, score: Score = "step",
             threshold: float = THRESHOLD, induction_threshold: float = INDUCTION_THRESHOLD
             ) -> dict:
        """``result.json`` + ``arrays.npz`` (kind ``dynamics``) in ``directory``; returns the
        summary."""
        summary = self.summary(score, threshold, induction_threshold)
        config = {**self.config.to_dict(),
                  "checkpoints": [c.to_dict() for c in self.checkpoints]}
        save_result(directory, kind="dynamics", config=config, meta=meta, summary=summary,
                    arrays=self.arrays())
        return summary

    @classmethod
    def from_stores(cls, roots: Sequence[str | Path], *, series: CheckpointSeries | None = None,
                    allow_partial: bool = False) -> "DynamicsResult":
        """The finished checkpoints in the series stores ``roots`` (shards of one series, or
        one store), those of ``series`` where given; a checkpoint of ``series`` missing from
        every store is refused, naming it, unless ``allow_partial``."""
        identity, found = merge(roots)
        if identity.get("kind") != "dynamics":
            raise StoreError(f"{roots[0]}: not a checkpoint series store")
        records = {key: read_record(path) for key, path in found.items()}
        wanted = (list(series.checkpoints) if series is not None else
                  [Checkpoint(r.fields["step"], r.fields["spec"], r.fields["revision"])
                   for r in records.values()])
        missing = [c.label for c in wanted if c.label not in records]
        if missing and not allow_partial:
            raise StoreError(f"the stores hold {len(wanted) - len(missing)} of the series' "
                             f"{len(wanted)} checkpoints; missing: {', '.join(missing)}")
        kept = sorted((c for c in wanted if c.label in records), key=lambda c: c.step)
        for c in kept:
            stored = {k: records[c.label].fields.get(k) for k in ("step", "spec", "revision")}
            if stored != c.to_dict():
                raise StoreError(f"{c.label} in the stores is another checkpoint ({stored})")
        cfg = DynamicsConfig.from_dict(identity["config"])
        if not kept:
            tables = {name: np.zeros((0, 0, 0)) for name in _TABLES}
        else:
            shapes = {json.dumps(records[c.label].fields["shape"]) for c in kept}
            if len(shapes) > 1:
                raise StoreError(f"the stores hold checkpoints of several shapes: {shapes}")
            tables = {name: np.stack([records[c.label].arrays[name] for c in kept])
                      for name in _TABLES}

        def column(name, dtype):
            return np.array([records[c.label].fields[name] for c in kept], dtype=dtype)

        return cls(tuple(c.step for c in kept), tuple(kept), tables["retrieval_step"],
                   tables["retrieval_set"], tables["induction"], column("n_trials", np.int64),
                   column("n_success", np.int64), column("mean_rouge1_recall", np.float64),
                   cfg, tuple(missing))


__all__ = ["DynamicsConfig", "DynamicsResult", "INDUCTION_THRESHOLD", "checkpoint_dir",
           "compute_dynamics", "declared_shape", "first_crossing"]
