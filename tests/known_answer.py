"""A model whose retrieval head is known by construction (weights set, not trained).

One GPT-2-shaped layer (LayerNorms, zero MLP, zero positions) so that both backends can run it.
The residual stream has three blocks: the current token's one-hot (``A``), a flag that is 1 for
*needle tokens*, and a block (``B``) that only the copy head writes to.  The copy head's query is
a constant and its key reads the flag, so it attends (almost) only to needle tokens; its OV
circuit copies the attended token's one-hot from ``A`` into ``B``, and the unembedding reads
``B``: the model emits the needle token it looks at.  The flag also feeds the newline logit
directly, so once a needle token is the current input the model stops.  Every other head has
zero query and key weights (uniform attention, top-1 key = position 0) and writes nothing.
LayerNorm rescales each position but keeps every sign the circuit reads.  Detection must give
the copy head score 1 and the rest 0.

With ``question_ids``, a *question head* (``question_head``, writing nothing) attends to needle
tokens from the tokens ``question_ids`` only, and uniformly from every other token: its query
reads a question flag minus an always-zero coordinate (exactly 0 off the question, whatever
LayerNorm does), its key reads the needle flag minus the same zero coordinate.  Its QR score is
known by construction: question mass 1, null-question mass the needle's share of the keys.

``backend="bridge"`` saves the model and loads it back as a TransformerBridge around the
equivalent Hugging Face GPT-2 (``rh_lens.models.load_model``), so the same known answer checks
that backend.
"""

import tempfile
from pathlib import Path

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from rh_lens.models import load_model, save_model_dir


def build_copy_model(tokenizer, needle_ids: list[int], *, copy_head: int = 1, n_heads: int = 4,
                     n_ctx: int = 512, backend: str = "hooked", question_ids: list[int] = (),
                     question_head: int = 2):
    vocab = len(tokenizer)
    newline = tokenizer.encode("\n", add_special_tokens=False)
    if len(newline) != 1:
        raise ValueError("the tokenizer must have a single newline token")
    if n_heads < 3:
        raise ValueError("the residual stream (n_heads * vocab) must hold three vocab blocks")
    flag = 2 * vocab
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=n_heads * vocab, n_heads=n_heads, d_head=vocab, d_mlp=4, n_ctx=n_ctx,
        d_vocab=vocab, act_fn="gelu", normalization_type="LN",
        positional_embedding_type="standard", model_name="known-copy-head",
        default_prepend_bos=True,
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith(".w") else p.zero_()
        model.embed.W_E[:, :vocab] = torch.eye(vocab)
        model.embed.W_E[needle_ids, flag] = 1.0
        attn = model.blocks[0].attn
        attn.b_Q[copy_head, 0] = 1.0
        attn.W_K[copy_head, flag, 0] = 100.0 * vocab**0.5  # attention scale is sqrt(d_head)
        attn.W_V[copy_head, :vocab, :] = torch.eye(vocab)
        attn.W_O[copy_head, :, vocab : 2 * vocab] = torch.eye(vocab)
        model.unembed.W_U[vocab : 2 * vocab, :] = 10.0 * torch.eye(vocab)
        model.unembed.W_U[flag, newline[0]] = 1000.0
        if question_ids:
            if question_head == copy_head:
                raise ValueError("the question head must differ from the copy head")
            qflag, zero = flag + 1, flag + 2
            model.embed.W_E[list(question_ids), qflag] = 1.0
            attn.W_Q[question_head, qflag, 0] = 1.0
            attn.W_Q[question_head, zero, 0] = -1.0
            attn.W_K[question_head, flag, 0] = 100.0 * vocab**0.5
            attn.W_K[question_head, zero, 0] = -100.0 * vocab**0.5
    model.eval()
    if backend == "hooked":
        return model
    return reload_on(model, backend)


def reload_on(model: HookedTransformer, backend: str):
    """``model`` written with ``save_model_dir`` and loaded back on ``backend``."""
    directory = Path(tempfile.mkdtemp(prefix="rh-lens-known-")) / model.cfg.model_name
    path = save_model_dir(directory, cfg=model.cfg, state_dict=model.state_dict(),
                          tokenizer=model.tokenizer)
    return load_model(path, backend=backend)
