"""What decides an ablation sweep's numbers besides the head sets."""

import dataclasses
from dataclasses import dataclass

from rh_lens.detect import DetectConfig
from rh_lens.interventions import MODES, WHERE, Mode, Where


@dataclass(frozen=True)
class AblationConfig:
    """Everything that decides an ablation sweep's numbers besides the head sets."""

    sweep: DetectConfig
    mode: Mode = "uniform"
    positions: Where = "decode"
    n_reference: int = 8
    reference_length: int = 128

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.positions not in WHERE:
            raise ValueError(f"positions must be 'decode' or 'all', got {self.positions!r}")
        if self.n_reference < 1 or self.reference_length < 2:
            raise ValueError("n_reference must be >= 1 and reference_length >= 2")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "sweep": self.sweep.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "AblationConfig":
        return cls(**{**data, "sweep": DetectConfig.from_dict(data["sweep"])})
