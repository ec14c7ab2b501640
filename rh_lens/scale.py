"""Detection at real model shapes: rh_lens's engine, the reference's method and plain greedy
generation side by side on the same random weights, and where each runs out of memory.

The methods of :data:`METHODS`, each timed on one prompt of random tokens:

- ``hooked``, ``bridge``: rh_lens's detection engine (chunked prefill with no logits, then one
  forward per step recording every head's argmax), on a HookedTransformer and on a
  TransformerBridge with the SDPA fast prefill;
- ``reference``: the reference's method (:mod:`rh_lens.reference_method`): one SDPA prefill of
  the whole prompt with the logits of every position, then eager steps returning every layer's
  attention and a Python loop over layers x heads taking ``topk(1)``;
- ``greedy``: plain cached greedy generation with Hugging Face (the floor).

Peak memory is the growth over the loaded weights: ``torch.cuda.max_memory_allocated`` on a GPU;
on the CPU the high-water mark of resident memory (``VmHWM``, reset through
``/proc/self/clear_refs`` before each run, with glibc told to hand every large block back to the
system at once so that one run's freed memory cannot hide the next run's).
:func:`predicted_bytes` is the memory model those figures are checked against.
"""

import contextlib
import ctypes
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

from rh_lens.shapes import Shape

__all__ = ["METHODS", "Engines", "Limit", "Measurement", "build_engines", "find_limit",
           "measure", "predicted_bytes", "same_answers"]

Method = Literal["hooked", "bridge", "reference", "greedy"]
METHODS: tuple[Method, ...] = ("hooked", "bridge", "reference", "greedy")
LABELS: dict[str, str] = {
    "hooked": "rh_lens, HookedTransformer",
    "bridge": "rh_lens, Bridge + SDPA prefill",
    "reference": "reference method (HF)",
    "greedy": "HF greedy generation (floor)",
}


@dataclass
class Engines:
    """One set of random weights under every engine (the Bridge and the Hugging Face model
    share their tensors; the HookedTransformer holds copies in its own layout)."""

    shape: Shape
    hf: torch.nn.Module
    hooked: object | None
    bridge: object | None
    n_ctx: int

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    def available(self) -> list[str]:
        return [m for m in METHODS if m in ("reference", "greedy") or getattr(self, m)]


def build_engines(shape: Shape, *, n_ctx: int, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu", seed: int = 0,
                  backends: Sequence[str] = ("hooked", "bridge")) -> Engines:
    """The random model of ``shape`` and the engines of ``backends`` around it (``hooked``
    only where transformer-lens 3.x is installed)."""
    from rh_lens.engine import HAS_HOOKED
    from rh_lens.hf_export import hooked_from_hf, to_hf
    from rh_lens.shapes import bridge_of, placeholder_tokenizer, random_model

    unknown = set(backends) - {"hooked", "bridge"}
    if unknown:
        raise ValueError(f"unknown backends {sorted(unknown)}; expected hooked and/or bridge")
    hf = random_model(shape, n_ctx=n_ctx, seed=seed, dtype=dtype, device=device)
    tokenizer = placeholder_tokenizer(shape.d_vocab)
    hooked = bridge = None
    if "hooked" in backends and HAS_HOOKED:  # before the Bridge rewires hf's modules
        hooked = hooked_from_hf(hf, tokenizer, n_ctx=n_ctx, share=False, name=hf.name_or_path)
    if "bridge" in backends:
        bridge = bridge_of(hf, tokenizer, n_ctx=n_ctx)
        hf = to_hf(bridge)  # the plain Hugging Face model on the same tensors
    return Engines(shape, hf, hooked, bridge, n_ctx)


def random_prompt(shape: Shape, context: int, *, seed: int = 0) -> torch.Tensor:
    """``[1, context]`` token ids, none of them special (ids 0-3 of the placeholder)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, shape.d_vocab, (1, context), generator=gen)


# --------------------------------------------------------------------------------------------
# Memory


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD, fixed: large blocks go back at free()
    return _LIBC


def _status(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field_name}")


@dataclass
class Peak:
    bytes: int = 0


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[Peak]:
    """The peak of memory in use inside the block, over what was in use when it began."""
    peak = Peak()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield peak
        torch.cuda.synchronize(device)
        peak.bytes = int(torch.cuda.max_memory_allocated(device) - base)
        return
    _libc().malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    base = _status("VmRSS")
    yield peak
    peak.bytes = max(0, _status("VmHWM") - base)


# --------------------------------------------------------------------------------------------
# Timing


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def _run(engines: Engines, method: str, prompt: torch.Tensor, *, steps: int, chunk: int
         ) -> tuple[float, float]:
    """Seconds of prefill and of ``steps`` decode steps of ``method`` on ``prompt``."""
    from rh_lens import reference_method as ref

    device = engines.device
    if method in ("hooked", "bridge"):
        from rh_lens.engine import forward_argmax, forward_chunk, new_kv_state

        model = getattr(engines, method)
        state = new_kv_state(model, 1)
        width = prompt.shape[1]
        t0 = _now(device)
        for start in range(0, width - 1, chunk):
            forward_chunk(model, prompt[:, start:min(start + chunk, width - 1)], state,
                          logits=False)
        t1 = _now(device)
        ids = prompt[:, -1:]
        for _ in range(steps):
            logits, table = forward_argmax(model, ids, state)
            ids = logits[:, -1].argmax(dim=-1, keepdim=True).cpu()
            table.cpu()
        t2 = _now(device)
    else:
        prefill, decode = ((ref.reference_prefill, ref.reference_decode) if method == "reference"
                           else (ref.greedy_prefill, ref.greedy_decode))
        t0 = _now(device)
        cache = prefill(engines.hf, prompt)
        t1 = _now(device)
        decode(engines.hf, cache, prompt, max_new_tokens=steps)
        t2 = _now(device)
    return t1 - t0, t2 - t1


@dataclass(frozen=True)
class Measurement:
    """One method at one context length."""

    method: str
    context: int
    prefill_s: float
    step_s: float  # per decode step
    peak_bytes: int  # growth over the loaded weights
    predicted_bytes: int
    out_of_memory: bool = False


def measure(engines: Engines, method: str, context: int, *, steps: int, chunk: int,
            seed: int = 0) -> Measurement:
    """Time and peak memory of ``method`` at ``context`` tokens (a CUDA out-of-memory error
    is a result: ``out_of_memory=True``)."""
    if method not in engines.available():
        raise ValueError(f"method {method!r} is not available here; have "
                         f"{', '.join(engines.available())}")
    if not 2 <= context <= engines.n_ctx - steps:
        raise ValueError(f"context {context} needs 2 <= context <= n_ctx - steps "
                         f"({engines.n_ctx} - {steps})")
    prompt = random_prompt(engines.shape, context, seed=seed)
    predicted = predicted_bytes(engines.shape, method, context=context, chunk=chunk,
                                steps=steps, dtype=engines.dtype)
    try:
        with peak_memory(engines.device) as peak:
            prefill_s, decode_s = _run(engines, method, prompt, steps=steps, chunk=chunk)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return Measurement(method, context, float("nan"), float("nan"), 0, predicted, True)
    return Measurement(method, context, prefill_s, decode_s / steps, peak.bytes, predicted)


# --------------------------------------------------------------------------------------------
# The memory model


def predicted_bytes(shape: Shape, method: str, *, context: int, chunk: int, steps: int,
                    dtype: torch.dtype) -> int:
    """Peak memory of ``method`` above its weights, from the tensors it builds.

    With L layers, H query and G key/value heads of width D, model width M, MLP width F,
    vocabulary V, context T (prompt and new tokens), chunk C and b bytes a number, every method
    holds the key/value cache, ``2 L G D T b``, plus the largest set of temporaries alive at
    once in one layer:

    - ``hooked`` (TransformerLens, chunk by chunk): masked scores, pattern, a zeros tensor and
      the NaN-cleaned pattern of the chunk's queries (``4 H C T``), keys and values repeated to
      H heads (``2 H T D``) and the rotated keys with the layer's cache grown by concatenation
      (``2 G D T``);
    - ``bridge`` (SDPA twin, chunk by chunk): a chunk's MLP (``3 C F``: activation, up
      projection, product) with its residual stream (``5 C M``), or an eager decode step's
      keys and values repeated to H heads (``2 H T D``); either with the cache of a layer grown
      by concatenation (``2 G D T``);
    - ``reference``: the logits of every prompt position (``T V``) beside the last layer's
      output (``T M``), and the float32 attention rows that decode steps return (``4 L H T``
      bytes);
    - ``greedy``: the MLP of the whole prompt at once (``3 T F``) beside its residual stream
      (``4 T M``).
    """
    b = torch.tensor([], dtype=dtype).element_size()
    L, H, G, D = shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.d_head
    M, F, V = shape.d_model, shape.d_mlp, shape.d_vocab
    T, C = context + steps, min(chunk, context)
    kv = 2 * L * G * D * T * b
    if method == "hooked":
        extra = (4 * H * C * T + 2 * H * T * D + 2 * G * D * T) * b
    elif method == "bridge":
        extra = (max(3 * C * F + 5 * C * M, 2 * H * T * D) + 2 * G * D * T) * b
    elif method == "reference":
        extra = (T * V + T * M) * b + 4 * L * H * T
    elif method == "greedy":
        extra = (3 * T * F + 4 * T * M) * b
    else:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    return int(kv + extra)


def weights_bytes(engines: Engines, method: str) -> int:
    """Memory of the weights ``method`` runs on (the HookedTransformer shares only the token
    embeddings with the Hugging Face model)."""
    b = torch.tensor([], dtype=engines.dtype).element_size()
    return engines.shape.n_params() * b


# --------------------------------------------------------------------------------------------
# Where it breaks


@dataclass(frozen=True)
class Limit:
    """The longest context (by doubling from ``start``) at which ``method`` ran within
    ``budget_bytes`` of memory, weights included; ``stopped_by`` says what ended the search."""

    method: str
    budget_bytes: int
    longest: int | None
    stopped_by: str
    tried: tuple[Measurement, ...] = field(default_factory=tuple)


def find_limit(engines: Engines, method: str, *, budget_bytes: int, start: int, steps: int,
               chunk: int, max_context: int | None = None,
               known: Sequence[Measurement] = ()) -> Limit:
    """Double the context from ``start`` until ``method`` no longer fits in ``budget_bytes``.

    On a GPU the process may then use no more than the budget (larger allocations fail as they
    would on a smaller card).  On the CPU a context runs only when the memory model predicts it
    needs less than twice the budget; the measured peak decides.  ``known`` measurements (of
    this method, these steps and chunk) are used instead of measuring again.
    """
    if budget_bytes <= 0:
        raise ValueError(f"the memory budget must be positive, got {budget_bytes} bytes")
    top = min(max_context or engines.n_ctx - steps, engines.n_ctx - steps)
    weights = weights_bytes(engines, method)
    if weights >= budget_bytes:
        return Limit(method, budget_bytes, None, f"the weights alone take {weights} bytes")
    device = engines.device
    fraction = None
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = min(1.0, budget_bytes / total)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
    done = {m.context: m for m in known if m.method == method}
    tried, longest, stopped_by, context = [], None, f"reached {top} tokens", start
    try:
        while context <= top:
            if device.type != "cuda":
                need = weights + predicted_bytes(engines.shape, method, context=context,
                                                 chunk=chunk, steps=steps, dtype=engines.dtype)
                if need > 2 * budget_bytes:
                    stopped_by = f"{context} tokens predicted to need {need} bytes, not run"
                    break
            m = done.get(context) or measure(engines, method, context, steps=steps,
                                             chunk=chunk)
            tried.append(m)
            if m.out_of_memory:
                stopped_by = f"{context} tokens out of memory"
                break
            if weights + m.peak_bytes > budget_bytes:
                stopped_by = (f"{context} tokens need {(weights + m.peak_bytes) / 2**30:.2f} GiB, "
                              "over the budget")
                break
            longest, context = context, context * 2
    finally:
        if fraction is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    return Limit(method, budget_bytes, longest, stopped_by, tuple(tried))


# --------------------------------------------------------------------------------------------
# Same answers


@torch.no_grad()
def same_answers(engines: Engines, context: int, *, steps: int, chunk: int,
                 seed: int = 0) -> dict[str, bool]:
    """Whether each rh_lens engine decodes the tokens and records the argmax positions that
    the reference's method does, on the same weights and prompt (per engine)."""
    import numpy as np

    from rh_lens.decode import decode_greedy
    from rh_lens.reference_method import reference_detect

    prompt = random_prompt(engines.shape, context, seed=seed)
    eos = engines.hf.config.eos_token_id
    ref = reference_detect(engines.hf, prompt, max_new_tokens=steps, stop=lambda i: i == eos)
    out = {}
    for name in ("hooked", "bridge"):
        model = getattr(engines, name)
        if model is None:
            continue
        (ours,) = decode_greedy(model, prompt, max_new_tokens=steps, chunk_size=chunk,
                                stop="eos")
        out[name] = bool(np.array_equal(ours.tokens, ref.tokens)
                         and np.array_equal(ours.positions, ref.positions))
    return out


def to_json(obj) -> dict:
    """A :class:`Measurement` or :class:`Limit` as plain JSON values."""
    return asdict(obj)
