"""One record per (condition, cell) of an ablation sweep, as the sweep store keeps it."""

import dataclasses
from dataclasses import dataclass

import numpy as np
from jaxtyping import Float, Int

from rh_lens.detect import Cell
from rh_lens.store import Record, StoreError


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
        return {"condition": self.condition,
                "cell": dataclasses.asdict(self.cell), "n_tokens": self.n_tokens,
                "generated": self.generated, "rouge1_recall": self.rouge1_recall,
                "success": self.success, "error": self.error, "donor": self.donor}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"tokens": self.tokens, "step_score": self.step_score,
                "watch_positions": self.watch_positions, "watch_places": self.watch_places}

    @classmethod
    def from_record(cls, record: Record) -> "AblationRecord":
        data, arr = record.fields, record.arrays
        try:
            return cls(
                data["condition"], Cell(**data["cell"]), data["n_tokens"], data["generated"],
                data["rouge1_recall"], data["success"], data["error"], arr["tokens"],
                arr["step_score"], arr["watch_positions"], arr["watch_places"], data["donor"])
        except (KeyError, TypeError) as err:
            raise StoreError(f"cell {record.key}: not an ablation record (missing or bad "
                             f"{err})") from None
