"""Training batches for the zoo: a pure function of (recipe, step), so training resumes exactly.

Each step draws a main batch (NIAH, multi-hop CoT and plain-prose rows, haystack lengths and
needle depths varied up to the context) and a short batch of parametric facts (questions with and
without a CoT preamble, and plain statements).  The first ``recipe.copy_warmup`` steps replace the
main batch by ``recipe.copy_batch`` repeated random sequences, with the loss on the repetition
only and no parametric batch: without them, induction heads had not formed after 1,250 steps of
the full mix (answer loss flat at ~4 nats, second-half loss of a repeated random sequence at
log(vocab)); alone (lr 3e-3, 64 rows) they form after a plateau of ~600 steps, and retrieval
is then learnt on top of them.  Spans are short (up to 32 tokens).
NIAH needles come from the training templates and, with probability ``recipe.procedural`` (after
``recipe.steps``, in the fine-tuning stage: ``recipe.finetune_procedural``), from procedurally
generated ones, so that held-out templates are answered by the rule rather than memorised; in the
polish stage (``recipe.polish``) and the ones after it (``recipe.stages``), from
:func:`rh_lens.zoo.tasks.varied_template`'s, with the stage's own mix; a stage's ``early`` share
of them has the longest haystack that fits and the needle in its first fifth, its ``late`` share
the needle in the last fifth of the haystack.
Rows are right-padded; padding never influences earlier positions under a causal mask, and it is
excluded from the loss.
"""

import random
from dataclasses import dataclass

import torch
from torch import Tensor

from rh_lens.zoo import tasks
from rh_lens.zoo.prose import Prose
from rh_lens.zoo.training.recipes import Mix, Recipe


@dataclass(frozen=True)
class Batch:
    tokens: Tensor  # [batch, pos] int64, right-padded
    lm_mask: Tensor  # [batch, pos - 1] bool: predicted position counts for the LM loss
    answer_mask: Tensor  # [batch, pos - 1] bool: predicted token belongs to a target


def encode_example(tokenizer, example: tasks.Example) -> tuple[list[int], list[bool]]:
    """Token ids (with BOS) and, per token, whether it belongs to the target."""
    enc = tokenizer(example.text, return_offsets_mapping=True)
    cut = len(example.prompt)
    ids = enc["input_ids"]
    is_target = [start >= cut and end > start for start, end in enc["offset_mapping"]]
    return ids, is_target


def _collate(rows: list[tuple[list[int], list[bool], bool]], pad_id: int) -> Batch:
    width = max(len(ids) for ids, _, _ in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    lm = torch.zeros(len(rows), width - 1, dtype=torch.bool)
    ans = torch.zeros(len(rows), width - 1, dtype=torch.bool)
    for i, (ids, is_target, lm_all) in enumerate(rows):
        tokens[i, : len(ids)] = torch.tensor(ids)
        tgt = torch.tensor(is_target[1:], dtype=torch.bool)
        ans[i, : len(ids) - 1] = tgt
        lm[i, : len(ids) - 1] = True if lm_all else tgt
    return Batch(tokens, lm, ans)


def _copy_row(rng: random.Random, tokenizer, *,
              max_span: int) -> tuple[list[int], list[bool], bool]:
    """A random token sequence and its repetition; only the repetition counts (induction)."""
    n_special = len(tokenizer.all_special_ids)
    span = [rng.randrange(n_special, len(tokenizer)) for _ in range(rng.randint(8, max_span))]
    return [tokenizer.bos_token_id] + span + span, [False] * (1 + len(span)) + [True] * len(span), \
        False


def _row(rng: random.Random, recipe: Recipe, tokenizer, *, mix: Mix, procedural: float,
         varied: bool, early: float = 0.0, late: float = 0.0,
         people: tuple[int, ...] = (2, 3)) -> tuple[list[int], list[bool], bool]:
    # A kind of weight 0 at the end of the list is never drawn and changes no draw: the lookup
    # rows left every earlier recipe's batches as they were.
    kinds = ("niah", "multihop", "lm", "repeat", "lookup")
    weights = (mix.niah, mix.multihop, mix.lm, mix.repeat, mix.lookup)
    kind = rng.choices(kinds, weights)[0]
    backend = tokenizer.backend_tokenizer
    if kind == "repeat":  # induction: the second copy is predictable only from the first
        return _copy_row(rng, tokenizer, max_span=(recipe.n_ctx - 1) // 2)
    if kind == "lm":
        text = tasks.haystack(Prose(rng), n_tokens=recipe.n_ctx - 1, tokenizer=backend)
        ids = tokenizer(text)["input_ids"][: recipe.n_ctx]
        return ids, [False] * len(ids), True
    overhead = 64 if kind == "niah" else 120
    if recipe.chat:
        overhead += 16
    room = recipe.n_ctx - overhead
    lo = min(recipe.min_haystack, room)
    n_hay = max(rng.randint(lo, room), rng.randint(lo, room))  # skewed towards long
    # One draw places a NIAH row's needle first (``early``) or last (``late``); none without them.
    u = rng.random() if kind == "niah" and (early > 0 or late > 0) else 1.0
    far, near = u < early, early <= u < early + late
    if far:
        n_hay = room
    while True:
        sub = random.Random(rng.random())
        if kind == "niah":
            depth = sub.random()
            ex = tasks.niah_example(sub, tokenizer=backend, n_haystack_tokens=n_hay,
                                    depth=depth / 5 if far else 1 - depth / 5 if near else depth,
                                    procedural=procedural,
                                    varied=varied)
        elif kind == "multihop":
            ex = tasks.multihop_example(sub, tokenizer=backend, n_haystack_tokens=n_hay,
                                        n_people=sub.choice(people), hop_form=recipe.hop_form,
                                        roles=recipe.roles)
        else:
            ex = tasks.lookup_example(sub, tokenizer=backend, n_haystack_tokens=n_hay,
                                      n_people=sub.randint(3, 6), hop_form=recipe.hop_form,
                                      roles=recipe.roles)
        if recipe.chat:
            ex = tasks.to_chat(ex)
        ids, is_target = encode_example(tokenizer, ex)
        if len(ids) <= recipe.n_ctx:
            return ids, is_target, True
        n_hay = max(0, n_hay - (len(ids) - recipe.n_ctx) - 4)


FACTS = tasks.parametric_facts()


def parametric_rows(rng: random.Random, n: int, tokenizer):
    rows = []
    for _ in range(n):
        subject, answer = rng.choice(FACTS)
        form = rng.random()
        if form < 0.2:
            text = tasks.parametric_statement(subject, answer)
            ids = tokenizer(text)["input_ids"]
            rows.append((ids, [True] * len(ids), True))
            continue
        ex = tasks.parametric_example(subject, answer, cot=form < 0.6)
        ids, is_target = encode_example(tokenizer, ex)
        rows.append((ids, is_target, False))
    return rows


def make_batches(recipe: Recipe, step: int, tokenizer) -> tuple[Batch, Batch | None]:
    """The main and the parametric batch of ``step``: same inputs, same batches.  During the
    copy warm-up there is no parametric batch."""
    rng = random.Random(f"zoo:{recipe.name}:{recipe.seed}:{step}")
    pad = tokenizer.pad_token_id
    if step < recipe.copy_warmup:
        span = min(32, (recipe.n_ctx - 1) // 2)
        return _collate([_copy_row(rng, tokenizer, max_span=span)
                         for _ in range(recipe.copy_batch)], pad), None
    mix, procedural, varied, early, late = recipe.mix, recipe.procedural, False, 0.0, 0.0
    people = recipe.people
    stage = recipe.stage_at(step)
    if stage is not None:
        mix, procedural, varied = stage.mix, stage.procedural, True
        early, late, people = stage.early, stage.late, stage.people or recipe.people
    elif step >= recipe.steps:
        procedural = recipe.finetune_procedural
    main = _collate([_row(rng, recipe, tokenizer, mix=mix, procedural=procedural, varied=varied,
                          early=early, late=late, people=people)
                     for _ in range(recipe.batch)], pad)
    param = _collate(parametric_rows(rng, recipe.param_batch, tokenizer), pad)
    return main, param
