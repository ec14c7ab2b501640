"""A HookedTransformer's forward against its key/value cache, without the module machinery.

A decode step of a small model is mostly Python: module calls, hook points, ``einops``
parsing, keyword plumbing.  :func:`forward` runs the tensor
operations of TransformerLens's own forward, in the same order, on the same weights (in the
layout they are stored in) and on the same :class:`TransformerLensKeyValueCache`, so that its
logits, cache and attention pattern are bit for bit those of ``model(tokens,
past_kv_cache=...)`` (the tests hold it to that), and reads each head's argmax key position
from the last query's pattern row, as :class:`rh_lens.hooks.LastQueryArgmax` reads it from
``hook_pattern``.  Operations that cannot change a value are left out: the identity hook
points, a mask ``where`` when every column is a real token of a one-query step, the
concatenation with an empty pass-through slice of the rotary dimension.

With no logits asked for (a prefill chunk), the last layer stops after appending its keys and
values: nothing reads the rest when no hook is attached.  With ``last_only`` (a prompt's last
token forwarded with the prompt) the last layer evaluates that position alone, so its output
is TransformerLens's up to the rounding of a one-row product; keys, values and the lower
layers stay bit for bit.  The engine uses it only then
(:func:`unhooked`) and for the configurations :func:`supports` accepts, the Llama family:
rotary positions, RMS normalisation, a gated MLP, grouped or full multi-head attention;
anything else takes TransformerLens's forward.
"""

import weakref

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from rh_lens.scoring import span_mass

_NORMS = ("RMSNorm", "RMSNormPre")
_ATTENTIONS = ("Attention", "GroupedQueryAttention")
_OFF = (  # config switches whose forward this module does not reproduce: all must be off
    "use_split_qkv_input", "use_attn_in", "use_attn_result", "use_hook_mlp_in",
    "ungroup_grouped_query_attention", "use_qk_norm", "use_logn_attn", "use_dynamic_ntk_rope",
    "use_normalization_before_and_after", "use_attention_sinks", "load_in_4bit", "attn_only",
    "parallel_attn_mlp", "post_embedding_ln", "use_hook_tokens",
)


_STRUCTURE: "weakref.WeakKeyDictionary[nn.Module, tuple[torch.device, bool]]" = (
    weakref.WeakKeyDictionary())


def supports(model: nn.Module) -> bool:
    """Whether :func:`forward` reproduces ``model``'s forward: a Llama-family configuration on
    one device with every optional switch off.  The switches are read at each call (switching
    a hook flag on sends the next forward through TransformerLens); the architecture once per
    model and device."""
    cfg = model.cfg
    if any(getattr(cfg, name, False) for name in _OFF):
        return False
    device = model.embed.W_E.device
    known = _STRUCTURE.get(model)
    if known is None or known[0] != device:
        known = _STRUCTURE[model] = (device, _llama_family(model))
    return known[1]


def _llama_family(model: nn.Module) -> bool:
    cfg = model.cfg
    if (cfg.positional_embedding_type != "rotary" or cfg.normalization_type not in ("RMS", "RMSPre")
            or not cfg.gated_mlp or cfg.n_devices != 1 or cfg.attention_dir != "causal"
            or getattr(cfg, "clip_qkv", None) is not None
            or (cfg.attn_types is not None and any(t != "global" for t in cfg.attn_types))
            or _capped(cfg.attn_scores_soft_cap) or _capped(cfg.output_logits_soft_cap)
            or (cfg.act_fn or "").endswith("_ln")
            or type(model.ln_final).__name__ not in _NORMS):
        return False
    return all(type(b.ln1).__name__ in _NORMS and type(b.ln2).__name__ in _NORMS
               and type(b.attn).__name__ in _ATTENTIONS and type(b.mlp).__name__ == "GatedMLP"
               and b.attn.rotary_sin.device == b.attn.W_Q.device for b in model.blocks)


def _capped(cap) -> bool:
    return cap is not None and cap > 0


_MODULES: "weakref.WeakKeyDictionary[nn.Module, tuple[nn.Module, ...]]" = (
    weakref.WeakKeyDictionary())


def unhooked(model: nn.Module) -> bool:
    """Whether nothing could observe the forward's intermediate values: no forward hook on any
    module of ``model`` (its hook points included) and no global module hook.  The module
    list is walked once per model (a forward's blocks are fixed at construction)."""
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return False
    modules = _MODULES.get(model)
    if modules is None:
        modules = _MODULES[model] = tuple(model.modules())
    return not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _norm(norm: nn.Module, x: Tensor, dtype: torch.dtype) -> Tensor:
    """TransformerLens's ``RMSNorm`` / ``RMSNormPre`` forward, hook points left out."""
    if dtype not in (torch.float32, torch.float64):
        x = x.to(torch.float32)
    scale = (x.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
    x = (x / scale).to(dtype)
    return x * norm.w if hasattr(norm, "w") else x


def _project(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """``simple_attn_linear``: ``[batch, pos, d_model] -> [batch, pos, head, d_head]``."""
    out = F.linear(x, w.permute(0, 2, 1).reshape(-1, w.shape[1]), b.reshape(-1))
    return out.reshape(x.shape[0], x.shape[1], b.shape[0], b.shape[1])


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, rotary_dim: int,
            adjacent: bool) -> Tensor:
    """``apply_rotary`` with the tables already gathered for ``x``'s positions."""
    x_rot = x[..., :rotary_dim]
    if adjacent:
        flip = torch.stack([-x_rot[..., 1::2], x_rot[..., ::2]], dim=-1).flatten(-2)
    else:
        half = rotary_dim // 2
        flip = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    rotated = x_rot * cos + flip * sin
    if rotary_dim == x.shape[-1]:
        return rotated
    return torch.cat([rotated, x[..., rotary_dim:]], dim=-1)


def _heads_first(x: Tensor, group: int) -> Tensor:
    """``x`` (``[batch, kv_head, a, b]``) with each key/value head repeated for the ``group``
    query heads that read it, contiguous: the tensor ``torch.matmul`` would copy TransformerLens's
    ``repeat_interleave``-d, permuted keys or values into, made in one copy instead of two."""
    batch, heads, a, b = x.shape
    return x[:, :, None].expand(batch, heads, group, a, b).reshape(batch, heads * group, a, b)


class _Rotated:
    """A layer's cached keys after the rotary embedding, laid out ``[batch, kv_head, d_head,
    capacity]`` (the first ``length`` columns filled): the keys TransformerLens rotates again
    and transposes into the score product's layout at every forward, kept so that a forward
    rotates only its new keys.  ``source`` is the unrotated ``past_keys`` tensor they were
    made from: a cache changed by anything else (TransformerLens's own forward, a row
    selection) no longer holds it, and its keys are rotated afresh."""

    __slots__ = ("keys", "length", "source")

    def __init__(self, keys: Tensor, length: int, source: Tensor):
        self.keys, self.length, self.source = keys, length, source


_MIRROR = "_rh_lens_rotated"  # the attribute of a cache entry that holds its _Rotated


def _append(entry, k: Tensor, v: Tensor, attn: nn.Module, position_ids: Tensor, rd: int,
            adjacent: bool) -> tuple[Tensor, Tensor]:
    """Append the new unrotated ``k``, ``v`` (``[batch, new, kv_head, d_head]``) to ``entry``
    as TransformerLens does, and return every cached key rotated, ``[batch, kv_head, d_head,
    key_pos]`` (a view of the entry's :class:`_Rotated`), with every value as cached.  Each key
    is rotated by the same elementwise operations at the same position as TransformerLens
    rotates it, so the values are the same bits."""
    previous = entry.past_keys
    n_past = previous.shape[1]
    mirror = getattr(entry, _MIRROR, None)
    keys, values = entry.append(k, v)
    if (entry.frozen or mirror is None or mirror.source is not previous
            or mirror.length != n_past):
        mirror, k, n_past = None, keys, 0  # rotate every key
    at = position_ids[:, n_past:]
    rotated = _rotate(k, attn.rotary_cos[at, None, :], attn.rotary_sin[at, None, :], rd,
                      adjacent).permute(0, 2, 3, 1)
    if entry.frozen:  # the cache keeps nothing of this forward
        return rotated, values
    n_keys = keys.shape[1]
    if mirror is None or mirror.keys.shape[-1] < n_keys:
        grown = rotated.new_empty((*rotated.shape[:-1], n_keys + n_keys // 4 + 16))
        if mirror is not None:
            grown[..., :n_past] = mirror.keys[..., :n_past]
        mirror = _Rotated(grown, n_past, previous)
    mirror.keys[..., n_past:n_keys] = rotated
    mirror.length, mirror.source = n_keys, entry.past_keys
    setattr(entry, _MIRROR, mirror)
    return mirror.keys[..., :n_keys], values


def select_rows(cache, rows: Int[Tensor, " keep"]) -> None:
    """Keep batch rows ``rows`` of a TransformerLens cache, its rotated keys included."""
    cache.previous_attention_mask = cache.previous_attention_mask.index_select(0, rows)
    for entry in cache.entries:
        mirror = getattr(entry, _MIRROR, None)
        current = mirror is not None and mirror.source is entry.past_keys
        entry.past_keys = entry.past_keys.index_select(0, rows)
        entry.past_values = entry.past_values.index_select(0, rows)
        if current:
            setattr(entry, _MIRROR, _Rotated(mirror.keys.index_select(0, rows), mirror.length,
                                             entry.past_keys))


@torch.no_grad()
def forward(
    model: nn.Module, tokens: Int[Tensor, "batch pos"], cache,
    attention_mask: Int[Tensor, "batch pos"], *, logits: bool = True, argmax: bool = False,
    spans: Int[Tensor, "batch 2"] | None = None, last_only: bool = False,
) -> tuple[Float[Tensor, "batch logit_pos d_vocab"] | None,
           Int[Tensor, "batch n_layers n_heads"] | None,
           Float[Tensor, "batch n_layers n_heads"] | None]:
    """``model(tokens, past_kv_cache=cache, attention_mask=attention_mask)``: forward
    ``tokens`` after the cached positions, appending their keys and values and their mask
    (``attention_mask`` covers the new tokens only, 0 at left padding).  Returns the logits
    (None with ``logits=False``), with ``argmax`` every head's argmax key position for the last
    query, and with ``spans`` too its attention mass on them (else None for both).
    ``last_only`` computes the last layer's output, and the logits, for the last position
    alone (the other positions' keys and values are all that is read of that layer)."""
    cfg = model.cfg
    dtype = cfg.dtype
    batch, n_new = tokens.shape
    n_past = cache.entries[0].past_keys.shape[1]
    mask = cache.append_attention_mask(attention_mask)  # [batch, past + new]
    n_keys = n_past + n_new
    position_ids = (mask.cumsum(dim=1) - 1)
    position_ids = position_ids.masked_fill(position_ids < 0, 0)
    padded = not bool(mask.all())
    if n_new == 1 and not padded:
        keep = None  # every column is a real token the one query may read
    else:
        causal = (torch.arange(n_keys, device=mask.device)[None, :]
                  <= torch.arange(n_past, n_keys, device=mask.device)[:, None])
        keep = causal[None, None] & mask[:, None, None, :].bool()
    x = model.embed.W_E[tokens, :]
    tables, masses = [], []
    last = cfg.n_layers - 1
    n_queries = n_new  # the positions whose output is computed
    rd, adjacent = cfg.rotary_dim, cfg.rotary_adjacent_pairs
    for index, block in enumerate(model.blocks):
        attn = block.attn
        h = _norm(block.ln1, x, dtype)
        grouped = type(attn).__name__ == "GroupedQueryAttention"
        w_k, b_k = (attn._W_K, attn._b_K) if grouped else (attn.W_K, attn.b_K)
        w_v, b_v = (attn._W_V, attn._b_V) if grouped else (attn.W_V, attn.b_V)
        k = _project(h, w_k, b_k)
        v = _project(h, w_v, b_v)
        entry = cache.entries[index]
        if index == last and not (logits or argmax):  # nothing reads this layer's output
            _append(entry, k, v, attn, position_ids, rd, adjacent)
            break
        if index == last and last_only and n_queries > 1:  # only the last position is read
            h, x, n_queries = h[:, -1:], x[:, -1:], 1
            keep = None if keep is None else keep[:, :, -1:]
        q = _project(h, attn.W_Q, attn.b_Q)
        k, v = _append(entry, k, v, attn, position_ids, rd, adjacent)
        at = position_ids[:, n_keys - n_queries:]  # each layer has its own tables
        q = _rotate(q, attn.rotary_cos[at, None, :], attn.rotary_sin[at, None, :], rd, adjacent)
        group = attn.repeat_kv_heads if grouped else 1
        k = _heads_first(k, group)  # [batch, head, d_head, key_pos]
        v = _heads_first(v.permute(0, 2, 1, 3), group)  # [batch, head, key_pos, d_head]
        scores = q.permute(0, 2, 1, 3) @ k / attn.attn_scale
        if keep is not None:
            scores = torch.where(keep, scores, attn.IGNORE)
        pattern = torch.nan_to_num(F.softmax(scores, dim=-1), nan=0.0)
        if argmax:
            row = pattern[:, :, -1]
            tables.append(row.argmax(dim=-1))
            if spans is not None:
                masses.append(span_mass(row, spans))
        pattern = pattern.to(device=v.device, dtype=v.dtype)
        z = (pattern @ v).permute(0, 2, 1, 3)
        z = z.reshape(batch, n_queries, cfg.d_head * cfg.n_heads)
        w_o = attn.W_O.permute(2, 0, 1).reshape(cfg.d_model, -1).contiguous()
        x = x + F.linear(z.to(w_o.dtype), w_o, attn.b_O)
        mlp = block.mlp
        h = _norm(block.ln2, x, dtype)
        post = mlp.act_fn(F.linear(h, mlp.W_gate.T.contiguous())) * F.linear(
            h, mlp.W_in.T.contiguous()) + mlp.b_in
        x = x + F.linear(post, mlp.W_out.T.contiguous(), mlp.b_out)
    table = torch.stack(tables, dim=1) if argmax else None
    mass = torch.stack(masses, dim=1) if argmax and spans is not None else None
    if not logits:
        return None, table, mass
    x = _norm(model.ln_final, x, dtype)
    return F.linear(x, model.unembed.W_U.T.contiguous(), model.unembed.b_U), table, mass
