"""Interventions on attention heads: hook factories that mask, patch, resample or capture.

Every factory returns a :data:`rh_lens.hooks.HookList` for ``model.hooks(fwd_hooks=...)`` or
``model.run_with_hooks``; nothing is attached here, so a ``with model.hooks(...)`` block removes
the hooks again even when one raises.  Hooks never modify the activation they are given: they
return a modified copy.  Heads are *query* heads (``(layer, head)`` pairs, see
:mod:`rh_lens.heads`).

What a masked head outputs (:func:`ablation_hooks`, ``mode``):

- ``uniform`` (the paper's masking, :func:`zero_query_hooks`): its query is zeroed, so it
  attends uniformly over every visible key and outputs the mean of their values; its key/value
  group siblings are untouched.
- ``zero`` (:func:`zero_output_hooks`): its output ``hook_z`` is 0.
- ``mean`` (:func:`mean_output_hooks`): its output is its mean ``hook_z`` over a reference set of
  prompts and all their positions (:func:`compute_mean_z`).
- ``resample`` (:func:`resample_hooks`): its output comes from a clean run on a *donor* prompt
  (:func:`capture_donor`).  Prompts are aligned at their ends: trial position ``p`` reads donor
  position ``p + M - N`` (``N``, ``M`` the trial's and the donor's prompt lengths), so the
  trial's decode step ``t`` reads the donor's decode step ``t``.  Once the donor has stopped,
  every later step reads the donor's last step; a trial position before the donor's first one
  reads the donor's first.

Where (``positions``): ``decode`` masks only the forwards that predict a new token (see
:func:`rh_lens.decode.decode_greedy`), so the prefilled keys/values are the clean run's; ``all``
masks the prefill too.  Activation patching replaces outputs with another run's
(:func:`replace_output_hooks`); :func:`capture_output_hooks` keeps them.
"""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from jaxtyping import Float, Int
from torch import Tensor

from rh_lens import hooks
from rh_lens.decode import decode_greedy
from rh_lens.heads import HeadLike, heads_by_layer, validate_heads
from rh_lens.hooks import HookList

Mode = Literal["uniform", "zero", "mean", "resample"]
Where = Literal["decode", "all"]
MODES: tuple[str, ...] = get_args(Mode)
WHERE: tuple[str, ...] = get_args(Where)
Positions = slice | Sequence[int] | Tensor


# --------------------------------------------------------------------------------------------
# Replacing heads of [batch, pos, head_index, d_head] activations


def _replace_heads(
    heads: list[int], positions: Positions, value: Callable[[Tensor, list[int]], Tensor]
) -> Callable:
    index = torch.tensor(heads)

    def hook(act: Float[Tensor, "batch pos head_index d_head"], hook) -> Tensor:
        out = act.clone()
        idx = index.to(act.device)
        sub = out[:, positions]
        sub[:, :, idx] = value(act[:, positions], heads).to(act.dtype)
        out[:, positions] = sub
        return out

    return hook


def zero_query_hooks(heads: Iterable[HeadLike], *, positions: Positions = slice(None)) -> HookList:
    """The paper's masking: a zero query makes the head attend uniformly over its keys.

    The head then outputs the mean of its values over the visible keys.  Other heads,
    including the masked head's key/value-group siblings, are untouched.
    """
    zero = lambda act, hs: torch.zeros_like(act[:, :, hs])  # noqa: E731
    return [(hooks.q(layer), _replace_heads(hs, positions, zero))
            for layer, hs in heads_by_layer(heads).items()]


def zero_output_hooks(heads: Iterable[HeadLike], *,
                      positions: Positions = slice(None)) -> HookList:
    """Zero ablation: the heads' outputs (``hook_z``) are set to 0."""
    zero = lambda act, hs: torch.zeros_like(act[:, :, hs])  # noqa: E731
    return [(hooks.z(layer), _replace_heads(hs, positions, zero))
            for layer, hs in heads_by_layer(heads).items()]


def replace_output_hooks(
    heads: Iterable[HeadLike],
    source: dict[int, Float[Tensor, "batch pos head_index d_head"]],
    *,
    positions: Positions = slice(None),
) -> HookList:
    """Patch the heads' outputs with ``source[layer]`` (a ``hook_z`` activation of another run
    or a mean over runs, broadcastable to the patched slice) at ``positions``."""
    out = []
    for layer, hs in heads_by_layer(heads).items():
        src = source[layer]

        def take(act, hs, src=src):
            return src[:, positions][:, :, hs].to(act.device).expand_as(act[:, :, hs])

        out.append((hooks.z(layer), _replace_heads(hs, positions, take)))
    return out


def mean_output_hooks(heads: Iterable[HeadLike],
                      mean_z: Float[Tensor, "n_layers n_heads d_head"]) -> HookList:
    """Mean ablation: the heads' outputs are ``mean_z[layer, head]`` at every position."""
    source = {layer: mean_z[layer][None, None] for layer in range(mean_z.shape[0])}
    return replace_output_hooks(heads, source)


def capture_output_hooks(heads: Iterable[HeadLike]
                         ) -> tuple[HookList, dict[int, list[Tensor]]]:
    """Hooks that keep the heads' ``hook_z`` (``[batch, pos, k, d_head]`` per forward, the
    layer's heads in :func:`rh_lens.heads.heads_by_layer` order), and the lists they fill."""
    store: dict[int, list[Tensor]] = {}
    fwd = []
    for layer, hs in heads_by_layer(heads).items():
        chunks: list[Tensor] = []
        store[layer] = chunks
        index = torch.tensor(hs)

        def keep(act: Float[Tensor, "batch pos head_index d_head"], hook, chunks=chunks,
                 index=index) -> None:
            chunks.append(act[:, :, index.to(act.device)].detach().clone())

        fwd.append((hooks.z(layer), keep))
    return fwd, store


@torch.no_grad()
def compute_mean_z(model, prompts: Sequence[Int[Tensor, " pos"]]
                   ) -> Float[Tensor, "n_layers n_heads d_head"]:
    """Every head's mean ``hook_z`` over all positions of ``prompts`` (accumulated in float64)."""
    names = {hooks.z(layer) for layer in range(model.cfg.n_layers)}
    total = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head,
                        dtype=torch.float64)
    count = 0
    for prompt in prompts:
        tokens = prompt[None].to(model.cfg.device)
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names,
                                        attention_mask=torch.ones_like(tokens))
        for layer in range(model.cfg.n_layers):
            total[layer] += cache[hooks.z(layer)][0].double().sum(dim=0).cpu()
        count += tokens.shape[1]
    if count == 0:
        raise ValueError("no reference prompts to average over")
    return (total / count).to(model.cfg.dtype)


# --------------------------------------------------------------------------------------------
# Resampling from a donor run


@dataclass(frozen=True)
class Donor:
    """Clean ``hook_z`` of the masked heads on a donor prompt, for ``resample``.

    ``z[layer]`` holds the layer's masked heads in :func:`rh_lens.heads.heads_by_layer` order;
    row ``i`` is the donor's absolute position ``start + i`` (``start`` is 0 when the prefill
    was recorded, else ``n_prompt - 1``, the first decode step).
    """

    heads: tuple[HeadLike, ...]
    n_prompt: int
    start: int
    z: dict[int, Float[Tensor, "pos _k d_head"]]
    text: str


def _donor_rows(first: int, n: int, shift: int, start: int, n_rows: int) -> Tensor:
    """Donor rows for trial positions ``first .. first + n - 1`` (aligned at the prompts' ends)."""
    return (torch.arange(first, first + n) + shift - start).clamp(0, n_rows - 1)


def resample_hooks(heads: Sequence[HeadLike], donor: Donor, *, n_prompt: int,
                   start: int) -> HookList:
    """The heads' outputs read from ``donor`` (see the module docstring); the hooks count
    positions from ``start``, so build new ones for every decoding run."""
    if set(donor.heads) != set(heads):
        raise ValueError(f"the donor holds heads {donor.heads}, not the masked {heads}")
    out = []
    for layer, hs in heads_by_layer(heads).items():
        src, index, seen = donor.z[layer], torch.tensor(hs), {"pos": start}

        def hook(act: Float[Tensor, "batch pos head_index d_head"], hook, src=src, index=index,
                 seen=seen) -> Tensor:
            rows = _donor_rows(seen["pos"], act.shape[1], donor.n_prompt - n_prompt,
                               donor.start, src.shape[0])
            seen["pos"] += act.shape[1]
            patched = act.clone()
            value = src[rows.to(src.device)].to(act.device, act.dtype)
            patched[:, :, index.to(act.device)] = value.expand(act.shape[0], -1, -1, -1)
            return patched

        out.append((hooks.z(layer), hook))
    return out


def capture_donor(
    model, tokens: Int[Tensor, " pos"], heads: Sequence[HeadLike], *,
    positions: Where = "decode", max_new_tokens: int = 50, chunk_size: int = 512,
) -> Donor:
    """Decode ``tokens`` cleanly, keeping the masked heads' ``hook_z`` (prefill too for
    ``positions="all"``)."""
    heads = validate_heads(heads, model.cfg.n_layers, model.cfg.n_heads)
    fwd, store = capture_output_hooks(heads)
    (out,) = decode_greedy(model, tokens[None], max_new_tokens=max_new_tokens,
                           chunk_size=chunk_size, record=False,
                           prefill_hooks=fwd if positions == "all" else [], decode_hooks=fwd)
    n = int(tokens.shape[0])
    return Donor(heads, n, 0 if positions == "all" else n - 1,
                 {layer: torch.cat([c[0] for c in chunks]) for layer, chunks in store.items()},
                 out.text)


# --------------------------------------------------------------------------------------------
# One masking mode


def ablation_hooks(
    model, mode: Mode, heads: Sequence[HeadLike], *, positions: Where = "decode",
    mean_z: Float[Tensor, "n_layers n_heads d_head"] | None = None,
    donor: Donor | None = None, n_prompt: int | None = None,
) -> tuple[HookList, HookList]:
    """``(prefill_hooks, decode_hooks)`` for :func:`rh_lens.decode.decode_greedy`.

    ``decode`` positions give no prefill hooks; ``all`` gives the same hooks in both lists.
    ``mean`` needs ``mean_z`` (:func:`compute_mean_z`); ``resample`` needs a ``donor``
    (:func:`capture_donor`, recorded with the same ``positions``) and the trial's prompt length
    ``n_prompt``; its hooks count positions, so build new ones for every decoding run.  No heads
    give two empty lists: the clean run.
    """
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    heads = validate_heads(heads, n_layers, n_heads)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if positions not in WHERE:
        raise ValueError(f"positions must be 'decode' or 'all', got {positions!r}")
    if not heads:
        return [], []
    if mode == "uniform":
        fwd = zero_query_hooks(heads)
    elif mode == "zero":
        fwd = zero_output_hooks(heads)
    elif mode == "mean":
        want = (n_layers, n_heads, model.cfg.d_head)
        if mean_z is None or tuple(mean_z.shape) != want:
            got = None if mean_z is None else tuple(mean_z.shape)
            raise ValueError(f"mode 'mean' needs mean_z of shape {want}, got {got}")
        fwd = mean_output_hooks(heads, mean_z)
    else:
        if donor is None or n_prompt is None:
            raise ValueError("mode 'resample' needs a donor and the trial's n_prompt")
        if positions == "all" and donor.start != 0:
            raise ValueError("positions 'all' needs a donor recorded with positions 'all'")
        fwd = resample_hooks(heads, donor, n_prompt=n_prompt,
                             start=0 if positions == "all" else n_prompt - 1)
    return (list(fwd) if positions == "all" else []), list(fwd)


# --------------------------------------------------------------------------------------------
# Key/value windows: some heads see only the first and the last tokens


def kv_window_hooks(heads: Iterable[HeadLike], *, sink: int, window: int) -> HookList:
    """The heads attend only to the first ``sink`` keys and the last ``window`` keys (their own
    position included): a query at absolute position ``p`` sees key ``j`` when ``j < sink`` or
    ``p - window < j <= p``, as if its key/value cache kept only those tokens.

    The other scores of the heads are set to ``-inf`` on ``hook_attn_scores``, so the softmax
    runs over the kept keys alone.  Query positions are counted from the keys' length
    (``key_pos - query_pos`` keys come from the cache), so the same hooks serve a whole prompt,
    a chunked prefill and every decoding step.
    """
    if sink < 0 or window < 1:
        raise ValueError(f"a key/value window needs sink >= 0 and window >= 1, got sink={sink}, "
                         f"window={window}")
    out = []
    for layer, hs in heads_by_layer(heads).items():
        index = torch.tensor(hs)

        def hook(scores: Float[Tensor, "batch head_index query_pos key_pos"], hook,
                 index=index) -> Tensor:
            n_query, n_key = scores.shape[-2:]
            query = torch.arange(n_key - n_query, n_key, device=scores.device)[:, None]
            key = torch.arange(n_key, device=scores.device)[None]
            dropped = (key >= sink) & (key <= query - window)
            out = scores.clone()
            idx = index.to(scores.device)
            out[:, idx] = out[:, idx].masked_fill(dropped, float("-inf"))
            return out

        out.append((hooks.scores(layer), hook))
    return out
