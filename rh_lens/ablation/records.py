"""One record per (condition, cell) of an ablation sweep, and its files."""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from jaxtyping import Float, Int

from rh_lens.detect import Cell
from rh_lens.errors import RhLensError
from rh_lens.results import read_json, write_json_atomic, write_npz_atomic

RECORD_FORMAT = 1


@dataclass(frozen=True)
class AblationRecord:
    """One trial under one condition.  ``watch_positions[t, i]``: watched head ``i``'s top-1 key
    at step ``t``; ``step_score``: every head's retrieval (step) score in this trial."""

    condition: str
    cell: Cell
    n_tokens: int
    generated: str
    rouge1_recall: float
    success: bool
    error: str
    tokens: Int[np.ndarray, " step"]
    step_score: Float[np.ndarray, "n_layers n_heads"]
    watch_positions: Int[np.ndarray, "step n_watch"]
    watch_places: Int[np.ndarray, "n_watch n_places"]
    donor: str | None = None

    def to_json(self) -> dict:
        return {"record_format": RECORD_FORMAT, "condition": self.condition,
                "cell": dataclasses.asdict(self.cell), "n_tokens": self.n_tokens,
                "generated": self.generated, "rouge1_recall": self.rouge1_recall,
                "success": self.success, "error": self.error, "donor": self.donor}


def _record_paths(directory: Path, key: str) -> tuple[Path, Path]:
    return directory / "cells" / f"{key}.json", directory / "cells" / f"{key}.npz"


def write_record(directory: Path, record: AblationRecord) -> None:
    """Arrays first, then the JSON that marks the cell done (both atomic)."""
    json_path, npz_path = _record_paths(directory, record.cell.key)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_npz_atomic(npz_path, tokens=record.tokens, step_score=record.step_score,
                     watch_positions=record.watch_positions, watch_places=record.watch_places)
    write_json_atomic(json_path, record.to_json())


def read_record(json_path: Path) -> AblationRecord:
    data = read_json(json_path)
    if not isinstance(data, dict) or data.get("record_format") != RECORD_FORMAT:
        raise RhLensError(f"{json_path}: not an ablation record of format {RECORD_FORMAT}")
    try:
        with np.load(json_path.with_suffix(".npz"), allow_pickle=False) as npz:
            arr = {k: npz[k] for k in npz.files}
        return AblationRecord(
            data["condition"], Cell(**data["cell"]), data["n_tokens"], data["generated"],
            data["rouge1_recall"], data["success"], data["error"], arr["tokens"],
            arr["step_score"], arr["watch_positions"], arr["watch_places"], data["donor"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise RhLensError(f"{json_path}: cannot read the ablation record ({err})") from err


