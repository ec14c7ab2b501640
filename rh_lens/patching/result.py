"""Activation and path patching of one set of pairs, saved and loaded as one result (with, when
computed, the senders patched as whole sets: :mod:`rh_lens.patching.draws`)."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rh_lens.heads import label
from rh_lens.patching.activation import ActivationPatchingResult
from rh_lens.patching.draws import SetPatchingResult
from rh_lens.patching.paths import PathPatchingResult, Receiver
from rh_lens.patching.runs import PatchConfig
from rh_lens.results import RunMetadata, load_result, save_result, to_jsonable

KIND = "path_patch"


def ranked_cells(table: np.ndarray, name: Callable[[int, int], str]) -> list[tuple[str, float]]:
    """Finite cells by decreasing absolute value, labelled ``name(row, column)``."""
    cells = [(name(i, j), float(table[i, j]))
             for i in range(table.shape[0]) for j in range(table.shape[1])
             if np.isfinite(table[i, j])]
    return sorted(cells, key=lambda c: -abs(c[1]))


@dataclass(frozen=True)
class PatchingResult:
    """Activation patching per head and path patching sender x receiver on the same pairs;
    ``sets``: each drawn sender set patched as a whole (None when not computed)."""

    activation: ActivationPatchingResult
    path: PathPatchingResult
    sets: SetPatchingResult | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        act, path = self.activation, self.path
        receivers = path.receivers
        return {
            "act_logit_diff": act.logit_diff, "act_effect": act.effect,
            "act_normalized": act.normalized,
            "path_logit_diff": path.logit_diff, "path_effect": path.effect,
            "path_total": path.total, "path_total_effect": path.total_effect,
            "clean_logit_diff": act.clean_logit_diff,
            "corrupted_logit_diff": act.corrupted_logit_diff,
            "senders": np.array(path.senders, dtype=np.int64).reshape(-1, 2),
            "receiver_layer": np.array([-1 if r.layer is None else r.layer for r in receivers]),
            "receiver_head": np.array([-1 if r.head is None else r.head for r in receivers]),
            "receiver_component": np.array([r.component for r in receivers], dtype="<U6"),
            **(self._set_arrays() if self.sets is not None else {}),
        }

    def _set_arrays(self) -> dict[str, np.ndarray]:
        sets = self.sets
        receivers = [[(r.component, -1 if r.layer is None else r.layer,
                       -1 if r.head is None else r.head) for r in into] for into in sets.receivers]
        return {
            "set_logit_diff": sets.logit_diff,
            "set_senders": np.array(sets.senders, dtype=np.int64).reshape(sets.n_draws, -1, 2),
            "set_receiver_component": np.array([[c for c, _, _ in r] for r in receivers],
                                               dtype="<U6"),
            "set_receiver_layer": np.array([[x for _, x, _ in r] for r in receivers]),
            "set_receiver_head": np.array([[h for _, _, h in r] for r in receivers]),
        }

    def top_heads(self) -> list[tuple[str, float]]:
        """Heads by the absolute activation-patching effect."""
        return ranked_cells(self.activation.effect, lambda i, j: label((i, j)))

    def top_paths(self) -> list[tuple[str, float]]:
        """Sender -> receiver edges by the absolute path-patching effect."""
        path = self.path
        return ranked_cells(path.effect, lambda i, j: f"{path.sender_labels[i]} -> "
                            f"{path.receiver_labels[j]}")

    def summary(self, *, top: int = 10, seed: int = 0) -> dict:
        """``seed`` seeds the bootstrap interval of the set effect."""
        clean, corrupted = self.activation.clean_logit_diff, self.activation.corrupted_logit_diff
        path = self.path
        sets = {} if self.sets is None else {"set_patching": self.sets.to_json(seed=seed)}
        return to_jsonable({
            "n_pairs": int(clean.size),
            "clean_logit_diff": float(clean.mean()),
            "corrupted_logit_diff": float(corrupted.mean()),
            "pairs_discriminated": float(((clean > 0) & (corrupted < 0)).mean()),
            "senders": path.sender_labels, "receivers": path.receiver_labels,
            "top_heads": self.top_heads()[:top], "top_paths": self.top_paths()[:top],
            "sender_total_effect": dict(zip(path.sender_labels, path.total_effect.tolist(),
                                            strict=True)),
            **sets,
        }, nan_to_none=True, where="summary")

    def save(self, directory: str | Path, *, meta: RunMetadata, config: dict | None = None,
             top: int = 10, seed: int = 0) -> dict:
        """``result.json`` + ``arrays.npz`` in ``directory``; ``config`` (model, pairs, ...)
        joins the patch settings.  Returns the summary."""
        summary = self.summary(top=top, seed=seed)
        save_result(directory, kind=KIND, config={**(config or {}),
                                                  **self.activation.config.to_dict()},
                    meta=meta, summary=summary, arrays=self.arrays())
        return summary

    @classmethod
    def load(cls, directory: str | Path) -> "PatchingResult":
        saved = load_result(directory, kind=KIND)
        a, c = saved.arrays, saved.config
        positions = c.get("positions", "answer")
        cfg = PatchConfig(positions=positions if isinstance(positions, str) else tuple(positions),
                          direction=c.get("direction", "denoise"),
                          batch_size=c.get("batch_size", 8))
        receivers = tuple(
            Receiver(str(comp), None if layer < 0 else int(layer), None if head < 0 else int(head))
            for comp, layer, head in zip(a["receiver_component"], a["receiver_layer"],
                                         a["receiver_head"], strict=True))
        clean, corrupted = a["clean_logit_diff"], a["corrupted_logit_diff"]
        act = ActivationPatchingResult(a["act_logit_diff"], clean, corrupted, cfg)
        path = PathPatchingResult(tuple((int(x), int(y)) for x, y in a["senders"]), receivers,
                                  a["path_logit_diff"], a["path_total"], clean, corrupted, cfg)
        sets = None
        if "set_logit_diff" in a:
            sets = SetPatchingResult(
                tuple(tuple((int(x), int(y)) for x, y in draw) for draw in a["set_senders"]),
                tuple(tuple(Receiver(str(c), None if lay < 0 else int(lay),
                                     None if h < 0 else int(h))
                            for c, lay, h in zip(*row, strict=True))
                      for row in zip(a["set_receiver_component"], a["set_receiver_layer"],
                                     a["set_receiver_head"], strict=True)),
                a["set_logit_diff"], clean, corrupted, cfg)
        return cls(act, path, sets)
