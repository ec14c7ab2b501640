"""A HookedTransformer whose retrieval head is known by construction (weights set, not trained).

One attention layer, no positions, no norms.  The residual stream has three blocks: the current
token's one-hot (``A``), a flag that is 1 for *needle tokens*, and a block (``B``) that only the
copy head writes to.  The copy head's query is a constant and its key reads the flag, so it
attends (almost) only to needle tokens; its OV circuit copies the attended token's one-hot from
``A`` into ``B``, and the unembedding reads ``B``: the model emits the needle token it looks at.
The flag also feeds the newline logit directly, so once a needle token is the current input the
model stops.  Every other head has zero query and key weights (uniform attention, top-1 key =
position 0) and writes nothing.  Detection must give the copy head score 1 and the rest 0.
"""

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig


def build_copy_model(tokenizer, needle_ids: list[int], *, copy_head: int = 1, n_heads: int = 4,
                     n_ctx: int = 512) -> HookedTransformer:
    vocab = len(tokenizer)
    newline = tokenizer.encode("\n", add_special_tokens=False)
    if len(newline) != 1:
        raise ValueError("the tokenizer must have a single newline token")
    d_model = 2 * vocab + 1
    flag = 2 * vocab
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=d_model, n_heads=n_heads, d_head=vocab, n_ctx=n_ctx, d_vocab=vocab,
        attn_only=True, normalization_type=None, positional_embedding_type="standard",
        act_fn="relu", model_name="known-copy-head", default_prepend_bos=True,
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.embed.W_E[:, :vocab] = torch.eye(vocab)
        model.embed.W_E[needle_ids, flag] = 1.0
        attn = model.blocks[0].attn
        attn.b_Q[copy_head, 0] = 1.0
        attn.W_K[copy_head, flag, 0] = 100.0 * vocab**0.5  # attention scale is sqrt(d_head)
        attn.W_V[copy_head, :vocab, :] = torch.eye(vocab)
        attn.W_O[copy_head, :, vocab : 2 * vocab] = torch.eye(vocab)
        model.unembed.W_U[vocab : 2 * vocab, :] = 10.0 * torch.eye(vocab)
        model.unembed.W_U[flag, newline[0]] = 100.0
    return model.eval()
