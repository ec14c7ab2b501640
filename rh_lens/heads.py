"""Attention heads: the head type, its label, head sets, key/value groups and ranking.

A head is ``Head(layer, head)``, a named tuple, so a plain ``(layer, head)`` pair is accepted
wherever a head is and compares equal to it.  Head indices are *query* heads; in a
grouped-query model query head ``h`` reads key/value group ``h // (n_heads // n_kv_heads)``
(:func:`kv_group`).  ``L{layer}H{head}`` (:func:`label`) is for display only.

Head sets are written as one spec string, the same for every script (:func:`parse_spec`,
resolved against a model's shape and a score table by :func:`select_heads`):

- ``top:K``: the K highest scores, ties in layer-major order (:func:`top_heads`);
- ``bottom:K``: the K lowest scores, lowest first, ties in layer-major order
  (:func:`bottom_heads`);
- ``random:K``: seeded draws of K heads that are neither retrieval heads (score >
  ``threshold``, :data:`THRESHOLD` by default) nor excluded (:func:`random_head_draws`);
- ``matched:K``: seeded draws of K heads with the layer histogram of ``top:K`` (as many heads
  per layer), none of them in ``top:K`` or excluded (:func:`matched_head_draws`): the control
  that masks as many heads in the same layers;
- ``heads:L.H,...``: explicit heads; ``groups:L.G,...``: every query head of those key/value
  groups; ``all``: every head, layer-major.

This module needs numpy only.
"""

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, SupportsInt

import numpy as np

from rh_lens.types import HeadTable

THRESHOLD = 0.1
"""Retrieval heads are the heads whose mean retrieval score is strictly above this."""

SpecKind = Literal["top", "bottom", "random", "matched", "heads", "groups", "all"]
SPEC_KINDS: tuple[str, ...] = ("top", "bottom", "random", "matched", "heads", "groups", "all")
SPEC_HELP = "top:K | bottom:K | random:K | matched:K | heads:L.H,... | groups:L.G,... | all"
DRAWN_KINDS: tuple[str, ...] = ("random", "matched")
"""The kinds whose head sets are seeded draws (``n_draws`` sets per spec)."""


class Head(NamedTuple):
    """One attention head; equal to the plain pair ``(layer, head)``."""

    layer: int
    head: int


HeadLike = tuple[int, int]
"""A :class:`Head` or a plain ``(layer, head)`` pair (what functions accept)."""


def label(head: Sequence[SupportsInt]) -> str:
    """``L{layer}H{head}`` of a ``(layer, head)`` pair."""
    layer, index = head
    return f"L{int(layer)}H{int(index)}"


def labels(heads: Iterable[Sequence[SupportsInt]]) -> list[str]:
    return [label(h) for h in heads]


# --------------------------------------------------------------------------------------------
# Validation and grouping


def validate_heads(heads: Iterable, n_layers: int, n_heads: int, *,
                   unit: Literal["head", "group"] = "head") -> tuple[Head, ...]:
    """Check ``(layer, head)`` pairs against a model's shape; duplicates are dropped, order kept.

    ``unit="group"`` checks ``(layer, group)`` pairs against ``n_heads`` key/value groups.
    """
    out: list[Head] = []
    letter, many = ("H", "heads") if unit == "head" else ("G", "key/value groups")
    for item in heads:
        try:
            layer, index = (int(x) for x in item)
        except (TypeError, ValueError):
            raise ValueError(f"a {unit} must be a (layer, {unit}) pair, got {item!r}") from None
        shape = f"the model has {n_layers} layers x {n_heads} {many}"
        name = f"L{layer}{letter}{index}"
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer {layer} of {name} is out of range [0, {n_layers}): {shape}")
        if not 0 <= index < n_heads:
            raise ValueError(f"{unit} {index} of {name} is out of range [0, {n_heads}): {shape}")
        if (layer, index) not in out:
            out.append(Head(layer, index))
    return tuple(out)


def heads_by_layer(heads: Iterable[HeadLike]) -> dict[int, list[int]]:
    """``{layer: [head, ...]}`` in order of first appearance."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    return by_layer


def group_size(n_heads: int, n_kv_heads: int) -> int:
    """Query heads per key/value group."""
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(f"n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}")
    return n_heads // n_kv_heads


def kv_group(head: HeadLike, n_heads: int, n_kv_heads: int) -> int:
    """The key/value group that query head ``head`` reads: ``h // (n_heads // n_kv_heads)``."""
    return int(head[1]) // group_size(n_heads, n_kv_heads)


def kv_group_heads(groups: Iterable, *, n_layers: int, n_heads: int,
                   n_kv_heads: int) -> tuple[Head, ...]:
    """Every query head of the key/value groups ``(layer, group)``, group by group."""
    size = group_size(n_heads, n_kv_heads)
    return tuple(Head(layer, g * size + i)
                 for layer, g in validate_heads(groups, n_layers, n_kv_heads, unit="group")
                 for i in range(size))


def group_table(table: np.ndarray, n_kv_heads: int, *,
                reduce: Literal["mean", "max", "any", "sum"] = "mean") -> np.ndarray:
    """Reduce the last (head) axis of ``[..., n_layers, n_heads]`` over each key/value group:
    ``[..., n_layers, n_kv_heads]``."""
    table = np.asarray(table)
    if table.ndim < 2:
        raise ValueError(f"table must be [..., n_layers, n_heads], got shape {table.shape}")
    size = group_size(table.shape[-1], n_kv_heads)
    if reduce not in ("mean", "max", "any", "sum"):
        raise ValueError(f"reduce must be 'mean', 'max', 'any' or 'sum', got {reduce!r}")
    grouped = table.reshape(*table.shape[:-1], n_kv_heads, size)
    return getattr(grouped, reduce)(-1)


# --------------------------------------------------------------------------------------------
# Ranking


def score_table(scores, *, n_layers: int | None = None, n_heads: int | None = None,
                name: str = "scores") -> HeadTable:
    """``scores`` as a finite float64 ``[n_layers, n_heads]`` table (of that shape if given)."""
    table = np.asarray(scores, dtype=np.float64)
    if table.ndim != 2 or 0 in table.shape:
        raise ValueError(f"{name} must be a non-empty [n_layers, n_heads] table, got {table.shape}")
    if n_layers is not None and table.shape != (n_layers, n_heads):
        raise ValueError(f"{name} have shape {table.shape} but the model has {n_layers} layers x "
                         f"{n_heads} heads: are they another model's?")
    if not np.isfinite(table).all():
        raise ValueError(f"{name} holds NaN or inf (no successful trial?)")
    return table


def ranked_heads(table: HeadTable) -> list[tuple[int, int, float]]:
    """All heads as ``(layer, head, score)``, highest first; ties in layer-major order."""
    table = score_table(table)
    order = np.argsort(-table, axis=None, kind="stable")
    n_heads = table.shape[1]
    return [(int(i // n_heads), int(i % n_heads), float(table.flat[i])) for i in order]


def _check_k(kind: str, k: int, n_total: int) -> None:
    if not 1 <= k <= n_total:
        raise ValueError(f"{kind}-{k}: K must be in [1, {n_total}] (the model's head count)")


def top_heads(scores: HeadTable, k: int) -> tuple[Head, ...]:
    """The ``k`` heads with the highest scores, highest first (ties in layer-major order)."""
    table = score_table(scores)
    _check_k("top", k, table.size)
    return tuple(Head(layer, head) for layer, head, _ in ranked_heads(table)[:k])


def bottom_heads(scores: HeadTable, k: int) -> tuple[Head, ...]:
    """The ``k`` heads with the lowest scores, lowest first (ties in layer-major order)."""
    table = score_table(scores)
    _check_k("bottom", k, table.size)
    order = np.argsort(table, axis=None, kind="stable")[:k]
    return tuple(Head(int(i // table.shape[1]), int(i % table.shape[1])) for i in order)


def random_head_draws(
    k: int, *, n_layers: int, n_heads: int, scores: HeadTable | None = None,
    threshold: float = THRESHOLD, exclude: Sequence[HeadLike] = (), seed: int = 0,
    n_draws: int = 1,
) -> tuple[tuple[Head, ...], ...]:
    """``n_draws`` random sets of ``k`` heads, none a retrieval head or in ``exclude``.

    Draw ``d`` is the first ``k`` heads of the ``d``-th permutation of the eligible heads
    (layer-major) drawn from ``numpy.random.default_rng(seed)``, sorted: the same seed gives the
    same draws, and for a larger ``k`` each draw contains the smaller one's heads.
    """
    _check_draws("random", k, n_draws)
    excluded = set(validate_heads(exclude, n_layers, n_heads))
    if scores is not None:
        table = score_table(scores, n_layers=n_layers, n_heads=n_heads)
        excluded |= {(int(lay), int(h)) for lay, h in np.argwhere(table > threshold)}
    pool = [Head(lay, h) for lay in range(n_layers) for h in range(n_heads)
            if (lay, h) not in excluded]
    if k > len(pool):
        raise ValueError(
            f"random-{k} needs {k} heads but only {len(pool)} of the model's {n_layers * n_heads} "
            f"heads are neither retrieval heads (score > {threshold}) nor excluded"
        )
    rng = np.random.default_rng(seed)
    return tuple(tuple(sorted(pool[i] for i in rng.permutation(len(pool))[:k]))
                 for _ in range(n_draws))


def _check_draws(kind: str, k: int, n_draws: int) -> None:
    if k < 1:
        raise ValueError(f"{kind}-{k}: K must be >= 1")
    if n_draws < 1:
        raise ValueError(f"{kind}-{k} with {n_draws} draws: the number of draws must be >= 1")


def matched_head_draws(
    k: int, *, scores: HeadTable, exclude: Sequence[HeadLike] = (), seed: int = 0,
    n_draws: int = 1,
) -> tuple[tuple[Head, ...], ...]:
    """``n_draws`` random sets of ``k`` heads with the layer histogram of :func:`top_heads`
    (``scores``, ``k``), disjoint from those top heads and from ``exclude``.

    Draw ``d`` takes, layer by layer in increasing order, the first ``c_l`` heads of a
    permutation of layer ``l``'s eligible heads drawn from ``numpy.random.default_rng(seed)``
    (``c_l``: the top-K heads in layer ``l``); each draw is sorted.  A layer with fewer eligible
    heads than ``c_l`` is refused, naming it.
    """
    table = score_table(scores)
    _check_draws("matched", k, n_draws)
    n_layers, n_heads = table.shape
    top = top_heads(table, k)
    excluded = set(validate_heads(exclude, n_layers, n_heads)) | set(top)
    counts = {layer: len(hs) for layer, hs in sorted(heads_by_layer(top).items())}
    pools = {}
    for layer, count in counts.items():
        pools[layer] = [Head(layer, h) for h in range(n_heads) if (layer, h) not in excluded]
        if count > len(pools[layer]):
            raise ValueError(
                f"matched-{k}: top-{k} has {count} heads in layer {layer}, which leaves only "
                f"{len(pools[layer])} other heads of its {n_heads} to draw from (excluded or in "
                f"top-{k}); use a smaller K or random:K")
    rng = np.random.default_rng(seed)
    return tuple(tuple(sorted(h for layer, count in counts.items()
                              for h in (pools[layer][i]
                                        for i in rng.permutation(len(pools[layer]))[:count])))
                 for _ in range(n_draws))


# --------------------------------------------------------------------------------------------
# Head-set specs


def parse_heads(text: str, *, unit: Literal["head", "group"] = "head") -> tuple[Head, ...]:
    """``"L.H,L.H"`` (``"L.G"`` for groups) -> ``((L, H), ...)``, in order, unvalidated."""
    out = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", item)
        if match is None:
            what = "LAYER.HEAD, e.g. 3.5" if unit == "head" else "LAYER.GROUP, e.g. 3.1"
            raise ValueError(f"bad {unit} {item!r} in {text!r}: write {what}")
        out.append(Head(int(match[1]), int(match[2])))
    return tuple(out)


@dataclass(frozen=True)
class HeadSpec:
    """A parsed head-set spec: ``kind``, ``k`` (top, bottom, random, matched) or ``items`` (the
    ``(layer, head)`` or ``(layer, group)`` pairs as written, for heads and groups)."""

    kind: SpecKind
    k: int | None = None
    items: tuple[HeadLike, ...] = ()
    text: str = ""

    @property
    def needs_scores(self) -> bool:
        return self.kind in ("top", "bottom", "random", "matched")

    @property
    def drawn(self) -> bool:
        """Whether the heads are seeded random draws (``n_draws`` sets)."""
        return self.kind in DRAWN_KINDS


def parse_spec(text: str) -> HeadSpec:
    """Parse one spec (see the module docstring); nothing is checked against a model here."""
    kind, colon, arg = text.strip().partition(":")
    if kind == "all":
        if colon:
            raise ValueError(f"head set {text!r}: 'all' takes no argument")
        return HeadSpec("all", text=text)
    if kind in ("top", "bottom", "random", "matched"):
        if not arg.strip().isdigit() or int(arg) < 1:
            raise ValueError(f"head set {text!r}: write {kind}:K with K a positive integer")
        return HeadSpec(kind, k=int(arg), text=text)
    if kind in ("heads", "groups"):
        if not arg.strip():
            unit = "L.H" if kind == "heads" else "L.G"
            raise ValueError(f"head set {text!r}: write {kind}:{unit},{unit},...")
        return HeadSpec(kind, items=parse_heads(arg, unit="head" if kind == "heads" else "group"),
                        text=text)
    raise ValueError(f"unknown head set {text!r}: use {SPEC_HELP}")


def select_heads(
    spec: HeadSpec | str, *, n_layers: int, n_heads: int, n_kv_heads: int | None = None,
    scores: HeadTable | None = None, threshold: float = THRESHOLD,
    exclude: Sequence[HeadLike] = (), seed: int = 0, n_draws: int = 1,
) -> tuple[tuple[Head, ...], ...]:
    """The head sets of ``spec`` on a model of this shape: ``n_draws`` sets for ``random:K`` and
    ``matched:K``, one set otherwise.  ``top``/``bottom`` keep their ranking order, ``heads`` the
    order written (duplicates dropped), ``groups`` group by group; ``exclude`` only affects
    ``random`` and ``matched``, ``threshold`` only ``random``."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    if n_draws < 1:
        raise ValueError(f"head set {spec.text or spec.kind!r}: the number of draws must be >= 1, "
                         f"got {n_draws}")
    if spec.needs_scores:
        if scores is None:
            raise ValueError(f"head set {spec.text or spec.kind!r} needs retrieval scores")
        scores = score_table(scores, n_layers=n_layers, n_heads=n_heads)
    if spec.kind == "top":
        return (top_heads(scores, spec.k),)
    if spec.kind == "bottom":
        return (bottom_heads(scores, spec.k),)
    if spec.kind == "random":
        return random_head_draws(spec.k, n_layers=n_layers, n_heads=n_heads, scores=scores,
                                 threshold=threshold, exclude=exclude, seed=seed,
                                 n_draws=n_draws)
    if spec.kind == "matched":
        return matched_head_draws(spec.k, scores=scores, exclude=exclude, seed=seed,
                                  n_draws=n_draws)
    if spec.kind == "heads":
        return (validate_heads(spec.items, n_layers, n_heads),)
    if spec.kind == "groups":
        return (kv_group_heads(spec.items, n_layers=n_layers, n_heads=n_heads,
                               n_kv_heads=n_heads if n_kv_heads is None else n_kv_heads),)
    return (tuple(Head(layer, head) for layer in range(n_layers) for head in range(n_heads)),)
