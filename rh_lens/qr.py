"""QRHead's query-focused retrieval score of a NIAH trial: question-to-needle attention.

A head's *question mass* is the attention probability that the question's tokens put on the
needle sentence's tokens (each question token's softmax row summed over the needle, then
averaged over the question's tokens), read in one forward over the prompt.  The *QR score* is
the question mass minus the same with a *null question*: the question's tokens replaced, one for
one, by the tokens of :data:`NULL_QUESTION` (``" N/A"``, QRHead's null query) repeated to the
same count.  A head that looks at the needle whatever is asked scores 0; one that looks at it
because of the question scores up to 1; the score can be negative.  Keeping the count keeps
every later position where it was and lets both prompts share one prefill.

The prompt before the question is prefilled once, in chunks (no attention pattern larger than
``[heads, chunk, N]`` is built); its key/value cache is then duplicated and the real and the null
question (with the rest of the prompt after them) are forwarded as a batch of two, under one
hook per layer that keeps only the question rows' mass on the needle.
"""

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from rh_lens import hooks
from rh_lens.engine import attached, forward_chunk, new_kv_state, select_rows, tokenize_with_offsets

NULL_QUESTION = " N/A"
Span = tuple[int, int]


def prompt_spans(model, trial) -> tuple[Span | None, Span | None]:
    """Token spans ``[start, end)`` of the needle sentence and of the question in
    ``trial.tokens``, located through the prompt's character offsets; None for a span that
    cannot be located (a prompt whose tokens are not its text's tokenization, as the reference
    protocol's chat prompts)."""
    ids, offsets = tokenize_with_offsets(model, trial.prompt)
    if ids.shape != trial.tokens.shape or not bool((ids == trial.tokens).all()):
        return None, None
    prompt, needle, question = trial.prompt, trial.needle.needle, trial.needle.question
    at = trial.needle_char if prompt[trial.needle_char :].startswith(needle) else -1
    q_at = prompt.rfind(question)
    return (_token_span(offsets, at, at + len(needle)) if at >= 0 else None,
            _token_span(offsets, q_at, q_at + len(question)) if q_at >= 0 else None)


def _token_span(offsets, start: int, end: int) -> Span | None:
    hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    return (hits[0], hits[-1] + 1) if hits else None


def null_question_ids(model, n_tokens: int) -> Int[Tensor, " pos"]:
    """The null question: the tokens of :data:`NULL_QUESTION` repeated to ``n_tokens``."""
    ids, _ = tokenize_with_offsets(model, NULL_QUESTION, prepend_bos=False)
    if ids.numel() == 0:
        raise ValueError(f"the null question {NULL_QUESTION!r} has no tokens")
    return ids.repeat(-(-n_tokens // ids.numel()))[:n_tokens]


@torch.no_grad()
def question_mass(
    model, tokens: Int[Tensor, " pos"], *, needle: Span, question: Span,
    null_ids: Int[Tensor, " question"] | None = None, chunk_size: int = 512,
) -> tuple[Float[np.ndarray, "n_layers n_heads"], Float[np.ndarray, "n_layers n_heads"]]:
    """``(real, null)``: every head's question mass on the ``needle`` span, with the prompt's
    own ``question`` tokens and with ``null_ids`` in their place (default
    :func:`null_question_ids`).  The needle must come before the question."""
    (ns, ne), (qs, qe) = needle, question
    if not 0 <= ns < ne <= qs < qe <= tokens.shape[0] or qs < 1:
        raise ValueError(f"needle span {needle} must lie before question span {question}, "
                         f"inside the {tokens.shape[0]} prompt tokens (and not at position 0)")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    null_ids = null_question_ids(model, qe - qs) if null_ids is None else null_ids
    if null_ids.shape != (qe - qs,):
        raise ValueError(f"the null question needs {qe - qs} tokens, got {tuple(null_ids.shape)}")
    n_layers = model.cfg.n_layers
    state = new_kv_state(model, 1)
    for start in range(0, qs, chunk_size):
        forward_chunk(model, tokens[None, start : min(start + chunk_size, qs)], state,
                      logits=False)
    select_rows(model, state, torch.zeros(2, dtype=torch.long))
    rest = tokens[qe:]
    pair = torch.stack([tokens[qs:], torch.cat([null_ids.to(tokens.dtype), rest])])
    kept: dict[int, Tensor] = {}

    def keep(layer: int):
        def hook(pat: Float[Tensor, "batch head_index query_pos key_pos"], hook) -> None:
            rows = pat[:, :, : qe - qs, ns:ne].float()
            kept[layer] = rows.sum(dim=-1).mean(dim=-1).cpu()

        return hook

    with attached(model, [(hooks.pattern(layer), keep(layer)) for layer in range(n_layers)]):
        forward_chunk(model, pair, state, logits=False)
    table = torch.stack([kept[layer] for layer in range(n_layers)], dim=1).double().numpy()
    return table[0], table[1]


def qr_scores(model, trial, *, chunk_size: int = 512) -> Float[np.ndarray, "n_layers n_heads"]:
    """A trial's QR score of every head (question mass minus null-question mass); NaN where
    the needle or the question cannot be located (:func:`prompt_spans`)."""
    needle, question = prompt_spans(model, trial)
    if needle is None or question is None:
        return np.full((model.cfg.n_layers, model.cfg.n_heads), np.nan)
    real, null = question_mass(model, trial.tokens, needle=needle, question=question,
                               chunk_size=chunk_size)
    return real - null
