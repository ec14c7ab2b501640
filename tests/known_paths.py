"""A 2-layer HookedTransformer whose path structure is known by construction (weights set).

Tokens: ``BOS``, a marker ``M``, fillers, two candidate answers ``a`` and ``b``, a query token.
The needle is the candidate right after ``M``.  The residual stream has four blocks: the current
token's one-hot (``TOK``), the position's one-hot (``POS``), a ``FLAG`` dimension, and an output
block (``OUT``) that the unembedding reads.  Attention only, no norms.

- Head A = (0, 0), a previous-token head: its query/key read ``POS`` and match position p to
  p - 1; its value reads "the token is M"; it writes ``FLAG``.  So FLAG = 1 on the needle.
- Head B = (1, 0): a constant query; its key reads ``FLAG`` only, so it attends to the needle;
  its value/output copy the attended token into ``OUT``: the model says the needle.
- Head C = (1, 1): zero query and key (uniform attention); it copies the mean token one-hot into
  ``OUT``, never reading ``FLAG``.  Head (0, 1) is idle (all zero).

Clean and corrupted prompts swap the marker (``M a ... F b`` vs ``F a ... M b``): the answer is
``a`` or ``b``.  The effect of A therefore runs entirely through B's keys: A -> B.k carries all of
it; A -> B.q, A -> B.v, A -> C.* and A -> direct carry exactly none (the weights reading FLAG are
zero there).  C sees the same tokens in both prompts, so patching it changes nothing.
"""

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

BOS, M, F, A_TOK, B_TOK, QUERY, F2, F3 = range(8)
VOCAB = 8
N_CTX = 16
HEAD_A, IDLE, HEAD_B, HEAD_C = (0, 0), (0, 1), (1, 0), (1, 1)
CLEAN = [BOS, F, M, A_TOK, F2, F, B_TOK, F3, F, QUERY]  # needle: a (after M at 2)
CORRUPTED = [BOS, F, F, A_TOK, F2, M, B_TOK, F3, F, QUERY]  # needle: b (after M at 5)
SHARP = 40.0  # attention logit of a match; the rest get 0, so leakage is ~exp(-40)


def build_path_model() -> HookedTransformer:
    tok, pos = slice(0, VOCAB), slice(VOCAB, VOCAB + N_CTX)
    flag = VOCAB + N_CTX
    out = slice(flag + 1, flag + 1 + VOCAB)
    d_head = N_CTX
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=2 * VOCAB + N_CTX + 1, n_heads=2, d_head=d_head, n_ctx=N_CTX,
        d_vocab=VOCAB, attn_only=True, normalization_type=None, act_fn="relu",
        positional_embedding_type="standard", model_name="known-paths", seed=0,
    )
    model = HookedTransformer(cfg)
    scale = SHARP * d_head**0.5  # scores are divided by sqrt(d_head)
    eye = torch.eye(VOCAB)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.embed.W_E[:, tok] = eye
        model.pos_embed.W_pos[:, pos] = torch.eye(N_CTX)
        a = model.blocks[0].attn
        h = HEAD_A[1]
        a.W_Q[h, pos, :] = scale * torch.eye(N_CTX)  # position p -> direction p
        a.W_K[h, pos, :] = torch.diag(torch.ones(N_CTX - 1), diagonal=1)  # p -> direction p + 1
        a.W_V[h, M, 0] = 1.0
        a.W_O[h, 0, flag] = 1.0
        b = model.blocks[1].attn
        h = HEAD_B[1]
        b.b_Q[h, 0] = 1.0
        b.W_K[h, flag, 0] = scale
        b.W_V[h, tok, :VOCAB] = eye
        b.W_O[h, :VOCAB, out] = eye
        h = HEAD_C[1]
        b.W_V[h, tok, :VOCAB] = eye
        b.W_O[h, :VOCAB, out] = eye
        model.unembed.W_U[out, :] = 10.0 * eye
    return model.eval()


def path_pair():
    """The clean/corrupted pair (needle ``a`` vs ``b``) as a :class:`rh_lens.patching.PatchPair`."""
    from rh_lens.patching import PatchPair

    return PatchPair(torch.tensor(CLEAN), torch.tensor(CORRUPTED), A_TOK, B_TOK)
