"""Top-K masking against a control (``random-K``, ``matched-K`` or ``bottom-K``), per K, with
intervals and tests (:func:`compare_to_control`; the statistics: :mod:`rh_lens.stats`).

Every condition of a sweep runs on the same cells, so trial ``i`` of ``top-K`` and trial ``i``
of each control draw are paired.  Per K:

- ``top``: the mean over trials and its bootstrap interval over trials;
- ``control``: the mean over draws and trials, its interval resampling draws and trials;
- ``diff`` = control - top (what masking the top heads costs beyond the control), its interval
  resampling draws and trials of the paired per-trial differences;
- ``p``: the paired permutation test (two-sided) of the per-trial top values against the
  per-trial control values (averaged over draws); ``q``: Benjamini-Hochberg over the K of the
  curve; ``significant``: ``q <= alpha``.
"""

from dataclasses import dataclass
from typing import Literal

import numpy as np
from jaxtyping import Bool, Float, Int

from rh_lens import stats

CONTROLS = ("random", "matched", "bottom")
ALPHA = 0.05


@dataclass(frozen=True)
class ControlComparison:
    """``top-K`` against one control kind for every K the sweep ran both for."""

    metric: str
    control: str
    ks: Int[np.ndarray, " n_k"]
    n_trials: int
    n_draws: Int[np.ndarray, " n_k"]
    top: Float[np.ndarray, "n_k 3"]  # mean, low, high
    control_values: Float[np.ndarray, "n_k 3"]
    diff: Float[np.ndarray, "n_k 3"]
    p: Float[np.ndarray, " n_k"]
    q: Float[np.ndarray, " n_k"]
    significant: Bool[np.ndarray, " n_k"]
    level: float = stats.LEVEL
    alpha: float = ALPHA

    def to_json(self) -> dict:
        cols = ("mean", "low", "high")
        return {
            "metric": self.metric, "control": self.control, "level": self.level,
            "alpha": self.alpha, "n_trials": self.n_trials, "test": "paired permutation "
            "(two-sided), Benjamini-Hochberg over K",
            "rows": [{"k": int(k), "n_draws": int(self.n_draws[i]),
                      "top": dict(zip(cols, self.top[i].tolist(), strict=True)),
                      "control": dict(zip(cols, self.control_values[i].tolist(), strict=True)),
                      "diff": dict(zip(cols, self.diff[i].tolist(), strict=True)),
                      "p": float(self.p[i]), "q": float(self.q[i]),
                      "significant": bool(self.significant[i])}
                     for i, k in enumerate(self.ks)],
        }

    def significant_ks(self) -> list[int]:
        return [int(k) for k, s in zip(self.ks, self.significant, strict=True) if s]


def compare_to_control(
    values: dict[str, Float[np.ndarray, " trial"]], *, control: str,
    metric: Literal["rouge", "success"] = "rouge", level: float = stats.LEVEL,
    alpha: float = ALPHA, n_boot: int = stats.N_BOOT, n_perm: int = stats.N_PERM, seed: int = 0,
) -> ControlComparison | None:
    """``values``: per condition name (``top-K``, ``random-K-dD``, ``matched-K-dD``,
    ``bottom-K``), the per-trial metric in cell order.  None when no K has both ``top-K`` and
    the control."""
    if control not in CONTROLS:
        raise ValueError(f"control must be one of {', '.join(CONTROLS)}, got {control!r}")
    by_k: dict[int, list[np.ndarray]] = {}
    for name, vals in values.items():
        parts = name.split("-")
        if parts[0] != control or not parts[1].isdigit():
            continue
        if control == "bottom" and len(parts) == 2:
            by_k.setdefault(int(parts[1]), []).append(np.asarray(vals, dtype=np.float64))
        elif control != "bottom" and len(parts) == 3 and parts[2].startswith("d"):
            by_k.setdefault(int(parts[1]), []).append(np.asarray(vals, dtype=np.float64))
    ks = sorted(k for k in by_k if f"top-{k}" in values)
    if not ks:
        return None
    rows: dict[str, list] = {"top": [], "control": [], "diff": [], "p": [], "draws": []}
    n_trials = 0
    for k in ks:
        top = np.asarray(values[f"top-{k}"], dtype=np.float64)
        draws = np.stack(by_k[k])
        n_trials = top.size
        if draws.shape[1] != top.size:
            raise ValueError(f"top-{k} has {top.size} trials but {control}-{k} has "
                             f"{draws.shape[1]}: the conditions must share their cells")
        ci = lambda v: stats.bootstrap_ci(v, level=level, n_boot=n_boot, seed=seed)  # noqa: E731
        for key, interval in (("top", ci(top)), ("control", ci(draws)),
                              ("diff", ci(draws - top[None]))):
            rows[key].append((interval.mean, interval.low, interval.high))
        rows["p"].append(stats.paired_permutation_test(draws.mean(axis=0), top, n_perm=n_perm,
                                                       seed=seed))
        rows["draws"].append(len(draws))
    p = np.array(rows["p"])
    q = stats.benjamini_hochberg(p)
    return ControlComparison(metric, control, np.array(ks, dtype=np.int64), n_trials,
                             np.array(rows["draws"], dtype=np.int64), np.array(rows["top"]),
                             np.array(rows["control"]), np.array(rows["diff"]), p, q,
                             q <= alpha, level, alpha)
