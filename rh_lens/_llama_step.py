"""One decode step of a Hugging Face Llama model, recording every head's argmax, without the
module machinery around it.

A decode step of a small model is mostly Python: module calls, output capturing, mask building,
keyword plumbing.  :func:`step` runs the same tensor operations as the eager
``LlamaForCausalLM`` forward with ``output_attentions=True``, in the same order and on the same
weights and key/value cache, so that its logits, cache and attention weights are bit for bit
those of that forward (the tests hold it to that), and reads each head's argmax from the
current query's attention row.  The Bridge's hook-free decode step uses it for Llama models
(:func:`supports`); anything else goes through the Hugging Face forward.

:func:`prefill` is the same for a prefill chunk on the SDPA twin (:func:`supports_sdpa`): the
operations of its forward, calling Hugging Face's own SDPA attention function, with the last
layer stopping once its keys and values are cached (no hook is attached, and no logits are
asked for, so nothing reads the rest); or, reading the chunk's last query (a prompt's last
token forwarded with the prompt), with that query's attention weights computed as the eager
forward computes them and the last layer evaluated for that position alone.
"""

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from rh_lens.scoring import span_mass


def supports(hf_model: nn.Module) -> bool:
    """Whether :func:`step` reproduces ``hf_model``'s eager forward: a Llama model in eval
    mode whose attention implementation is eager."""
    return (type(hf_model).__name__ == "LlamaForCausalLM" and not hf_model.training
            and hf_model.config._attn_implementation == "eager")


def supports_sdpa(hf_model: nn.Module) -> bool:
    """Whether :func:`prefill` reproduces ``hf_model``'s forward: a Llama model in eval mode
    whose attention implementation is SDPA."""
    return (type(hf_model).__name__ == "LlamaForCausalLM" and not hf_model.training
            and hf_model.config._attn_implementation == "sdpa")


def _rms(norm: nn.Module, x: Tensor) -> Tensor:
    dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + norm.variance_epsilon)
    return norm.weight * h.to(dtype)


def _linear(layer: nn.Linear, x: Tensor) -> Tensor:
    return F.linear(x, layer.weight, layer.bias)


def _positions(hf_model: nn.Module, tokens: Tensor, cache, position_ids: Tensor | None):
    """The embedded tokens, their position ids (after the cached ones when not given) and
    the rotary tables of those positions, as the Hugging Face forward makes them."""
    model = hf_model.model
    x = model.embed_tokens(tokens)
    if position_ids is None:
        position_ids = (torch.arange(tokens.shape[1], device=x.device)
                        + cache.get_seq_length()).unsqueeze(0)
    return x, position_ids, model.rotary_emb(x, position_ids=position_ids)


def _attention_inputs(layer: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, cache):
    """A decoder layer up to its attention: the rotated queries and the whole cached keys and
    values (the new ones appended), with the head shape of ``x``'s positions."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    h = _rms(layer.input_layernorm, x)
    shape = (*h.shape[:-1], -1, attn.head_dim)
    q = _linear(attn.q_proj, h).view(shape).transpose(1, 2)
    k = _linear(attn.k_proj, h).view(shape).transpose(1, 2)
    v = _linear(attn.v_proj, h).view(shape).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k, v = cache.update(k, v, attn.layer_idx)
    return shape, q, k, v


def _after_attention(layer: nn.Module, residual: Tensor, out: Tensor) -> Tensor:
    """A decoder layer from its attention output (heads merged) on: output projection,
    residual, MLP, residual."""
    x = residual + _linear(layer.self_attn.o_proj, out)
    h = _rms(layer.post_attention_layernorm, x)
    mlp = layer.mlp
    h = mlp.act_fn(_linear(mlp.gate_proj, h)) * _linear(mlp.up_proj, h)
    return x + _linear(mlp.down_proj, h)


@torch.no_grad()
def step(
    hf_model: nn.Module, tokens: Int[Tensor, "batch 1"], cache,
    attention_mask: Int[Tensor, "batch key_pos"] | None = None,
    position_ids: Int[Tensor, "batch 1"] | None = None,
) -> tuple[Float[Tensor, "batch 1 d_vocab"], Int[Tensor, "batch n_layers n_heads"]]:
    """Forward one token per row after the cached positions; the cache grows by its keys and
    values.  ``attention_mask`` (0 at left padding) covers cached and new positions and
    ``position_ids`` count real tokens, as the Hugging Face forward takes them; None for both
    means no padding.  Returns the logits and every head's argmax key position."""
    from transformers.masking_utils import create_causal_mask
    from transformers.models.llama.modeling_llama import repeat_kv

    x, position_ids, (cos, sin) = _positions(hf_model, tokens, cache, position_ids)
    mask = None
    if attention_mask is not None and not bool(attention_mask.all()):
        mask = create_causal_mask(config=hf_model.config, inputs_embeds=x,
                                  attention_mask=attention_mask, cache=cache,
                                  position_ids=position_ids)
    tables = []
    for layer in hf_model.model.layers[: hf_model.config.num_hidden_layers]:
        attn = layer.self_attn
        shape, q, k, v = _attention_inputs(layer, x, cos, sin, cache)
        k = repeat_kv(k, attn.num_key_value_groups)
        v = repeat_kv(v, attn.num_key_value_groups)
        weights = torch.matmul(q, k.transpose(2, 3)) * attn.scaling
        if mask is not None:
            weights = weights + mask
        weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
        tables.append(weights[:, :, -1].argmax(dim=-1))
        out = torch.matmul(weights, v).transpose(1, 2).contiguous()
        x = _after_attention(layer, x, out.reshape(*shape[:-2], -1).contiguous())
    x = _rms(hf_model.model.norm, x)
    return _linear(hf_model.lm_head, x), torch.stack(tables, dim=1)


@torch.no_grad()
def prefill(
    hf_model: nn.Module, tokens: Int[Tensor, "batch pos"], cache,
    attention_mask: Int[Tensor, "batch key_pos"], position_ids: Int[Tensor, "batch pos"] | None,
    *, read_last: bool = False, spans: Int[Tensor, "batch 2"] | None = None,
) -> tuple[Float[Tensor, "batch 1 d_vocab"], Int[Tensor, "batch n_layers n_heads"],
           Float[Tensor, "batch n_layers n_heads"] | None] | None:
    """Forward a chunk after the cached positions on the SDPA twin and cache its keys and
    values: ``hf_model(input_ids=tokens, attention_mask=attention_mask, cache=cache,
    position_ids=position_ids, use_cache=True)`` as far as the cache can tell.

    Without ``read_last`` nothing else is computed.  With it, the chunk's last query also gets
    its attention weights in every layer, as the eager forward computes them from the same
    queries and keys (``softmax(q k^T * scaling)`` in float32, padding masked); returned are
    the last position's logits, each head's argmax key position and, with ``spans``, its
    attention mass on them (:func:`rh_lens.scoring.span_mass`).  The rest of the chunk is the
    SDPA forward's."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import create_causal_mask
    from transformers.models.llama.modeling_llama import repeat_kv

    batch = tokens.shape[0]
    x, position_ids, (cos, sin) = _positions(hf_model, tokens, cache, position_ids)
    mask = create_causal_mask(config=hf_model.config, inputs_embeds=x,
                              attention_mask=attention_mask, cache=cache,
                              position_ids=position_ids)
    layers = hf_model.model.layers[: hf_model.config.num_hidden_layers]
    tables, masses = [], []
    for index, layer in enumerate(layers):
        attn = layer.self_attn
        residual = x
        shape, q, k, v = _attention_inputs(layer, x, cos, sin, cache)
        if index == len(layers) - 1 and not read_last:
            return None  # nothing reads the last layer's output
        if read_last:
            weights = torch.matmul(q[:, :, -1:], repeat_kv(k, attn.num_key_value_groups)
                                   .transpose(2, 3)) * attn.scaling
            weights = weights.masked_fill(~attention_mask.bool()[:, None, None, :], -torch.inf)
            weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
            tables.append(weights[:, :, -1].argmax(dim=-1))
            if spans is not None:
                masses.append(span_mass(weights[:, :, -1], spans))
        if read_last and index == len(layers) - 1:  # only the last position is read: eager
            out = torch.matmul(weights, repeat_kv(v, attn.num_key_value_groups))
            out = out.transpose(1, 2).reshape(batch, 1, -1).contiguous()
            residual = residual[:, -1:]
        else:
            out, _ = sdpa_attention_forward(attn, q, k, v, mask, dropout=0.0,
                                            scaling=attn.scaling)
            out = out.reshape(*shape[:-2], -1).contiguous()
        x = _after_attention(layer, residual, out)
    x = _rms(hf_model.model.norm, x)
    return (_linear(hf_model.lm_head, x), torch.stack(tables, dim=1),
            torch.stack(masses, dim=1) if spans is not None else None)
