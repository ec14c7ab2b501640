"""Per-head key/value cache policies: which key/value heads keep the full cache, and what the
others keep (the first ``sink`` tokens and the last ``window``).

A policy is stated in key/value groups, ``(layer, group)`` pairs, since a key/value head is what
a cache stores: in a grouped-query model every query head of a kept group reads the full cache
(for multi-head attention a group is one head).  Three families are compared at equal memory:

- ``top-K``: the K groups with the highest group score (the max of their query heads' scores,
  chosen with :func:`rh_lens.heads.select_heads`), every other group windowed;
- ``random-K-dD``: K groups drawn at random (seeded, from every group), the others windowed;
- ``uniform-K``: no group full, every group with the longer window that needs the same memory as
  K full groups at the reference length (the StreamingLLM baseline);

plus ``full`` (nothing windowed) and ``window`` (every group windowed, K = 0).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from rh_lens.heads import HeadLike, group_table, kv_group_heads, select_heads, validate_heads

Kind = Literal["full", "window", "top", "random", "uniform"]


@dataclass(frozen=True)
class KVPolicy:
    """Groups ``full`` keep every key/value; the other groups keep ``sink`` + ``window``."""

    kind: Kind
    name: str
    full: tuple[HeadLike, ...]
    sink: int
    window: int
    k: int = 0
    draw: int | None = None

    def __post_init__(self):
        if self.sink < 0 or self.window < 1:
            raise ValueError(f"policy {self.name}: need sink >= 0 and window >= 1, got "
                             f"sink={self.sink}, window={self.window}")

    @property
    def group(self) -> str:
        """The display family: ``top``, ``random``, ``uniform``, or the name itself."""
        return self.kind if self.kind in ("top", "random", "uniform") else self.name

    def windowed_heads(self, *, n_layers: int, n_heads: int, n_kv_heads: int) -> tuple:
        """The query heads whose keys are windowed: those of every group not kept full."""
        full = set(validate_heads(self.full, n_layers, n_kv_heads, unit="group"))
        rest = [(layer, g) for layer in range(n_layers) for g in range(n_kv_heads)
                if (layer, g) not in full]
        return kv_group_heads(rest, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads)

    def kept_tokens(self, n_tokens: int, *, n_layers: int, n_kv_heads: int) -> int:
        """Key/value tokens the cache holds, summed over key/value heads, after ``n_tokens``."""
        n_full = len(self.full)
        return (n_full * n_tokens
                + (n_layers * n_kv_heads - n_full) * min(n_tokens, self.sink + self.window))

    def kept_fraction(self, n_tokens: int, *, n_layers: int, n_kv_heads: int) -> float:
        return self.kept_tokens(n_tokens, n_layers=n_layers, n_kv_heads=n_kv_heads) / (
            n_tokens * n_layers * n_kv_heads)

    def to_json(self) -> dict:
        return {"kind": self.kind, "name": self.name, "full": [list(g) for g in self.full],
                "sink": self.sink, "window": self.window, "k": self.k, "draw": self.draw}

    @classmethod
    def from_json(cls, data: dict) -> "KVPolicy":
        return cls(data["kind"], data["name"], tuple((int(a), int(b)) for a, b in data["full"]),
                   int(data["sink"]), int(data["window"]), int(data["k"]), data["draw"])


def cache_bytes(policy: KVPolicy, n_tokens: int, *, n_layers: int, n_kv_heads: int,
                d_head: int, bytes_per_value: int = 2) -> int:
    """Bytes of the keys and values the policy keeps at ``n_tokens`` (2 x d_head values per
    token and key/value head; 2 bytes per value is bfloat16)."""
    return 2 * d_head * bytes_per_value * policy.kept_tokens(n_tokens, n_layers=n_layers,
                                                             n_kv_heads=n_kv_heads)


def group_scores(scores, *, n_kv_heads: int) -> np.ndarray:
    """``[n_layers, n_kv_heads]``: each key/value group's highest query-head score."""
    return group_table(np.asarray(scores, dtype=np.float64), n_kv_heads, reduce="max")


def matched_window(k: int, *, n_groups: int, n_tokens: int, sink: int, window: int) -> int:
    """The window that gives every group the memory of ``k`` full groups plus ``n_groups - k``
    groups of ``sink + window`` at ``n_tokens`` (rounded down, at least ``window``)."""
    kept = k * n_tokens + (n_groups - k) * min(n_tokens, sink + window)
    return max(window, kept // n_groups - sink)


def kv_policies(
    scores, ks: Sequence[int], *, n_layers: int, n_kv_heads: int, sink: int, window: int,
    n_tokens: int, draws: int = 3, seed: int = 0,
) -> tuple[KVPolicy, ...]:
    """``full``, ``window`` and, for each K in ``ks`` (0 < K < groups), ``top-K``,
    ``random-K-d0..`` and ``uniform-K`` (matched at ``n_tokens``, the longest sequence)."""
    n_groups = n_layers * n_kv_heads
    bad = [k for k in ks if not 0 < k < n_groups]
    if bad:
        raise ValueError(f"K={bad}: the number of full key/value groups must be in "
                         f"[1, {n_groups - 1}] (the model has {n_layers} x {n_kv_heads} groups)")
    table = group_scores(scores, n_kv_heads=n_kv_heads)
    if table.shape != (n_layers, n_kv_heads):
        raise ValueError(f"scores give {table.shape[0]} layers, the model has {n_layers}")
    every = tuple((layer, g) for layer in range(n_layers) for g in range(n_kv_heads))
    out = [KVPolicy("full", "full", every, sink, window, k=n_groups),
           KVPolicy("window", "window", (), sink, window)]
    for k in sorted(set(ks)):
        (top,) = select_heads(f"top:{k}", n_layers=n_layers, n_heads=n_kv_heads, scores=table)
        out.append(KVPolicy("top", f"top-{k}", tuple(top), sink, window, k=k))
        draws_k = select_heads(f"random:{k}", n_layers=n_layers, n_heads=n_kv_heads,
                               scores=table, threshold=np.inf, seed=seed, n_draws=draws)
        out += [KVPolicy("random", f"random-{k}-d{d}", tuple(g), sink, window, k=k, draw=d)
                for d, g in enumerate(draws_k)]
        wide = matched_window(k, n_groups=n_groups, n_tokens=n_tokens, sink=sink, window=window)
        out.append(KVPolicy("uniform", f"uniform-{k}", (), sink, wide, k=k))
    return tuple(out)


def policy_hooks(model, policy: KVPolicy):
    """The hooks that run ``policy`` on ``model`` (for the prefill and every decoding step):
    :func:`rh_lens.interventions.kv_window_hooks` on the windowed groups' query heads."""
    from rh_lens.interventions import kv_window_hooks
    from rh_lens.models import model_facts

    facts = model_facts(model)
    heads = policy.windowed_heads(n_layers=facts.n_layers, n_heads=facts.n_heads,
                                  n_kv_heads=facts.n_kv_heads)
    return kv_window_hooks(heads, sink=policy.sink, window=policy.window) if heads else []
