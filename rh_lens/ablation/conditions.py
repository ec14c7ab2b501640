"""Head sets to mask, named for files and tables: ``none``, ``top-5``, ``random-5-d0``, ...

A thin layer over :mod:`rh_lens.heads`: the specs are its (``top:K``, ``bottom:K``,
``random:K``, ``matched:K``, ``heads:L.H,...``, ``groups:L.G,...``, ``all``), the heads are
resolved against the model's shape, and each set gets the name its record directory and result
rows carry.
"""

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from rh_lens.heads import DRAWN_KINDS, THRESHOLD, HeadLike, parse_spec, select_heads
from rh_lens.models import ModelFacts, model_facts
from rh_lens.types import HeadTable

Kind = Literal["none", "top", "bottom", "random", "matched", "heads", "groups", "all"]


def model_shape(model) -> tuple[int, int, int]:
    """``(n_layers, n_heads, n_kv_heads)`` of a model (read from ``model.cfg``) or ModelFacts."""
    facts = model if isinstance(model, ModelFacts) else model_facts(model)
    return facts.n_layers, facts.n_heads, facts.n_kv_heads


@dataclass(frozen=True)
class Condition:
    """One set of masked heads, named for files and tables (``top-5``, ``random-5-d0``,
    ``matched-5-d0``, ...)."""

    kind: Kind
    name: str
    heads: tuple[HeadLike, ...] = ()
    k: int | None = None
    draw: int | None = None

    @property
    def group(self) -> str:
        """The display group: the draws of one random-K share ``random-K`` (``matched-K``)."""
        return f"{self.kind}-{self.k}" if self.kind in DRAWN_KINDS else self.name

    def to_json(self) -> dict:
        return {"kind": self.kind, "name": self.name, "heads": [list(h) for h in self.heads],
                "k": self.k, "draw": self.draw}

    @classmethod
    def from_json(cls, data: dict) -> "Condition":
        return cls(data["kind"], data["name"], tuple((int(a), int(b)) for a, b in data["heads"]),
                   data["k"], data["draw"])


def _list_name(prefix: str, items: Sequence[HeadLike], letter: str) -> str:
    name = f"{prefix}-" + "_".join(f"L{a}{letter}{b}" for a, b in items)
    if len(name) > 60:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{prefix}-{len(items)}-{digest}"
    return name


def conditions_from_masks(
    model, masks: Sequence[str], *, scores: HeadTable | None = None,
    threshold: float = THRESHOLD, exclude: Sequence[HeadLike] = (), seed: int = 0,
    n_draws: int = 1,
) -> tuple[Condition, ...]:
    """``none`` followed by one condition per mask (``n_draws`` for ``random:K`` and
    ``matched:K``), duplicates
    dropped.  Masks are :mod:`rh_lens.heads` specs; explicit ``heads`` are sorted, ``groups``
    keep the order written."""
    n_layers, n_heads, n_kv_heads = model_shape(model)
    out = [Condition("none", "none")]
    for mask in masks:
        spec = parse_spec(mask)
        sets = select_heads(spec, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                            scores=scores, threshold=threshold, exclude=exclude, seed=seed,
                            n_draws=n_draws)
        if spec.kind in ("top", "bottom"):
            out.append(Condition(spec.kind, f"{spec.kind}-{spec.k}", sets[0], k=spec.k))
        elif spec.drawn:
            out += [Condition(spec.kind, f"{spec.kind}-{spec.k}-d{d}", h, k=spec.k, draw=d)
                    for d, h in enumerate(sets)]
        elif spec.kind == "heads":
            heads = tuple(sorted(sets[0]))
            out.append(Condition("heads", _list_name("heads", heads, "H"), heads))
        elif spec.kind == "groups":
            out.append(Condition("groups", _list_name("groups", spec.items, "G"), sets[0]))
        else:
            out.append(Condition("all", "all", sets[0]))
    unique: dict[str, Condition] = {}
    for cond in out:
        unique.setdefault(cond.name, cond)
    return tuple(unique.values())
