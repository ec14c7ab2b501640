"""Path patching of head sets as wholes, for several sets at once: the seeded draws of a
``random:K`` or ``matched:K`` spec (:func:`rh_lens.heads.select_heads` with ``n_draws``).

For each draw ``d`` the senders of ``d`` are patched jointly along the paths that start with an
edge into the receivers of ``d`` (:func:`~rh_lens.patching.path_patch`), one logit difference
per pair.  The set's effect (on the scale of :mod:`rh_lens.patching`: 0 none, +1 full recovery
when denoising) comes with a bootstrap interval that resamples draws and pairs
(:func:`rh_lens.stats.bootstrap_ci`; the clean - corrupted gap, the unit, is held fixed), so a
top-K set's effect can be set against the spread of its random or layer-matched controls.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from jaxtyping import Float

from rh_lens import stats
from rh_lens.heads import HeadLike, label
from rh_lens.models import Model
from rh_lens.patching.pairs import PatchPair
from rh_lens.patching.paths import Receiver, _path_patch
from rh_lens.patching.runs import PatchConfig, _Normalised


@dataclass(frozen=True)
class SetPatchingResult(_Normalised):
    """``logit_diff[draw, pair]``: the metric with ``senders[draw]`` patched jointly along their
    edges into ``receivers[draw]``."""

    senders: tuple[tuple[HeadLike, ...], ...]
    receivers: tuple[tuple[Receiver, ...], ...]
    logit_diff: Float[np.ndarray, "n_draws n_pairs"]
    clean_logit_diff: Float[np.ndarray, " n_pairs"]
    corrupted_logit_diff: Float[np.ndarray, " n_pairs"]
    config: PatchConfig

    @property
    def n_draws(self) -> int:
        return len(self.senders)

    @property
    def effect(self) -> Float[np.ndarray, " n_draws"]:
        """Each draw's effect (NaN when the clean and corrupted runs do not differ)."""
        return self._effect(self.logit_diff.T)

    def interval(self, *, level: float = stats.LEVEL, n_boot: int = stats.N_BOOT,
                 seed: int = 0) -> stats.Interval:
        """The mean effect over draws and its bootstrap interval over draws and pairs (NaN
        when the clean and corrupted runs do not differ)."""
        gap = self.gap
        if not np.isfinite(gap) or abs(gap) < 1e-9:
            nan = float("nan")
            return stats.Interval(nan, nan, nan, level)
        raw = stats.bootstrap_ci(self.logit_diff, level=level, n_boot=n_boot, seed=seed)
        base = float(self.base_logit_diff.mean())
        low, high = sorted(((raw.low - base) / gap, (raw.high - base) / gap))
        return stats.Interval((raw.mean - base) / gap, low, high, level)

    def to_json(self, *, level: float = stats.LEVEL, seed: int = 0) -> dict:
        ci = self.interval(level=level, seed=seed)
        return {
            "n_draws": self.n_draws, "n_pairs": int(self.logit_diff.shape[1]),
            "effect": {"mean": ci.mean, "low": ci.low, "high": ci.high, "level": ci.level,
                       "interval": "bootstrap over draws and pairs"},
            "draws": [{"senders": [label(h) for h in s], "receivers": [r.label for r in r_],
                       "effect": float(e)}
                      for s, r_, e in zip(self.senders, self.receivers, self.effect,
                                          strict=True)],
        }


def compute_set_patching(model: Model, pairs: Sequence[PatchPair],
                         senders: Sequence[Sequence[HeadLike]],
                         receivers: Sequence[Sequence[Receiver]],
                         cfg: PatchConfig | None = None) -> SetPatchingResult:
    """Path patching of each sender set (a draw) jointly into its receivers: ``receivers`` has
    one set per sender set, or one set for all of them."""
    cfg = cfg or PatchConfig()
    if not senders:
        raise ValueError("no sender sets")
    if len(receivers) == 1:
        receivers = list(receivers) * len(senders)
    if len(receivers) != len(senders):
        raise ValueError(f"{len(senders)} sender sets but {len(receivers)} receiver sets (give "
                         "one receiver set, or one per sender set)")
    rows, clean, corrupted = [], None, None
    for heads, into in zip(senders, receivers, strict=True):
        if not heads:
            raise ValueError("a sender set is empty")
        out, clean, corrupted = _path_patch(model, pairs, heads, into, cfg)
        rows.append(out)
    return SetPatchingResult(tuple(tuple(s) for s in senders), tuple(tuple(r) for r in receivers),
                             np.stack(rows), clean, corrupted, cfg)
