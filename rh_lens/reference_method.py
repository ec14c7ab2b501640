"""The reference implementation's way of decoding for detection, on a Hugging Face model, and
plain cached greedy generation (the floor any detection method is measured against).

The paper's code prefills all prompt tokens but the last with a fused attention kernel, in one
piece and with the logits of every position, then decodes token by token with eager attention
and ``output_attentions=True``, so that every layer returns its ``[heads, 1, key_pos]`` attention
row, and loops over layers x heads in Python taking ``topk(1)`` of each head's row.  Here:

- :func:`reference_prefill` + :func:`reference_decode` (:func:`reference_detect` runs both): that
  method, faithfully, with SDPA as the fused prefill kernel; each head's top-1 position is read
  back to the host one head at a time, as the reference's comparison with the needle span does;
- :func:`greedy_prefill` + :func:`greedy_decode` (:func:`hf_greedy` runs both): the floor, SDPA
  throughout, the prefill keeping only the last position's logits (as ``generate`` does), no
  attention weights.

Only the decoding method is reproduced here (how it prefills, decodes and reads attention); the
retrieval score of the positions is :mod:`rh_lens.scoring`'s.  Both return
:class:`rh_lens.decode.Decoded`, comparable with :func:`rh_lens.decode.decode_greedy` on the
same weights (:mod:`rh_lens.hf_export` gives the Hugging Face model of a loaded one).
"""

import contextlib
from collections.abc import Callable

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor, nn

from rh_lens._bridge import _cache_kwarg
from rh_lens.decode import Decoded

__all__ = ["greedy_decode", "greedy_prefill", "hf_greedy", "reference_decode",
           "reference_detect", "reference_prefill"]

StopRule = Callable[[int], bool]


@contextlib.contextmanager
def attention_implementation(hf_model: nn.Module, name: str):
    """Run ``hf_model`` with attention implementation ``name`` (``"sdpa"``, ``"eager"``)."""
    before = hf_model.config._attn_implementation
    if before != name:
        hf_model.set_attn_implementation(name)
    try:
        yield
    finally:
        if before != name:
            hf_model.set_attn_implementation(before)


def _check_prompt(prompt: Tensor) -> None:
    if prompt.ndim != 2 or prompt.shape[0] != 1 or prompt.shape[1] < 2:
        raise ValueError(f"prompt must be [1, pos] with pos >= 2, got {tuple(prompt.shape)}")


@torch.no_grad()
def _prefill(hf_model: nn.Module, prompt: Int[Tensor, "1 pos"], *, all_logits: bool):
    from transformers import DynamicCache

    _check_prompt(prompt)
    cache = DynamicCache()
    ids = prompt[:, :-1].to(hf_model.device)
    keep = {} if all_logits else {"logits_to_keep": 1}
    with attention_implementation(hf_model, "sdpa"):
        hf_model(input_ids=ids, use_cache=True, **{_cache_kwarg(hf_model): cache}, **keep)
    return cache


def reference_prefill(hf_model: nn.Module, prompt: Int[Tensor, "1 pos"]):
    """The reference's prefill: all prompt tokens but the last, in one SDPA forward that
    computes the logits of every position; returns the key/value cache."""
    return _prefill(hf_model, prompt, all_logits=True)


def greedy_prefill(hf_model: nn.Module, prompt: Int[Tensor, "1 pos"]):
    """The floor's prefill: the same forward keeping only the last position's logits."""
    return _prefill(hf_model, prompt, all_logits=False)


@torch.no_grad()
def _decode(hf_model: nn.Module, cache, prompt: Int[Tensor, "1 pos"], *, max_new_tokens: int,
            stop: StopRule | None, record: bool, tokenizer=None) -> Decoded:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    config = hf_model.config
    n_layers, n_heads = config.num_hidden_layers, config.num_attention_heads
    token = prompt[:, -1:].to(hf_model.device)
    emitted, positions = [], []
    kw = {_cache_kwarg(hf_model): cache}
    with attention_implementation(hf_model, "eager" if record else "sdpa"):
        for _ in range(max_new_tokens):
            out = hf_model(input_ids=token, use_cache=True, output_attentions=record, **kw)
            token = out.logits[0, -1].argmax().view(1, 1)
            next_id = int(token)
            emitted.append(next_id)
            if record:
                table = np.zeros((n_layers, n_heads), dtype=np.int32)
                for layer in range(n_layers):
                    for head in range(n_heads):
                        _, idx = out.attentions[layer][0][head][-1].topk(1)
                        table[layer, head] = int(idx[0])
                positions.append(table)
            if stop is not None and stop(next_id):
                break
    table_shape = (len(emitted), n_layers, n_heads)
    return Decoded(
        np.array(emitted, dtype=np.int64),
        np.stack(positions) if record else np.zeros(table_shape, dtype=np.int32),
        tokenizer.decode(emitted) if tokenizer is not None else "",
    )


def reference_decode(hf_model: nn.Module, cache, prompt: Int[Tensor, "1 pos"], *,
                     max_new_tokens: int = 50, stop: StopRule | None = None,
                     tokenizer=None) -> Decoded:
    """The reference's decode loop after :func:`reference_prefill`: from the last prompt token,
    one eager forward per token with ``output_attentions=True``, then ``topk(1)`` of the current
    query's row for every layer and head in a Python loop.  Stops after ``max_new_tokens`` or
    at the first token for which ``stop(token_id)`` holds (included)."""
    return _decode(hf_model, cache, prompt, max_new_tokens=max_new_tokens, stop=stop,
                   record=True, tokenizer=tokenizer)


def greedy_decode(hf_model: nn.Module, cache, prompt: Int[Tensor, "1 pos"], *,
                  max_new_tokens: int = 50, stop: StopRule | None = None,
                  tokenizer=None) -> Decoded:
    """Plain cached greedy decoding after :func:`greedy_prefill` (SDPA, no attention weights);
    ``positions`` are all zero."""
    return _decode(hf_model, cache, prompt, max_new_tokens=max_new_tokens, stop=stop,
                   record=False, tokenizer=tokenizer)


def reference_detect(hf_model: nn.Module, prompt: Int[Tensor, "1 pos"], *,
                     max_new_tokens: int = 50, stop: StopRule | None = None,
                     tokenizer=None) -> Decoded:
    """:func:`reference_prefill` then :func:`reference_decode`."""
    cache = reference_prefill(hf_model, prompt)
    return reference_decode(hf_model, cache, prompt, max_new_tokens=max_new_tokens, stop=stop,
                            tokenizer=tokenizer)


def hf_greedy(hf_model: nn.Module, prompt: Int[Tensor, "1 pos"], *, max_new_tokens: int = 50,
              stop: StopRule | None = None, tokenizer=None) -> Decoded:
    """:func:`greedy_prefill` then :func:`greedy_decode`."""
    cache = greedy_prefill(hf_model, prompt)
    return greedy_decode(hf_model, cache, prompt, max_new_tokens=max_new_tokens, stop=stop,
                         tokenizer=tokenizer)
