"""Greedy decoding that records every head's top-1 key position at every step.

The prompt is prefilled once into the key/value cache in chunks of ``chunk_size`` tokens, so no
attention tensor larger than ``[heads, chunk, N]`` is built; then each step forwards one token
with one hook per layer that reduces the current query's attention row to its argmax for all
heads at once.  ``decode_slow`` is the obvious implementation (rerun the whole sequence with
``run_with_cache`` at every step, loop over layers and heads in Python): tests hold the fast
path to it, and ``rh_lens.benchmark`` measures the speed-up.
"""

import contextlib
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from rh_lens import hooks
from rh_lens.engine import forward_reads, reads_whole_chunks, select_rows
from rh_lens.models import check_context, forward_chunk, new_kv_state
from rh_lens.protocols import reference_stop

Stop = Literal["newline", "eos", "reference"]


@dataclass(frozen=True)
class Decoded:
    """What one sequence generated, and where each head looked while generating it.

    ``positions[t, l, h]`` is the key position of head ``(l, h)``'s largest attention weight
    for the query that produced ``tokens[t]``.  The stop token (a newline) is included.
    ``span_mass[t, l, h]`` (decoded with ``spans`` only) is that query's attention mass on the
    row's span (:func:`rh_lens.scoring.span_mass`).
    """

    tokens: Int[np.ndarray, " step"]
    positions: Int[np.ndarray, "step n_layers n_heads"]
    text: str
    span_mass: Float[np.ndarray, "step n_layers n_heads"] | None = None


_PHASES: list[dict[str, float]] = []  # the innermost :func:`phase_times` block's clock


@contextlib.contextmanager
def phase_times() -> Iterator[dict[str, float]]:
    """Within the block, :func:`decode_greedy` adds the process CPU seconds of its prefill
    forwards (``"prefill"``: every prompt chunk, the last prompt token's forward included when
    it goes with them) and of its decode steps (``"steps"``: the forwards after the prompt's, and
dropping finished rows from the cache) to the yielded dict.  What
    is left of a caller's time is building prompts, choosing tokens and scoring.
    """
    clock = {"prefill": 0.0, "steps": 0.0}
    _PHASES.append(clock)
    try:
        yield clock
    finally:
        _PHASES.remove(clock)


@contextlib.contextmanager
def _timed(phase: str) -> Iterator[None]:
    if not _PHASES:
        yield
        return
    start = time.process_time()
    try:
        yield
    finally:
        _PHASES[-1][phase] += time.process_time() - start


_STOP_CACHE: "weakref.WeakKeyDictionary[object, dict[int, bool]]" = weakref.WeakKeyDictionary()


def is_stop_token(model, token_id: int, *, stop: Stop = "newline") -> bool:
    """Decoding stops at end-of-sequence and, with ``stop="newline"``, at a token containing a
    newline; ``stop="reference"`` is the reference code's rule alone
    (:func:`rh_lens.protocols.reference_stop`).  Each token id is decoded once per tokenizer;
    later tests of the same id are a dictionary look-up."""
    tok = model.tokenizer
    if stop == "reference":
        return reference_stop(tok, token_id)
    if token_id == tok.eos_token_id:
        return True
    if stop != "newline":
        return False
    try:
        known = _STOP_CACHE.setdefault(tok, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced
        known = {}
    newline = known.get(token_id)
    if newline is None:
        newline = known[token_id] = "\n" in tok.decode([token_id])
    return newline


def left_pad(
    prompts: Sequence[Tensor], pad_id: int
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"] | None, Int[Tensor, " batch"]]:
    """Right-align prompts of different lengths: ``(tokens, mask, n_pad)``, where ``mask`` is
    None when every prompt has the same length and ``n_pad[b]`` counts row b's padding."""
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    if lengths.min() < 1:
        raise ValueError("every prompt needs at least one token")
    width = int(lengths.max())
    n_pad = width - lengths
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, prompt in enumerate(prompts):
        tokens[b, int(n_pad[b]) :] = prompt
        mask[b, int(n_pad[b]) :] = 1
    return tokens, (None if bool(mask.all()) else mask), n_pad


@torch.no_grad()
def decode_greedy(
    model,
    prompts: Int[Tensor, "batch pos"] | Sequence[Tensor],
    *,
    max_new_tokens: int = 50,
    chunk_size: int = 512,
    record: bool = True,
    prefill_hooks: Sequence[tuple[str, Callable]] = (),
    decode_hooks: Sequence[tuple[str, Callable]] = (),
    stop: Stop = "newline",
    spans: Sequence[tuple[int, int]] | None = None,
) -> list[Decoded]:
    """Greedy decoding of a batch of prompts with a chunked prefill.

    ``prompts`` is a ``[batch, pos]`` tensor or a sequence of 1-D prompts of any lengths;
    prompts of different lengths are left-padded, with an attention mask that hides the
    padding and position ids that count real tokens only, so each row decodes what it decodes
    alone and its recorded positions index its own prompt (padding is never an argmax: its
    attention weight is exactly 0).  A row that has stopped leaves the batch.  Hooks address
    positions, so they need prompts of one length; under ``decode_hooks`` rows stay in the
    batch to the end (a hook may hold per-row state).

    As in the reference, all prompt tokens but the last are prefilled (under
    ``prefill_hooks``); every forward that predicts a new token, the last prompt token's and
    each generated token's, runs under ``decode_hooks``.  Ablating "decode steps only", as the
    paper does, is therefore ``decode_hooks`` alone.  With no hooks at all, an engine whose
    forward of a whole chunk reads the argmax at no extra cost
    (:func:`rh_lens.engine.reads_whole_chunks`) forwards the last prompt token with the last
    chunk instead, which is what a forward of the whole prompt computes for it (the slow
    reference's first step) and saves a step.  With ``record=False`` and no hooks this
    is plain cached generation: the benchmark's baseline.  ``stop="eos"`` decodes across
    newlines (multi-line chain-of-thought answers) until end-of-sequence or the cap.

    ``spans`` (one ``(start, end)`` of prompt positions per prompt) also records, at every
    step, each head's attention mass on its row's span, in the same reduction as the argmax
    (``Decoded.span_mass``); without it nothing more is computed.
    """
    if isinstance(prompts, Tensor) and prompts.ndim != 2:
        raise ValueError(f"prompts must be [batch, pos], got shape {tuple(prompts.shape)}")
    if not isinstance(prompts, Tensor) and any(p.ndim != 1 for p in prompts):
        raise ValueError("a sequence of prompts must hold 1-D token tensors")
    if len(prompts) == 0:
        raise ValueError("no prompts to decode")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if stop not in ("newline", "eos", "reference"):
        raise ValueError(f"stop must be 'newline', 'eos' or 'reference', got {stop!r}")
    if spans is not None and (len(spans) != len(prompts) or not record):
        raise ValueError(f"spans needs record=True and one (start, end) per prompt: {len(spans)} "
                         f"spans for {len(prompts)} prompts")
    if isinstance(prompts, Tensor):
        tokens, mask, n_pad = prompts, None, torch.zeros(len(prompts), dtype=torch.long)
    else:
        tokens, mask, n_pad = left_pad(prompts, _pad_id(model))
    if mask is not None and (prefill_hooks or decode_hooks):
        raise ValueError("prompts of different lengths cannot be decoded under hooks (hooks "
                         "address positions, which left padding shifts); batch prompts of "
                         "equal length")
    batch, width = tokens.shape
    check_context(model, int((width - n_pad).max()) + max_new_tokens,
                  what="prompt plus new tokens")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    state = new_kv_state(model, batch)
    emitted: list[list[int]] = [[] for _ in range(batch)]
    looked: list[list[Tensor]] = [[] for _ in range(batch)]
    massed: list[list[Tensor]] = [[] for _ in range(batch)]
    columns = None if spans is None else (  # span columns, padding included
        torch.tensor([list(sp) for sp in spans], dtype=torch.long).reshape(-1, 2) + n_pad[:, None])
    rows = torch.arange(batch)  # the original index of each row still in the batch
    shrink = not decode_hooks
    # Unhooked, an engine that reads a whole chunk at no extra cost forwards the last prompt
    # token with the prompt's last chunk; otherwise it is the first decode step (under the
    # decode hooks), as in the reference.
    whole = not (prefill_hooks or decode_hooks) and reads_whole_chunks(model)
    n_prefill = width if whole else width - 1
    first = None
    with _hooks(model, prefill_hooks), _timed("prefill"):
        for start in range(0, n_prefill, chunk_size):
            end = min(start + chunk_size, n_prefill)
            ids, ids_mask = tokens[:, start:end], None if mask is None else mask[:, start:end]
            if end < width:
                forward_chunk(model, ids, state, ids_mask, logits=False)
            elif record:
                first = forward_reads(model, ids, state, ids_mask, last_only=True, spans=columns)
            else:
                first = forward_chunk(model, ids, state, ids_mask, last_only=True), None, None

    def step_forward(ids):
        with _timed("steps"):
            if record:
                return forward_reads(model, ids, state,
                                     spans=None if columns is None else columns[rows])
            return forward_chunk(model, ids, state), None, None

    with _hooks(model, decode_hooks):
        logits, table, mass = first if first is not None else step_forward(tokens[:, -1:])
        for step in range(max_new_tokens):
            next_ids = logits[:, -1].argmax(dim=-1).cpu()
            if table is not None:
                table = table.cpu() - n_pad[rows, None, None]
            if mass is not None:
                mass = mass.cpu()
            keep = []
            for j, b in enumerate(rows.tolist()):
                if len(emitted[b]) > step:  # stopped earlier, kept in the batch for hooks
                    continue
                token = int(next_ids[j])
                emitted[b].append(token)
                if table is not None:
                    looked[b].append(table[j])
                if mass is not None:
                    massed[b].append(mass[j])
                if not is_stop_token(model, token, stop=stop):
                    keep.append(j)
            if not keep or step == max_new_tokens - 1:
                break
            if shrink and len(keep) < len(rows):
                kept = torch.tensor(keep, dtype=torch.long)
                with _timed("steps"):
                    select_rows(model, state, kept)
                rows, next_ids = rows[kept], next_ids[kept]
            logits, table, mass = step_forward(next_ids[:, None])
    out = []
    for b in range(batch):
        ids = np.array(emitted[b], dtype=np.int64)
        positions = (torch.stack(looked[b]).numpy().astype(np.int32) if record
                     else np.zeros((len(ids), n_layers, n_heads), dtype=np.int32))
        span_mass = (torch.stack(massed[b]).numpy().astype(np.float64) if spans is not None
                     else None)
        out.append(Decoded(ids, positions, model.tokenizer.decode(ids.tolist()), span_mass))
    return out


def _pad_id(model) -> int:
    """Any valid token id serves as padding (the mask hides it); the tokenizer's own if set."""
    tok = model.tokenizer
    for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def _hooks(model, fwd_hooks: Sequence[tuple[str, Callable]]):
    """The engine's hook context; nothing at all when there are no hooks (entering a Bridge's
    ``hooks()`` costs milliseconds)."""
    return model.hooks(fwd_hooks=list(fwd_hooks)) if fwd_hooks else contextlib.nullcontext()


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
