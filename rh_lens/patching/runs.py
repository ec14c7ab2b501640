"""What every patching run shares: the configuration, batches of pairs, the metric (the logit
difference of the clean vs corrupted answer at the last position) and its normalisations."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from rh_lens import hooks
from rh_lens.hooks import HookList
from rh_lens.patching.pairs import PatchPair

Direction = Literal["denoise", "noise"]
PositionSpec = Literal["answer", "needle", "all"] | tuple[int, ...]


@dataclass(frozen=True)
class PatchConfig:
    """``positions``: where the patched heads' outputs are replaced: ``"answer"`` (the last
    position, which predicts the answer), ``"needle"`` (the answer inside the context),
    ``"all"``, or explicit positions (negative counts from the end)."""

    positions: PositionSpec = "answer"
    direction: Direction = "denoise"
    batch_size: int = 8

    def __post_init__(self):
        if self.direction not in ("denoise", "noise"):
            raise ValueError(f"direction must be 'denoise' or 'noise', got {self.direction!r}")
        if isinstance(self.positions, str) and self.positions not in ("answer", "needle", "all"):
            raise ValueError(f"positions must be 'answer', 'needle', 'all' or a tuple of ints, "
                             f"got {self.positions!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def to_dict(self) -> dict:
        pos = self.positions if isinstance(self.positions, str) else list(self.positions)
        return {"positions": pos, "direction": self.direction, "batch_size": self.batch_size}



@dataclass(frozen=True)
class _Batch:
    index: list[int]
    base: Int[Tensor, "batch pos"]
    source: Int[Tensor, "batch pos"]
    clean_answer: Int[Tensor, " batch"]
    corrupted_answer: Int[Tensor, " batch"]
    positions: list[int]
    denoise: bool


def _positions(pair: PatchPair, spec: PositionSpec) -> list[int]:
    n = pair.n_tokens
    if spec == "answer":
        return [n - 1]
    if spec == "all":
        return list(range(n))
    if spec == "needle":
        if pair.needle_span is None:
            raise ValueError("positions='needle' needs pairs with a needle_span")
        return list(range(*pair.needle_span))
    bad = [p for p in spec if not -n <= p < n]
    if bad or not spec:
        raise ValueError(f"positions {list(spec)} out of range for a prompt of {n} tokens")
    return sorted({p % n for p in spec})


def _batches(model, pairs: Sequence[PatchPair], cfg: PatchConfig) -> list[_Batch]:
    """Pairs of equal length and patch positions, stacked ``cfg.batch_size`` at a time."""
    if not pairs:
        raise ValueError("no pairs to patch")
    groups: dict[tuple, list[int]] = {}
    for i, pair in enumerate(pairs):
        groups.setdefault((pair.n_tokens, tuple(_positions(pair, cfg.positions))), []).append(i)
    out, device, denoise = [], model.cfg.device, cfg.direction == "denoise"
    for (_, positions), members in groups.items():
        for at in range(0, len(members), cfg.batch_size):
            idx = members[at:at + cfg.batch_size]
            clean = torch.stack([pairs[i].clean for i in idx]).to(device)
            corrupted = torch.stack([pairs[i].corrupted for i in idx]).to(device)
            base, source = (corrupted, clean) if denoise else (clean, corrupted)
            answers = [torch.tensor([getattr(pairs[i], f) for i in idx], device=device)
                       for f in ("clean_answer", "corrupted_answer")]
            out.append(_Batch(idx, base, source, *answers, list(positions), denoise))
    return out


def _logit_diff(logits: Float[Tensor, "batch pos d_vocab"], batch: _Batch) -> np.ndarray:
    last = logits[:, -1].double()
    diff = (last.gather(-1, batch.clean_answer[:, None])
            - last.gather(-1, batch.corrupted_answer[:, None]))[:, 0]
    return diff.cpu().numpy()


def _run(model, tokens: Tensor, fwd: HookList) -> Tensor:
    with model.hooks(fwd_hooks=fwd):
        return model(tokens)


def _start(model, batch: _Batch, clean: np.ndarray, corrupted: np.ndarray,
           layers: Sequence[int]) -> dict[int, Tensor]:
    """Runs the source and base prompts: records the clean/corrupted metric of the batch's pairs
    and returns the source run's ``hook_z`` of ``layers``."""
    names = [hooks.z(lay) for lay in layers]
    logits, cache = model.run_with_cache(batch.source, names_filter=names)
    source, base = _logit_diff(logits, batch), _logit_diff(model(batch.base), batch)
    clean[batch.index], corrupted[batch.index] = (source, base) if batch.denoise else (base, source)
    return {layer: cache[hooks.z(layer)] for layer in layers}


def _scale(values: np.ndarray, clean: np.ndarray, corrupted: np.ndarray,
           zero: np.ndarray) -> np.ndarray:
    """``(mean(values) - mean(zero)) / (mean(clean) - mean(corrupted))``, means over pairs (axis
    0); NaN when the clean and corrupted runs do not differ."""
    gap = float(clean.mean() - corrupted.mean())
    if not np.isfinite(gap) or abs(gap) < 1e-9:
        return np.full(values.shape[1:], np.nan)
    return (values.mean(axis=0) - zero.mean()) / gap


class _Normalised:
    """Normalisations shared by the result classes (which hold the fields named here)."""

    clean_logit_diff: np.ndarray
    corrupted_logit_diff: np.ndarray
    config: PatchConfig

    @property
    def base_logit_diff(self) -> Float[np.ndarray, " n_pairs"]:
        """The unpatched run's metric: corrupted when denoising, clean when noising."""
        return self.corrupted_logit_diff if self.config.direction == "denoise" else (
            self.clean_logit_diff)

    @property
    def gap(self) -> float:
        """Mean clean minus mean corrupted logit difference (the unit of the normalisations)."""
        return float(self.clean_logit_diff.mean() - self.corrupted_logit_diff.mean())

    def _normalized(self, values: np.ndarray) -> np.ndarray:
        return _scale(values, self.clean_logit_diff, self.corrupted_logit_diff,
                      self.corrupted_logit_diff)

    def _effect(self, values: np.ndarray) -> np.ndarray:
        return _scale(values, self.clean_logit_diff, self.corrupted_logit_diff,
                      self.base_logit_diff)
