"""The analyses' default inputs for zoo models, built from the zoo's generators.

- :func:`zoo_inputs`: detection's needles (the *held-out* templates, random fillers) and a seeded
  prose haystack for each (:class:`ProseHaystack`).
- :func:`zoo_pairs`: path patching's clean / corrupted pairs from the same needles.
- :func:`zoo_tasks`: the CoT analysis's four tasks (multi-hop questions with and without CoT,
  parametric facts with and without it), asked in the model's own chain form (:func:`zoo_chain`).

The library core never imports this module: the scripts pass its results to the library.
"""

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rh_lens.cot import DIRECT_SUFFIX, ZOO_TEMPLATES, Item, Task
from rh_lens.models import Model, model_facts, tokenize, zoo_card
from rh_lens.niah import Needle
from rh_lens.patching import PairError, PatchPair, make_pair
from rh_lens.zoo import tasks as zt
from rh_lens.zoo.prose import Prose


@dataclass(frozen=True)
class ProseHaystack:
    """The zoo's seeded prose generator as a :class:`rh_lens.niah.Haystack`: the same seed gives
    the same haystack."""

    seed: int = 0
    name: str = "zoo-prose"

    def text(self, n_chars: int) -> str:
        return Prose(self.seed).text(n_chars=n_chars)


def zoo_inputs(n_needles: int = 3, *, seed: int = 0) -> tuple[list[Needle], list[ProseHaystack]]:
    """Needles from the zoo's *held-out* templates (never seen in training, random fillers) and
    a seeded prose haystack for each: the default detection inputs for zoo models."""
    if n_needles < 1:
        raise ValueError(f"n_needles must be positive, got {n_needles}")
    needles, haystacks = [], []
    for i in range(n_needles):
        needles.append(zt.make_needle(random.Random(seed * 1_000 + i), _heldout_template(i)))
        haystacks.append(ProseHaystack(seed * 1_000 + 500 + i))
    return needles, haystacks


def _heldout_template(i: int) -> zt.NeedleTemplate:
    """The template of :func:`zoo_inputs`' ``i``-th needle."""
    return zt.HELDOUT_TEMPLATES[i % len(zt.HELDOUT_TEMPLATES)]


def zoo_pairs(model: Model, n_pairs: int, *, seed: int = 0, context_length: int,
              buffer: int, depths: Sequence[float] | None = None,
              max_tries: int = 200) -> list[PatchPair]:
    """Pairs from the zoo's held-out needles (:func:`zoo_inputs`, same seed), each answer
    swapped for another answer drawn from the same template (seeded) with equal token length.
    Pair ``i`` sits at ``depths[i % len(depths)]`` (default: evenly from 10 to 90 %)."""
    needles, haystacks = zoo_inputs(n_pairs, seed=seed)
    depths = list(depths) if depths else [float(d) for d in np.linspace(10, 90, n_pairs)]
    pairs = []
    for i, (needle, haystack) in enumerate(zip(needles, haystacks, strict=True)):
        rng = random.Random(seed * 1_000 + i + 7_919_000)
        errors = []
        for _ in range(max_tries):
            alternative = zt.make_needle(rng, _heldout_template(i)).answer
            if alternative == needle.answer:
                continue
            try:
                pairs.append(make_pair(model, needle, alternative, haystack,
                                       context_length=context_length, depth=depths[i % len(depths)],
                                       buffer=buffer))
                break
            except PairError as err:
                errors.append(str(err))
        else:
            raise PairError(f"no alternative answer of equal token length for {needle.answer!r} "
                            f"in {max_tries} tries (last: {errors[-1] if errors else 'none'})")
    return pairs


@dataclass(frozen=True)
class ZooTaskSizes:
    n_multihop: int = 24
    n_people: int = 3
    seed: int = 0
    reserve: int = 48  # tokens left free for the answer
    hop_form: str = zt.DEFAULT_HOP_FORM  # the model's own (rh_lens.zoo.tasks.HOP_FORMS; zoo_chain)
    roles: int = zt.DEFAULT_ROLES  # officials per town, the model's own (zoo_chain)


def zoo_chain(spec: str) -> dict:
    """How a zoo model ``spec`` was trained to chain two hops (its card's recipe): the
    :class:`ZooTaskSizes` fields ``hop_form`` and ``roles``; their defaults for any other model."""
    return zt.chain_of((zoo_card(spec) or {}).get("recipe", {}))


def zoo_tasks(model, sizes: ZooTaskSizes = ZooTaskSizes()) -> tuple[Task, ...]:
    """The zoo's multi-hop questions (CoT and direct) and parametric facts (direct and CoT),
    with fresh random fillers (``seed``) and haystacks up to the model's context."""
    n_ctx = model_facts(model).n_ctx
    if n_ctx <= sizes.reserve + 64:
        raise ValueError(f"n_ctx {n_ctx} leaves no room for a multi-hop context")
    backend = model.tokenizer.backend_tokenizer
    rng = random.Random(f"cot:{sizes.seed}")
    items = []
    for _ in range(sizes.n_multihop):
        sub = random.Random(rng.random())
        n_hay, text_seed = sub.randint(n_ctx // 4, n_ctx), sub.random()
        ex = zt.fit_example(
            lambda k, s=text_seed: zt.multihop_example(
                random.Random(s), tokenizer=backend, n_haystack_tokens=k,
                n_people=sizes.n_people, hop_form=sizes.hop_form, roles=sizes.roles),
            lambda text: len(tokenize(model, text + DIRECT_SUFFIX)), n_ctx=n_ctx, n_hay=n_hay,
            reserve=sizes.reserve)  # the direct prompt is the longer one
        context, question = zt.niah_parts(ex.prompt)
        items.append(Item(question, ex.answer, context))
    facts = tuple(Item(f"What is {subject}?", answer) for subject, answer in zt.parametric_facts())
    multihop = tuple(items)
    return (
        Task("multihop_cot", ZOO_TEMPLATES["multihop_cot"], multihop),
        Task("multihop_direct", ZOO_TEMPLATES["multihop_direct"], multihop),
        Task("parametric_direct", ZOO_TEMPLATES["parametric_direct"], facts),
        Task("parametric_cot", ZOO_TEMPLATES["parametric_cot"], facts),
    )
