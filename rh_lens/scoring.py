"""Retrieval scores as pure functions of recorded attention: no model, no hooks.

At decoding step ``t`` the model emits token ``w_t``; each head's top-1 key position ``j`` for
the query that produced ``w_t`` is recorded.  The head *copies* at step ``t`` when ``j`` lies in
the answer span ``[s, e)`` of the prompt and the token at ``j`` equals ``w_t``.

- step score (the reference code): copying steps / (e - s); can exceed 1 when a token is copied
  twice.
- set score (the paper's formula): distinct answer token ids copied / distinct token ids in the
  answer, in [0, 1].
- activation: the head copied at least one token.
- span mass (the "needle mass" score): the attention probability that the current query puts
  on the answer span (its softmax row summed over ``[s, e)``), averaged over decoding steps;
  in [0, 1], from the same rows as the copy events (:func:`span_mass`).

A trial counts only when it succeeded: ROUGE-1 recall (with Porter stemming, as the reference's
``rouge_score`` use) of the answer in the generated text above 0.5.
"""

import re
from collections import Counter
from functools import lru_cache

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

SUCCESS_THRESHOLD = 0.5


def copy_events(
    positions: Int[Tensor, "step n_layers n_heads"],
    emitted: Int[Tensor, " step"],
    sequence: Int[Tensor, " pos"],
    span: tuple[int, int],
) -> Bool[Tensor, "step n_layers n_heads"]:
    """Where each head's top-1 key lies in the answer span and holds the emitted token."""
    start, end = span
    in_span = (positions >= start) & (positions < end)
    token_at = sequence[positions.clamp(0, sequence.shape[0] - 1)]
    return in_span & (token_at == emitted[:, None, None])


def step_scores(
    copies: Bool[Tensor, "step n_layers n_heads"], span: tuple[int, int]
) -> Float[Tensor, "n_layers n_heads"]:
    return copies.sum(dim=0, dtype=torch.float64) / (span[1] - span[0])


def set_scores(
    copies: Bool[Tensor, "step n_layers n_heads"],
    emitted: Int[Tensor, " step"],
    sequence: Int[Tensor, " pos"],
    span: tuple[int, int],
) -> Float[Tensor, "n_layers n_heads"]:
    """Share of the answer's distinct token ids that each head copied at least once."""
    answer_ids = torch.unique(sequence[span[0] : span[1]])
    # [step, id]: the emitted token at this step is that answer id
    is_id = emitted[:, None] == answer_ids[None, :]
    copied = torch.einsum("tlh,ti->lhi", copies.double(), is_id.double()) > 0
    return copied.sum(dim=-1, dtype=torch.float64) / answer_ids.numel()


def activation(copies: Bool[Tensor, "step n_layers n_heads"]) -> Bool[Tensor, "n_layers n_heads"]:
    return copies.any(dim=0)


def span_mass(
    rows: Float[Tensor, "batch head_index key_pos"], spans: Int[Tensor, "batch 2"]
) -> Float[Tensor, "batch head_index"]:
    """Each row's attention probability summed over its own key columns ``[start, end)``
    (float32 whatever the rows' dtype).  One span (a batch of one) is a slice."""
    if spans.shape[0] == 1:
        start, end = (int(v) for v in spans[0])
        return rows[..., max(start, 0) : max(end, 0)].sum(dim=-1, dtype=torch.float32)
    cols = torch.arange(rows.shape[-1], device=rows.device)
    spans = spans.to(rows.device)
    inside = (cols >= spans[:, :1]) & (cols < spans[:, 1:])  # [batch, key_pos]
    return (rows.float() * inside[:, None, :]).sum(dim=-1)


def mass_scores(mass: Float[Tensor, "step n_layers n_heads"]) -> Float[Tensor, "n_layers n_heads"]:
    """The span mass of every decoding step, averaged over steps."""
    return mass.double().mean(dim=0)


# --------------------------------------------------------------------------------------------
# ROUGE-1 recall, as rouge_score.RougeScorer(["rouge1"], use_stemmer=True) computes it


_NON_ALPHANUM = re.compile(r"[^a-z0-9]+")
_SPACES = re.compile(r"\s+")
_VALID = re.compile(r"^[a-z0-9]+$")


@lru_cache(maxsize=1)
def _stemmer():
    from nltk.stem import porter

    return porter.PorterStemmer()


@lru_cache(maxsize=65536)
def _stem(word: str) -> str:
    return _stemmer().stem(word)


def rouge_tokens(text: str, *, stem: bool = True) -> list[str]:
    """Lower-case, split on non-alphanumerics, Porter-stem words longer than 3 characters."""
    words = _SPACES.split(_NON_ALPHANUM.sub(" ", text.lower()))
    if stem:
        words = [_stem(w) if len(w) > 3 else w for w in words]
    return [w for w in words if _VALID.match(w)]


def rouge1_recall(reference: str, generated: str, *, stem: bool = True) -> float:
    """Unigram recall of ``reference`` in ``generated`` (clipped counts)."""
    ref = Counter(rouge_tokens(reference, stem=stem))
    gen = Counter(rouge_tokens(generated, stem=stem))
    overlap = sum(min(n, gen[w]) for w, n in ref.items())
    return overlap / max(sum(ref.values()), 1)


def succeeded(recall: float) -> bool:
    """The reference's filter, written as it does: ROUGE-1 recall x 100 > 50."""
    return recall * 100 > SUCCESS_THRESHOLD * 100
