"""Induction scores: a head built to attend along the induction stripe scores 1, a uniform head
its known average, and the stripe read by the hook equals a position-by-position loop."""

import numpy as np
import pytest
import torch

from rh_lens.induction import InductionConfig, induction_scores, repeated_tokens
from tests.conftest import attached_hooks

SEQ = 8


def build_stripe_model(tokenizer):
    """One attention-only layer, one-hot positions: head 0's query at position p matches only
    the key at p - SEQ + 1 (for p >= SEQ - 1), head 1 has no query (uniform attention)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    n_ctx = 2 * SEQ + 1
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=32, n_heads=2, d_head=32, n_ctx=n_ctx, d_vocab=len(tokenizer),
        attn_only=True, normalization_type=None, positional_embedding_type="standard",
        act_fn="gelu", default_prepend_bos=True, model_name="stripe")
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.pos_embed.W_pos[:, :n_ctx] = torch.eye(n_ctx)
        attn = model.blocks[0].attn
        for p in range(SEQ - 1, n_ctx):
            attn.W_Q[0, p, p - SEQ + 1] = 100.0
        attn.W_K[0, :n_ctx, :n_ctx] = torch.eye(n_ctx)
    return model.eval()


def test_a_stripe_head_scores_one_and_a_uniform_head_its_average(tokenizer):
    model = build_stripe_model(tokenizer)
    cfg = InductionConfig(seq_len=SEQ, batch=3, seed=1)
    tokens = repeated_tokens(model, cfg)
    assert tokens.shape == (3, 2 * SEQ + 1) and (tokens[:, 0] == tokenizer.bos_token_id).all()
    scores = induction_scores(model, cfg)
    # The second copy's queries sit at positions SEQ+1 .. 2*SEQ; a uniform head gives each of
    # the p + 1 keys 1 / (p + 1).
    uniform = np.mean([1 / (p + 1) for p in range(SEQ + 1, 2 * SEQ + 1)])
    np.testing.assert_allclose(scores, [[1.0, uniform]], atol=1e-6)
    assert attached_hooks(model) == 0


def stripe_by_loop(model, tokens, seq_len):
    """The attention from each second-copy token to the token after its first occurrence,
    looked up token by token in the full cached patterns."""
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    n_batch, n_pos = tokens.shape
    start = n_pos - seq_len
    out = np.zeros((model.cfg.n_layers, model.cfg.n_heads))
    for layer, name in enumerate(names):
        pattern = cache[name]
        values = []
        for b in range(n_batch):
            for q in range(start, n_pos):
                earlier = q - seq_len  # the same token in the first copy
                assert tokens[b, earlier] == tokens[b, q]
                values.append(pattern[b, :, q, earlier + 1].double())
        out[layer] = torch.stack(values).mean(0).numpy()
    return out


def test_the_hooked_stripe_equals_a_loop_over_positions(tiny_gqa):
    cfg = InductionConfig(seq_len=20, batch=4, seed=3)
    tokens = repeated_tokens(tiny_gqa, cfg)
    np.testing.assert_allclose(induction_scores(tiny_gqa, cfg),
                               stripe_by_loop(tiny_gqa, tokens, cfg.seq_len), atol=1e-6)


def test_sequences_longer_than_the_context_are_refused(tokenizer):
    model = build_stripe_model(tokenizer)
    with pytest.raises(ValueError, match="exceed the model's context"):
        induction_scores(model, InductionConfig(seq_len=SEQ + 1))
    with pytest.raises(ValueError, match="seq_len >= 2"):
        InductionConfig(seq_len=1)


def test_the_tokens_are_seeded_and_skip_special_tokens(tokenizer):
    model = build_stripe_model(tokenizer)
    a, b = (repeated_tokens(model, InductionConfig(seq_len=SEQ, batch=50, seed=7))
            for _ in range(2))
    assert torch.equal(a, b)
    assert not torch.isin(a[:, 1:], torch.tensor(tokenizer.all_special_ids)).any()
