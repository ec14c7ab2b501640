"""The plain-PyTorch training twin against the HookedTransformer."""

import pytest
import torch


def _cfg(family: str, vocab: int):
    from rh_lens.zoo.training.recipes import Recipe

    r = Recipe(name="t", family=family, n_layers=2, d_model=32, n_heads=4,
               n_kv_heads=2 if family == "llama" else 4, d_head=8, d_mlp=64, n_ctx=64, steps=1,
               vocab_size=vocab)
    return r.hooked_config()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_twin_logits_equal_hooked_transformer(family):
    from transformer_lens import HookedTransformer

    from rh_lens.zoo.training.twin import Twin

    cfg = _cfg(family, 97)
    twin = Twin(cfg, seed=0)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        # Random, non-trivial weights, and biases where the family has them (the llama
        # twin's stay at zero: it never adds them).
        for _, p in twin.trainable():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    model = HookedTransformer(cfg)
    missing, unexpected = model.load_state_dict(twin.state_dict(), strict=False)
    assert not unexpected
    assert all(k.rsplit(".", 1)[-1] in {"mask", "IGNORE", "rotary_sin", "rotary_cos"}
               for k in missing)
    tokens = torch.randint(0, 97, (2, 50), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(twin(tokens), model(tokens), atol=1e-4, rtol=1e-4)
    if family == "llama":
        assert "blocks.0.attn._W_K" in twin.state_dict()


def test_the_llama_twin_skips_its_zero_biases_without_changing_a_bit():
    from rh_lens.zoo.training.twin import Twin

    cfg = _cfg("llama", 97)
    twin = Twin(cfg, seed=0)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in twin.trainable():
            p[1].add_(torch.randn(p[1].shape, generator=gen) * 0.3)
    tokens = torch.randint(0, 97, (2, 50), generator=torch.Generator().manual_seed(1))

    def logits_and_grads():
        twin.zero_grad(set_to_none=True)
        out = twin(tokens)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for _, p in twin.trainable()]

    fast, fast_grads = logits_and_grads()
    twin._bias = lambda x, b: x + b  # the obvious forward: every bias added
    slow, slow_grads = logits_and_grads()
    assert torch.equal(fast, slow)
    assert all(torch.equal(a, b) for a, b in zip(fast_grads, slow_grads, strict=True))


def test_the_llama_twin_refuses_weights_with_nonzero_biases():
    from rh_lens.zoo.training.twin import Twin

    twin = Twin(_cfg("llama", 97), seed=0)
    weights = twin.state_dict()
    weights["blocks.1.mlp.b_out"] = torch.full_like(weights["blocks.1.mlp.b_out"], 0.5)
    with pytest.raises(ValueError, match="blocks.1.mlp.b_out"):
        twin.load_state_dict(weights)
