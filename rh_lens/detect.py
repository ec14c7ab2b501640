"""Retrieval-score detection: a sweep of NIAH trials, scored per head, resumable and shardable.

A sweep is the grid needles x context lengths x depths.  Each cell is one trial (build the
prompt, decode greedily while recording every head's top-1 key, score it) and, when an output
directory is given, one file written atomically (``cells/<id>.json`` + ``.npz``): rerunning
skips finished cells, and ``shard=(i, n)`` takes every n-th cell so that n machines can split a
sweep and :func:`merge_cells` can combine their directories.
"""

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Bool, Float

from rh_lens import scoring
from rh_lens.decode import decode_greedy
from rh_lens.errors import RhLensError
from rh_lens.heads import group_table
from rh_lens.niah import Haystack, Needle, build_trial
from rh_lens.results import read_json, write_json_atomic, write_npz_atomic

CELL_FORMAT = 1


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

    def __post_init__(self):
        if not self.lengths or not self.depths:
            raise ValueError("a sweep needs at least one context length and one depth")
        if any(d < 0 or d > 100 for d in self.depths):
            raise ValueError(f"depths are percentages in [0, 100], got {self.depths}")
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.chunk_size < 1:
            raise ValueError("batch_size, max_new_tokens and chunk_size must be positive")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

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
    """The sweep's cells in a fixed order; shard ``(i, n)`` keeps cells ``i, i+n, i+2n, ...``."""
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: need 0 <= index < count")
    grid = [Cell(n, int(length), float(depth)) for n in range(n_needles)
            for length in cfg.lengths for depth in cfg.depths]
    return grid[index::count]


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

    def to_json(self) -> dict:
        return {
            "cell_format": CELL_FORMAT,
            "cell": dataclasses.asdict(self.cell),
            "n_tokens": self.n_tokens,
            "answer_span": list(self.answer_span),
            "question": self.question,
            "answer": self.answer,
            "generated": self.generated,
            "rouge1_recall": self.rouge1_recall,
            "success": self.success,
        }


def run_trials(
    model, needles: Sequence[Needle], haystacks: Sequence[Haystack], todo: Sequence[Cell],
    cfg: DetectConfig,
) -> list[TrialRecord]:
    """Build, decode and score the given cells; trials of equal token length share a batch."""
    trials = [
        build_trial(
            model, needles[c.needle], haystacks[c.needle], context_length=c.length,
            depth=c.depth, buffer=cfg.buffer, max_new_tokens=cfg.max_new_tokens, chat=cfg.chat,
        )
        for c in todo
    ]
    records: list[TrialRecord | None] = [None] * len(todo)
    by_length: dict[int, list[int]] = {}
    for i, trial in enumerate(trials):
        by_length.setdefault(trial.n_tokens, []).append(i)
    for group in by_length.values():
        for start in range(0, len(group), cfg.batch_size):
            batch = group[start : start + cfg.batch_size]
            prompts = torch.stack([trials[i].tokens for i in batch])
            outs = decode_greedy(model, prompts, max_new_tokens=cfg.max_new_tokens,
                                 chunk_size=cfg.chunk_size)
            for i, out in zip(batch, outs, strict=True):
                records[i] = score_trial(todo[i], trials[i], out)
    return [r for r in records if r is not None]


def score_trial(cell: Cell, trial, out) -> TrialRecord:
    sequence = torch.cat([trial.tokens, torch.from_numpy(out.tokens)])
    emitted = torch.from_numpy(out.tokens)
    positions = torch.from_numpy(out.positions).long()
    copies = scoring.copy_events(positions, emitted, sequence, trial.answer_span)
    recall = scoring.rouge1_recall(trial.needle.answer, out.text)
    return TrialRecord(
        cell=cell,
        n_tokens=trial.n_tokens,
        answer_span=trial.answer_span,
        question=trial.needle.question,
        answer=trial.needle.answer,
        generated=out.text,
        rouge1_recall=recall,
        success=scoring.succeeded(recall),
        step_score=scoring.step_scores(copies, trial.answer_span).numpy(),
        set_score=scoring.set_scores(copies, emitted, sequence, trial.answer_span).numpy(),
        active=scoring.activation(copies).numpy(),
        tokens=out.tokens,
        positions=out.positions,
    )


# --------------------------------------------------------------------------------------------
# Cell files


def cell_paths(directory: Path, cell: Cell) -> tuple[Path, Path]:
    return directory / "cells" / f"{cell.key}.json", directory / "cells" / f"{cell.key}.npz"


def write_cell(directory: Path, record: TrialRecord) -> None:
    """Arrays first, then the JSON that marks the cell done: a crash leaves no half cell."""
    json_path, npz_path = cell_paths(directory, record.cell)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_npz_atomic(
        npz_path, step_score=record.step_score, set_score=record.set_score,
        active=record.active, tokens=record.tokens, positions=record.positions,
    )
    write_json_atomic(json_path, record.to_json())


def read_cell(json_path: Path) -> TrialRecord:
    data = read_json(json_path)
    if data.get("cell_format") != CELL_FORMAT:
        raise RhLensError(f"{json_path}: unknown cell_format {data.get('cell_format')!r}")
    npz_path = json_path.with_suffix(".npz")
    try:
        with np.load(npz_path, allow_pickle=False) as arrays:
            arr = {k: arrays[k] for k in arrays.files}
    except (OSError, ValueError) as err:
        raise RhLensError(f"{npz_path}: cannot read cell arrays ({err})") from err
    return TrialRecord(
        cell=Cell(**data["cell"]), n_tokens=data["n_tokens"],
        answer_span=tuple(data["answer_span"]), question=data["question"],
        answer=data["answer"], generated=data["generated"],
        rouge1_recall=data["rouge1_recall"], success=data["success"],
        step_score=arr["step_score"], set_score=arr["set_score"], active=arr["active"],
        tokens=arr["tokens"], positions=arr["positions"],
    )


def finished_cells(directory: Path) -> dict[str, Path]:
    """Cells already done in ``directory`` (a JSON file is written last, atomically)."""
    folder = directory / "cells"
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.json")) if p.with_suffix(".npz").is_file()}


def check_sweep_config(directory: Path, identity: dict, *, name: str = "sweep.json") -> None:
    """Refuse to mix cells of different sweeps in one directory (``identity`` kept in ``name``)."""
    path = directory / name
    if path.is_file():
        existing = read_json(path)
        if existing != json.loads(json.dumps(identity)):
            diff = sorted(k for k in set(existing) | set(identity)
                          if existing.get(k) != json.loads(json.dumps(identity)).get(k))
            raise RhLensError(
                f"{directory} holds cells of a different sweep (differs in: {', '.join(diff)}); "
                "use a new --out directory"
            )
    else:
        directory.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, identity)


# --------------------------------------------------------------------------------------------
# The sweep and its aggregates


@dataclass(frozen=True)
class DetectResult:
    """All trials of a sweep (in cell order) and their per-head aggregates.

    Aggregates are over *successful* trials only (ROUGE-1 recall > 0.5), as in the reference.
    """

    config: DetectConfig
    records: tuple[TrialRecord, ...]
    n_layers: int
    n_heads: int
    n_kv_heads: int

    @property
    def success(self) -> Bool[np.ndarray, " trial"]:
        return np.array([r.success for r in self.records], dtype=bool)

    @property
    def n_success(self) -> int:
        return int(self.success.sum())

    def trial_scores(self, kind: str = "step") -> Float[np.ndarray, "trial n_layers n_heads"]:
        """Per successful trial: ``"step"`` or ``"set"`` scores, or ``"active"`` (0/1)."""
        if kind not in ("step", "set", "active"):
            raise ValueError(f"kind must be 'step', 'set' or 'active', got {kind!r}")
        rows = [getattr(r, "active" if kind == "active" else f"{kind}_score").astype(np.float64)
                for r in self.records if r.success]
        if not rows:
            return np.zeros((0, self.n_layers, self.n_heads))
        return np.stack(rows)

    def mean_scores(self, kind: str = "step") -> Float[np.ndarray, "n_layers n_heads"]:
        """A head's retrieval score (mean over successful trials; NaN when none succeeded)."""
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
) -> DetectResult:
    """Run (or resume) a sweep.  With ``out_dir`` every finished cell is written at once and
    cells already there are read instead of rerun; ``identity`` (model spec, needle source, ...)
    is stored with the config so a directory never mixes two sweeps."""
    from tqdm.auto import tqdm

    if len(needles) != len(haystacks):
        raise ValueError(f"{len(needles)} needles but {len(haystacks)} haystacks")
    todo = cells(len(needles), cfg, shard)
    directory = Path(out_dir) if out_dir is not None else None
    done: dict[str, Path] = {}
    if directory is not None:
        check_sweep_config(directory, {"config": cfg.to_dict(), **(identity or {})})
        done = finished_cells(directory)
    by_key: dict[str, TrialRecord] = {c.key: read_cell(done[c.key]) for c in todo if c.key in done}
    pending = [c for c in todo if c.key not in by_key]
    step = max(cfg.batch_size, 1) * 4
    with tqdm(total=len(todo), initial=len(by_key), desc="NIAH trials",
              disable=not progress) as bar:
        for start in range(0, len(pending), step):
            for record in run_trials(model, needles, haystacks, pending[start : start + step],
                                     cfg):
                if directory is not None:
                    write_cell(directory, record)
                by_key[record.cell.key] = record
                bar.update(1)
    cfg_model = model.cfg
    return DetectResult(
        cfg, tuple(by_key[c.key] for c in todo), cfg_model.n_layers, cfg_model.n_heads,
        cfg_model.n_key_value_heads or cfg_model.n_heads,
    )


def merge_cells(directories: Sequence[str | Path]) -> tuple[dict, list[TrialRecord]]:
    """Combine the cells of shard directories of one sweep (their ``sweep.json`` must agree)."""
    identity = None
    records: dict[str, TrialRecord] = {}
    for directory in map(Path, directories):
        path = directory / "sweep.json"
        if not path.is_file():
            raise RhLensError(f"{directory} is not a detection output (no sweep.json)")
        this = read_json(path)
        if identity is not None and this != identity:
            raise RhLensError(f"{directory} belongs to a different sweep than {directories[0]}")
        identity = this
        for key, cell_path in finished_cells(directory).items():
            records.setdefault(key, read_cell(cell_path))
    if identity is None:
        raise RhLensError("nothing to merge")
    return identity, [records[k] for k in sorted(records)]
