"""The slow obvious implementation of a key/value policy, to hold the masked one to.

At every decoding step the whole sequence is forwarded again without a cache (as
:func:`rh_lens.decode.decode_slow` does).  In every layer, each windowed head's output is rebuilt
from an explicit truncated cache: for the query at position ``p`` the keys and values of the
first ``sink`` tokens and of positions ``p - window + 1 .. p`` are gathered (after the rotary
embedding, so each keeps its own position), attention is a softmax over those alone, and the
head's ``hook_z`` is replaced by its weighted values.  A windowed head's top-1 key is read from
those weights, mapped back to its absolute position; a full head's from its pattern.  Needs the
HookedTransformer (it reads each layer's attention scale).
"""

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from rh_lens import hooks
from rh_lens.decode import Decoded, is_stop_token
from rh_lens.heads import heads_by_layer
from rh_lens.kvcache.policy import KVPolicy
from rh_lens.models import check_context, model_facts


def kept_positions(p: int, *, sink: int, window: int) -> list[int]:
    """The key positions a windowed query at position ``p`` keeps, ascending."""
    return sorted(set(range(min(sink, p + 1))) | set(range(max(0, p - window + 1), p + 1)))


def _check_plain_attention(model) -> None:
    cfg = model.cfg
    unusual = [name for name, on in (
        ("ALiBi", cfg.positional_embedding_type == "alibi"),
        ("score soft-capping", getattr(cfg, "attn_scores_soft_cap", -1.0) > 0),
        ("attention sinks", getattr(cfg, "use_attention_sinks", False)),
        ("log-n scaling", getattr(cfg, "use_logn_attn", False))) if on]
    if unusual:
        raise ValueError(f"the truncated-cache reference does not model {', '.join(unusual)}")
    if not hasattr(model.blocks[0].attn, "attn_scale"):
        raise ValueError("the truncated-cache reference needs a HookedTransformer")


@torch.no_grad()
def decode_kv_policy_slow(model, prompt: Int[Tensor, " pos"], policy: KVPolicy, *,
                          max_new_tokens: int = 50) -> Decoded:
    """Greedy decoding of ``prompt`` under ``policy``, every windowed head attending over an
    explicitly truncated cache (see the module docstring)."""
    _check_plain_attention(model)
    facts = model_facts(model)
    size = facts.group_size
    windowed = heads_by_layer(policy.windowed_heads(
        n_layers=facts.n_layers, n_heads=facts.n_heads, n_kv_heads=facts.n_kv_heads))
    rotary = facts.positional == "rotary"
    sequence = prompt.tolist()
    check_context(model, len(sequence) + max_new_tokens, what="prompt plus new tokens")
    emitted, positions = [], []
    for _ in range(max_new_tokens):
        table = np.zeros((facts.n_layers, facts.n_heads), dtype=np.int32)
        acts: dict[str, Tensor] = {}

        def keep(act, hook, acts=acts):
            acts[hook.name] = act

        def top1(pat, hook, layer=0, table=table):
            table[layer] = pat[0, :, -1].argmax(dim=-1).cpu().numpy()

        def rebuild(z, hook, layer=0, heads=(), acts=acts, table=table):
            q = acts[(hooks.rot_q if rotary else hooks.q)(layer)][0]
            k = acts[(hooks.rot_k if rotary else hooks.k)(layer)][0]
            v = acts[hooks.v(layer)][0]
            scale = model.blocks[layer].attn.attn_scale
            out = z.clone()
            for h in heads:
                g = h // size
                for p in range(z.shape[1]):
                    kept = kept_positions(p, sink=policy.sink, window=policy.window)
                    cache_k, cache_v = k[kept, g], v[kept, g]
                    weights = torch.softmax((cache_k @ q[p, h]) / scale, dim=-1)
                    out[0, p, h] = weights @ cache_v
                    if p == z.shape[1] - 1:
                        table[layer, h] = kept[int(weights.argmax())]
            return out

        fwd = []
        for layer in range(facts.n_layers):
            fwd.append((hooks.pattern(layer), lambda pat, hook, layer=layer: top1(pat, hook,
                                                                                  layer)))
        for layer, heads in windowed.items():
            names = ((hooks.rot_q, hooks.rot_k) if rotary else (hooks.q, hooks.k))
            fwd += [(names[0](layer), keep), (names[1](layer), keep), (hooks.v(layer), keep),
                    (hooks.z(layer), lambda z, hook, layer=layer, heads=tuple(heads):
                     rebuild(z, hook, layer, heads))]
        # the pattern hooks run before hook_z, so rebuilt heads overwrite their pattern's top-1
        tokens = torch.tensor([sequence], device=model.cfg.device)
        logits = model.run_with_hooks(tokens, fwd_hooks=fwd,
                                      attention_mask=torch.ones_like(tokens))
        next_id = int(logits[0, -1].argmax())
        emitted.append(next_id)
        positions.append(table)
        sequence.append(next_id)
        if is_stop_token(model, next_id):
            break
    return Decoded(np.array(emitted, dtype=np.int64), np.stack(positions),
                   model.tokenizer.decode(emitted))
