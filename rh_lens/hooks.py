"""Hook names: the only module of rh_lens that spells a hook name.

Also :class:`LastQueryArgmax`, the recorder that decoding uses to read where each head's current
query attends.  The hooks that change a run (masking, patching, capturing) are built by
:mod:`rh_lens.interventions`; every factory returns a :data:`HookList` of ``(hook_name,
hook_fn)`` pairs for ``model.hooks(fwd_hooks=...)`` or ``model.run_with_hooks`` and never
attaches anything itself.

In grouped-query models ``hook_k``/``hook_v`` are ``[batch, pos, n_kv_heads, d_head]``; see
:func:`rh_lens.heads.kv_group` for which group a query head reads.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor

from rh_lens.scoring import span_mass

HookList = list[tuple[str, Callable]]


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


def rot_q(layer: int) -> str:
    """Queries after the rotary embedding (rotary models only)."""
    return f"blocks.{layer}.attn.hook_rot_q"


def rot_k(layer: int) -> str:
    """Keys after the rotary embedding ``[batch, key_pos, n_kv_heads, d_head]`` (rotary models
    only; the whole cache's keys when forwarding against one)."""
    return f"blocks.{layer}.attn.hook_rot_k"


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


def q_input(layer: int) -> str:
    """Per-head query input ``[batch, pos, head_index, d_model]``; exists only with
    ``cfg.use_split_qkv_input`` (see :func:`rh_lens.patching.receiver_mode`)."""
    return f"blocks.{layer}.hook_q_input"


def k_input(layer: int) -> str:
    """Per-head key input; needs ``cfg.use_split_qkv_input``."""
    return f"blocks.{layer}.hook_k_input"


def v_input(layer: int) -> str:
    """Per-head value input; needs ``cfg.use_split_qkv_input``."""
    return f"blocks.{layer}.hook_v_input"


def mlp_in(layer: int) -> str:
    """The MLP's input ``[batch, pos, d_model]``; needs ``cfg.use_hook_mlp_in``."""
    return f"blocks.{layer}.hook_mlp_in"


def required_hook_names(n_layers: int) -> list[str]:
    """The hook points rh_lens relies on; :func:`rh_lens.models.load_model` checks them."""
    names = []
    for layer in range(n_layers):
        names += [pattern(layer), scores(layer), q(layer), k(layer), v(layer), z(layer)]
        names += [attn_out(layer), resid_pre(layer), resid_post(layer)]
    return names


# --------------------------------------------------------------------------------------------
# Reading the current query's attention row


@dataclass
class LastQueryArgmax:
    """Records, for every layer and head, the key position the last query attends to most.

    ``hooks`` reads each layer's ``hook_pattern`` and keeps only the argmax of its last query
    row (``[batch, head_index]``), for all heads at once; the pattern itself is not stored.
    With ``spans`` (key columns ``[start, end)`` per batch row) it also keeps the row's
    attention mass on those columns (:func:`rh_lens.scoring.span_mass`).
    """

    n_layers: int
    positions: dict[int, Int[Tensor, "batch head_index"]] = field(default_factory=dict)
    spans: Int[Tensor, "batch 2"] | None = None
    mass: dict[int, Float[Tensor, "batch head_index"]] = field(default_factory=dict)

    @property
    def hooks(self) -> HookList:
        return [(pattern(layer), self._hook(layer)) for layer in range(self.n_layers)]

    def _hook(self, layer: int) -> Callable:
        def hook(pat: Float[Tensor, "batch head_index query_pos key_pos"], hook) -> None:
            row = pat[:, :, -1]
            self.positions[layer] = row.argmax(dim=-1)
            if self.spans is not None:
                self.mass[layer] = span_mass(row, self.spans)

        return hook

    def table(self) -> Int[Tensor, "batch n_layers n_heads"]:
        """The recorded positions of the last forward, stacked over layers."""
        missing = [layer for layer in range(self.n_layers) if layer not in self.positions]
        if missing:
            raise RuntimeError(f"no attention recorded for layers {missing}: run a forward first")
        return torch.stack([self.positions[layer] for layer in range(self.n_layers)], dim=1)

    def mass_table(self) -> Float[Tensor, "batch n_layers n_heads"] | None:
        """The recorded span masses of the last forward (None without ``spans``)."""
        if self.spans is None:
            return None
        self.table()  # the same check: every layer recorded
        return torch.stack([self.mass[layer] for layer in range(self.n_layers)], dim=1)
