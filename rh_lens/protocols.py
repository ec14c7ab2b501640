"""Detection protocols: how a NIAH trial's prompt is built, where its answer span lies, and when
decoding stops.

- ``paper`` (the default): rh_lens's own, :func:`rh_lens.niah.build_trial`; the answer span is
  located by character offsets, decoding stops at a newline or end-of-sequence.
- ``reference``: the paper's released detection code, step by step and defects included, for
  comparing with its released ``head_score`` files:

  * the haystack's text, repeated whole until it holds as many whitespace-separated words as the
    sweep's longest context length, is tokenized *with* the tokenizer's special tokens (a BOS),
    cut to the context length and decoded back to text, special tokens and all;
  * the needle, tokenized the same way (its own BOS included), goes ``int(n * depth / 100)``
    tokens into the haystack's ``n`` tokens, moved back to just after a period token, or last at
    depth 100; the haystack is first cut so that haystack and needle fill ``context_length -
    buffer`` tokens.  The reference hard-codes Llama-2's two period ids (``.`` and ``▁.``); here
    they are the same two tokens of the model's own vocabulary (:func:`period_ids`);
  * the result is decoded to text and the prompt, ``{context}Based on the content of the book,
    Question: {question}\\nAnswer:`` (with ``chat``, the user turn ``<book>{context}</book>\\n...``
    of the chat template), is tokenized again;
  * the answer span is the first window of as many tokens as the answer has (tokenized alone)
    whose token *set* holds more than 90 % of the answer's distinct tokens (:func:`find_span`).
    With a BPE tokenizer the answer often tokenizes otherwise inside the context; such a trial
    has the span :data:`NOT_FOUND` and is reported, never scored (the reference scores it 0);
  * decoding stops only at the Llama sentencepiece newline (``<0x0A>``) or token id 144, else
    after ``max_new_tokens``; end-of-sequence does not stop it (:func:`reference_stop`);
  * ROUGE reads the generation decoded without special tokens and stripped (:func:`response`).

The haystack's tokens cut to each context length, the needle's and the answer's tokens and the
period ids are shared by a sweep's trials and memoized per tokenizer, as
:func:`rh_lens.niah.build_trial` memoizes its cuts (:data:`rh_lens.niah.TRIAL_MEMO`); each
trial's prompt is tokenized afresh.
"""

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from jaxtyping import Int

from rh_lens._memo import value_key
from rh_lens.errors import ContextTooLongError
from rh_lens.niah import (
    BASE_TEMPLATE,
    TRIAL_MEMO,
    Haystack,
    Needle,
    NeedleError,
    TextHaystack,
    Trial,
    build_trial,
)

Protocol = Literal["paper", "reference"]
PROTOCOLS: tuple[Protocol, ...] = ("paper", "reference")
NOT_FOUND = (-1, -1)
SPAN_OVERLAP = 0.9  # the reference's share of the answer's distinct tokens a window must hold
REFERENCE_NEWLINE = "<0x0A>"
REFERENCE_STOP_ID = 144
REFERENCE_CHAT = ("<book>{context}</book>\nBased on the content of the book, "
                  "Question: {question}\nAnswer:")


def check_protocol(protocol: str) -> Protocol:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    return protocol


def span_found(span: Sequence[int]) -> bool:
    return tuple(span) != NOT_FOUND


def build(protocol: Protocol, model, needle: Needle, haystack: Haystack, *, context_length: int,
          depth: float, buffer: int, max_new_tokens: int, chat: bool,
          lengths: Sequence[int]) -> Trial:
    """One trial under ``protocol``; ``lengths`` are the sweep's context lengths (the reference
    reads as much haystack as the longest needs)."""
    if check_protocol(protocol) == "paper":
        return build_trial(model, needle, haystack, context_length=context_length, depth=depth,
                           buffer=buffer, max_new_tokens=max_new_tokens, chat=chat)
    return build_reference_trial(model, needle, haystack, context_length=context_length,
                                 depth=depth, buffer=buffer, max_new_tokens=max_new_tokens,
                                 chat=chat, max_length=max(lengths))


def stop_rule(protocol: Protocol) -> str:
    """The :func:`rh_lens.decode.decode_greedy` ``stop`` of ``protocol``."""
    return "newline" if check_protocol(protocol) == "paper" else "reference"


def response(protocol: Protocol, tokenizer, tokens: Int[np.ndarray, " step"], text: str) -> str:
    """The generated text that ROUGE reads: ``text`` as decoded, or the reference's."""
    if check_protocol(protocol) == "paper":
        return text
    return tokenizer.decode(tokens.tolist(), skip_special_tokens=True).strip()


# --------------------------------------------------------------------------------------------
# The reference's pieces


def reference_stop(tokenizer, token_id: int) -> bool:
    return token_id == REFERENCE_STOP_ID or (
        tokenizer.convert_ids_to_tokens(int(token_id)) == REFERENCE_NEWLINE)


def period_ids(tokenizer) -> frozenset[int]:
    """Ids of the tokens that are a period, alone or after a word boundary (``.``, ``▁.``,
    ``Ġ.``): for Llama-2 the reference's 29889 and 869, for Mistral its 842 and 28723."""
    return TRIAL_MEMO.get(tokenizer, ("periods",), lambda: _period_ids(tokenizer))


def _period_ids(tokenizer) -> frozenset[int]:
    found = set()
    for token, index in tokenizer.get_vocab().items():
        if "." in token and tokenizer.convert_tokens_to_string([token]).strip() == ".":
            found.add(int(index))
    return frozenset(found)


def reference_haystack(haystack: Haystack, max_length: int, tokenizer) -> str:
    """The haystack text the reference reads: its files' text (a :class:`TextHaystack`'s
    ``source``) repeated whole until it holds ``max_length`` words.  A generated haystack
    stands for a file holding more of its text than any trial uses."""
    if isinstance(haystack, TextHaystack):
        if not haystack.source.split():
            raise NeedleError(f"haystack {haystack.name!r} holds no words")
        text = haystack.source
        while len(text.split()) < max_length:
            text += haystack.source
        return text
    n_chars = 8 * max_length + 64
    for _ in range(12):
        text = haystack.text(n_chars)
        if (len(text.split()) >= max_length
                and len(tokenizer(text, add_special_tokens=False)["input_ids"]) > 2 * max_length):
            return text
        n_chars *= 2
    raise NeedleError(f"haystack {haystack.name!r} gives too little text for {max_length} tokens")


def find_span(prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> tuple[int, int]:
    """The reference's span: the first ``i`` whose window ``prompt_ids[i : i + len(answer)]``
    holds more than 90 % of the answer's distinct ids, as ``(i, i + len(answer))``; else
    :data:`NOT_FOUND`.  One prefix count per distinct id, not a set per window."""
    n, width = len(prompt_ids), len(answer_ids)
    distinct = sorted(set(int(a) for a in answer_ids))
    if not distinct or n == 0:
        return NOT_FOUND
    ids = np.asarray(prompt_ids, dtype=np.int64)
    starts = np.arange(n)
    ends = np.minimum(starts + width, n)
    present = np.zeros(n, dtype=np.int64)
    for a in distinct:
        counts = np.concatenate([[0], np.cumsum(ids == a)])
        present += (counts[ends] - counts[starts]) > 0
    hits = np.flatnonzero(present.astype(np.float64) / len(distinct) > SPAN_OVERLAP)
    return (int(hits[0]), int(hits[0]) + width) if hits.size else NOT_FOUND


def build_reference_trial(model, needle: Needle, haystack: Haystack, *, context_length: int,
                          depth: float, buffer: int = 200, max_new_tokens: int = 50,
                          chat: bool = False, max_length: int | None = None) -> Trial:
    """The reference's prompt for one cell (see the module docstring) and its answer span
    (:data:`NOT_FOUND` when no window overlaps enough)."""
    if not 0 <= depth <= 100:
        raise ValueError(f"depth must be a percentage in [0, 100], got {depth}")
    if buffer < 0 or context_length <= buffer:
        raise ValueError(f"context_length ({context_length}) must exceed buffer ({buffer})")
    tok = model.tokenizer
    context_ids = list(_reference_context(tok, haystack, max_length or context_length,
                                          context_length))
    needle_ids = list(_encoded(tok, needle.needle))
    room = context_length - buffer - len(needle_ids)
    if room < 0:
        raise NeedleError(f"needle takes {len(needle_ids)} tokens, more than context_length - "
                          f"buffer = {context_length - buffer}")
    if len(context_ids) > room:
        context_ids = context_ids[:room]
    if depth == 100:
        tokens = context_ids + needle_ids
    else:
        at = int(len(context_ids) * (depth / 100))
        periods = period_ids(tok)
        while at > 0 and context_ids[at - 1] not in periods:
            at -= 1
        tokens = context_ids[:at] + needle_ids + context_ids[at:]
    context = tok.decode(tokens)
    if chat:
        prompt_ids = tok.apply_chat_template(
            [{"role": "user", "content": REFERENCE_CHAT.format(context=context,
                                                               question=needle.question)}],
            tokenize=True, add_generation_prompt=True)
        if not isinstance(prompt_ids, list):  # a BatchEncoding
            prompt_ids = prompt_ids["input_ids"]
        prompt = tok.decode(prompt_ids)
    else:
        prompt = BASE_TEMPLATE.format(context=context, question=needle.question)
        prompt_ids = tok(prompt)["input_ids"]
    total = len(prompt_ids) + max_new_tokens
    if total > model.cfg.n_ctx:
        raise ContextTooLongError(
            f"prompt of {len(prompt_ids)} tokens plus {max_new_tokens} new tokens exceeds n_ctx="
            f"{model.cfg.n_ctx}; lower context_length or raise buffer")
    span = find_span(prompt_ids, _encoded(tok, needle.answer, special=False))
    return Trial(context_length, float(depth), torch.tensor(prompt_ids, dtype=torch.long), span,
                 prompt.find(needle.needle), prompt, needle)


def _encoded(tok, text: str, *, special: bool = True) -> tuple[int, ...]:
    """``text``'s ids, with the tokenizer's special tokens or without (memoized)."""
    return TRIAL_MEMO.get(tok, ("encode", text, special),
                          lambda: tuple(tok.encode(text, add_special_tokens=special)))


def _reference_context(tok, haystack: Haystack, max_length: int,
                       context_length: int) -> tuple[int, ...]:
    """The reference's haystack ids for one context length: its text (:func:`reference_haystack`)
    tokenized with special tokens, cut to ``context_length`` ids, decoded and tokenized again
    (memoized per tokenizer when the haystack is a frozen dataclass)."""
    def full() -> tuple[int, ...]:
        return tuple(tok.encode(reference_haystack(haystack, max_length, tok)))

    def context() -> tuple[int, ...]:
        ids = memo(("reference-ids", haystack, max_length), full)
        if len(ids) <= context_length:
            return ids
        return tuple(tok.encode(tok.decode(list(ids[:context_length]))))

    def memo(key, compute):
        return TRIAL_MEMO.get(tok, key, compute) if value_key(haystack) else compute()

    return memo(("reference-context", haystack, max_length, context_length), context)
