"""Greedy decoding that records every head's top-1 key position at every step.

The prompt is prefilled once into the key/value cache in chunks of ``chunk_size`` tokens, so no
attention tensor larger than ``[heads, chunk, N]`` is built; then each step forwards one token
with one hook per layer that reduces the current query's attention row to its argmax for all
heads at once.  ``decode_slow`` is the obvious implementation (rerun the whole sequence with
``run_with_cache`` at every step, loop over layers and heads in Python): tests hold the fast
path to it, and ``rh_lens.benchmark`` measures the speed-up.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from rh_lens import hooks
from rh_lens.models import check_context, forward_chunk, new_kv_state

Stop = Literal["newline", "eos"]


@dataclass(frozen=True)
class Decoded:
    """What one sequence generated, and where each head looked while generating it.

    ``positions[t, l, h]`` is the key position of head ``(l, h)``'s largest attention weight
    for the query that produced ``tokens[t]``.  The stop token (a newline) is included.
    """

    tokens: Int[np.ndarray, " step"]
    positions: Int[np.ndarray, "step n_layers n_heads"]
    text: str


def is_stop_token(model, token_id: int, *, stop: Stop = "newline") -> bool:
    """Decoding stops at end-of-sequence and, with ``stop="newline"`` (the reference), at a
    token containing a newline."""
    if token_id == model.tokenizer.eos_token_id:
        return True
    return stop == "newline" and "\n" in model.tokenizer.decode([token_id])


@torch.no_grad()
def decode_greedy(
    model,
    prompts: Int[Tensor, "batch pos"],
    *,
    max_new_tokens: int = 50,
    chunk_size: int = 512,
    record: bool = True,
    prefill_hooks: Sequence[tuple[str, Callable]] = (),
    decode_hooks: Sequence[tuple[str, Callable]] = (),
    stop: Stop = "newline",
) -> list[Decoded]:
    """Greedy decoding of equal-length prompts with a chunked prefill.

    As in the reference, all prompt tokens but the last are prefilled (under
    ``prefill_hooks``); every forward that predicts a new token, the last prompt token's and
    each generated token's, runs under ``decode_hooks``.  Ablating "decode steps only", as the
    paper does, is therefore ``decode_hooks`` alone.  With ``record=False`` and no hooks this
    is plain cached generation: the benchmark's baseline.  ``stop="eos"`` decodes across
    newlines (multi-line chain-of-thought answers) until end-of-sequence or the cap.
    """
    if prompts.ndim != 2:
        raise ValueError(f"prompts must be [batch, pos], got shape {tuple(prompts.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if stop not in ("newline", "eos"):
        raise ValueError(f"stop must be 'newline' or 'eos', got {stop!r}")
    batch, n_prompt = prompts.shape
    check_context(model, n_prompt + max_new_tokens, what="prompt plus new tokens")
    n_layers = model.cfg.n_layers
    recorder = hooks.LastQueryArgmax(n_layers)
    state = new_kv_state(model, batch)
    steps_tokens: list[Tensor] = []
    steps_positions: list[Tensor] = []
    done = torch.zeros(batch, dtype=torch.bool)
    lengths = torch.full((batch,), max_new_tokens, dtype=torch.long)
    with model.hooks(fwd_hooks=list(prefill_hooks)):
        for start in range(0, n_prompt - 1, chunk_size):
            forward_chunk(model, prompts[:, start : min(start + chunk_size, n_prompt - 1)], state)
    recording = recorder.hooks if record else []
    with model.hooks(fwd_hooks=[*recording, *decode_hooks]):
        logits = forward_chunk(model, prompts[:, -1:], state)
        for step in range(max_new_tokens):
            next_ids = logits[:, -1].argmax(dim=-1).cpu()
            steps_tokens.append(next_ids)
            if record:
                steps_positions.append(recorder.table().cpu())
            for b in range(batch):
                if not done[b] and is_stop_token(model, int(next_ids[b]), stop=stop):
                    done[b] = True
                    lengths[b] = step + 1
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            logits = forward_chunk(model, next_ids[:, None], state)
    tokens = torch.stack(steps_tokens, dim=1)
    positions = (
        torch.stack(steps_positions, dim=1)
        if record
        else torch.zeros((batch, tokens.shape[1], n_layers, model.cfg.n_heads), dtype=torch.long)
    )
    out = []
    for b in range(batch):
        n = int(lengths[b])
        ids = tokens[b, :n]
        out.append(Decoded(
            ids.numpy().astype(np.int64),
            positions[b, :n].numpy().astype(np.int32),
            model.tokenizer.decode(ids.tolist()),
        ))
    return out


@torch.no_grad()
def decode_slow(model, prompt: Int[Tensor, " pos"], *, max_new_tokens: int = 50) -> Decoded:
    """The obvious implementation: full forward per step, Python loop over layers and heads."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    names = [hooks.pattern(layer) for layer in range(n_layers)]
    sequence = prompt.tolist()
    check_context(model, len(sequence) + max_new_tokens, what="prompt plus new tokens")
    emitted, positions = [], []
    for _ in range(max_new_tokens):
        logits, cache = model.run_with_cache(
            torch.tensor([sequence]), names_filter=lambda name: name in names
        )
        next_id = int(logits[0, -1].argmax())
        table = np.zeros((n_layers, n_heads), dtype=np.int32)
        for layer in range(n_layers):
            row = cache[names[layer]][0, :, -1]
            for head in range(n_heads):
                table[layer, head] = int(row[head].argmax())
        emitted.append(next_id)
        positions.append(table)
        sequence.append(next_id)
        if is_stop_token(model, next_id):
            break
    return Decoded(
        np.array(emitted, dtype=np.int64),
        np.stack(positions),
        model.tokenizer.decode(emitted),
    )
