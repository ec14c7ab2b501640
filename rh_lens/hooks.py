"""Hook names and hook factories: the only module of rh_lens that spells a hook name.

Factories return lists of ``(hook_name, hook_fn)`` pairs for ``model.hooks(fwd_hooks=...)`` or
``model.run_with_hooks``; they never attach anything themselves, so a ``with model.hooks(...)``
block removes them again even when a hook raises.  Hooks never modify the activation they are
given: they return a modified copy.

Head indices are *query* heads.  In grouped-query models ``hook_k``/``hook_v`` are
``[batch, pos, n_kv_heads, d_head]``, and query head ``h`` reads key/value head
``h // (n_heads // n_kv_heads)``.
"""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor

Head = tuple[int, int]
HookList = list[tuple[str, Callable]]
Positions = slice | Sequence[int] | Tensor


def pattern(layer: int) -> str:
    """Attention probabilities ``[batch, head_index, query_pos, key_pos]``."""
    return f"blocks.{layer}.attn.hook_pattern"


def scores(layer: int) -> str:
    """Pre-softmax attention scores ``[batch, head_index, query_pos, key_pos]``."""
    return f"blocks.{layer}.attn.hook_attn_scores"


def q(layer: int) -> str:
    """Queries ``[batch, pos, head_index, d_head]``."""
    return f"blocks.{layer}.attn.hook_q"


def k(layer: int) -> str:
    """Keys ``[batch, pos, n_kv_heads, d_head]``."""
    return f"blocks.{layer}.attn.hook_k"


def v(layer: int) -> str:
    """Values ``[batch, pos, n_kv_heads, d_head]``."""
    return f"blocks.{layer}.attn.hook_v"


def z(layer: int) -> str:
    """Per-head attention output before ``W_O``: ``[batch, pos, head_index, d_head]``."""
    return f"blocks.{layer}.attn.hook_z"


def attn_out(layer: int) -> str:
    return f"blocks.{layer}.hook_attn_out"


def resid_pre(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


def resid_post(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def required_hook_names(n_layers: int) -> list[str]:
    """The hook points rh_lens relies on; :func:`rh_lens.models.load_model` checks them."""
    names = []
    for layer in range(n_layers):
        names += [pattern(layer), scores(layer), q(layer), k(layer), v(layer), z(layer)]
        names += [attn_out(layer), resid_pre(layer), resid_post(layer)]
    return names


# --------------------------------------------------------------------------------------------
# Head sets


def validate_heads(heads: Iterable, n_layers: int, n_heads: int) -> tuple[Head, ...]:
    """Check ``(layer, head)`` pairs against a model's shape; duplicates are dropped."""
    out = []
    for item in heads:
        try:
            layer, head = (int(x) for x in item)
        except (TypeError, ValueError):
            raise ValueError(f"a head must be a (layer, head) pair, got {item!r}") from None
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer {layer} of head {item!r} is out of range [0, {n_layers})")
        if not 0 <= head < n_heads:
            raise ValueError(f"head {head} of {item!r} is out of range [0, {n_heads})")
        if (layer, head) not in out:
            out.append((layer, head))
    return tuple(out)


def heads_by_layer(heads: Iterable[Head]) -> dict[int, list[int]]:
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    return by_layer


# --------------------------------------------------------------------------------------------
# Ablation and patching hooks on [batch, pos, head_index, d_head] activations


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


def zero_query_hooks(heads: Iterable[Head], *, positions: Positions = slice(None)) -> HookList:
    """The paper's masking: a zero query makes the head attend uniformly over its keys.

    The head then outputs the mean of its values over the visible keys.  Other heads,
    including the masked head's key/value-group siblings, are untouched.
    """
    zero = lambda act, hs: torch.zeros_like(act[:, :, hs])  # noqa: E731
    return [(q(layer), _replace_heads(hs, positions, zero))
            for layer, hs in heads_by_layer(heads).items()]


def zero_output_hooks(heads: Iterable[Head], *, positions: Positions = slice(None)) -> HookList:
    """Zero ablation: the heads' outputs (``hook_z``) are set to 0."""
    zero = lambda act, hs: torch.zeros_like(act[:, :, hs])  # noqa: E731
    return [(z(layer), _replace_heads(hs, positions, zero))
            for layer, hs in heads_by_layer(heads).items()]


def replace_output_hooks(
    heads: Iterable[Head],
    source: dict[int, Float[Tensor, "batch pos head_index d_head"]],
    *,
    positions: Positions = slice(None),
) -> HookList:
    """Patch the heads' outputs with ``source[layer]`` (a ``hook_z`` activation of another run
    or a mean over runs, broadcastable to the patched slice) at ``positions``."""
    hooks = []
    for layer, hs in heads_by_layer(heads).items():
        src = source[layer]

        def take(act, hs, src=src):
            return src[:, positions][:, :, hs].to(act.device).expand_as(act[:, :, hs])

        hooks.append((z(layer), _replace_heads(hs, positions, take)))
    return hooks


# --------------------------------------------------------------------------------------------
# Reading the current query's attention row


@dataclass
class LastQueryArgmax:
    """Records, for every layer and head, the key position the last query attends to most.

    ``hooks`` reads each layer's ``hook_pattern`` and keeps only the argmax of its last query
    row (``[batch, head_index]``), for all heads at once; the pattern itself is not stored.
    """

    n_layers: int
    positions: dict[int, Int[Tensor, "batch head_index"]] = field(default_factory=dict)

    @property
    def hooks(self) -> HookList:
        return [(pattern(layer), self._hook(layer)) for layer in range(self.n_layers)]

    def _hook(self, layer: int) -> Callable:
        def hook(pat: Float[Tensor, "batch head_index query_pos key_pos"], hook) -> None:
            self.positions[layer] = pat[:, :, -1].argmax(dim=-1)

        return hook

    def table(self) -> Int[Tensor, "batch n_layers n_heads"]:
        """The recorded positions of the last forward, stacked over layers."""
        missing = [layer for layer in range(self.n_layers) if layer not in self.positions]
        if missing:
            raise RuntimeError(f"no attention recorded for layers {missing}: run a forward first")
        return torch.stack([self.positions[layer] for layer in range(self.n_layers)], dim=1)
