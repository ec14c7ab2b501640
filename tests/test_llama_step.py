"""The Bridge's lean Llama decode step against the eager Hugging Face forward it replaces: the
same logits, key/value cache and argmax positions, bit for bit."""

import pytest
import torch

from rh_lens import _bridge, _llama_step
from rh_lens.engine import forward_chunk, new_kv_state
from rh_lens.models import load_model


def _two_caches(model, tokens, mask):
    import copy

    state = new_kv_state(model, tokens.shape[0])
    forward_chunk(model, tokens, state, mask)
    return state.cache, copy.deepcopy(state.cache)


@pytest.mark.tl4
@pytest.mark.parametrize(("spec", "dtype"), [("zoo:llama-s", None), ("zoo:llama-m", None),
                                             ("zoo:llama-s", "bfloat16")])
@pytest.mark.parametrize("padded", [False, True])
@torch.no_grad()
def test_the_lean_step_is_the_eager_forward_bit_for_bit(spec, dtype, padded):
    model = load_model(spec, backend="bridge", dtype=dtype)
    eager = model.__dict__[_bridge.EAGER_ATTR]
    eager.tie()
    hf = eager.model
    assert _llama_step.supports(hf)
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(5, model.cfg.d_vocab, (3, 120), generator=gen)
    mask = torch.ones(3, 121, dtype=torch.long)
    if padded:
        mask[1, :17] = 0
        mask[2, :4] = 0
    theirs, ours = _two_caches(model, tokens, mask[:, :120] if padded else None)
    step = torch.randint(5, model.cfg.d_vocab, (3, 1), generator=gen)
    positions = (mask.cumsum(1) - 1).clamp(min=0)[:, 120:] if padded else None
    kw = {} if positions is None else {"position_ids": positions}
    out = hf(input_ids=step, attention_mask=mask, use_cache=True, output_attentions=True,
             cache=theirs, **kw)
    logits, table = _llama_step.step(hf, step, ours, mask if padded else None, positions)
    assert torch.equal(logits, out.logits)
    assert torch.equal(table, torch.stack([a[:, :, -1].argmax(-1) for a in out.attentions], 1))
    for a, b in zip(theirs.layers, ours.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@pytest.mark.tl4
def test_only_eager_llama_models_take_the_lean_step():
    gpt2 = load_model("zoo:gpt2-s", backend="bridge")
    assert not _llama_step.supports(gpt2.__dict__[_bridge.EAGER_ATTR].model)
    llama = load_model("zoo:llama-s", backend="bridge")
    assert not _llama_step.supports(llama.__dict__[_bridge.TWIN_ATTR].model)  # SDPA


@pytest.mark.tl4
@pytest.mark.parametrize("spec", ["zoo:llama-s", "zoo:llama-m"])
@pytest.mark.parametrize("padded", [False, True])
@torch.no_grad()
def test_the_lean_prefill_caches_what_the_sdpa_forward_caches(spec, padded):
    from transformers import DynamicCache

    model = load_model(spec, backend="bridge")
    twin = model.__dict__[_bridge.TWIN_ATTR]
    twin.tie()
    hf = twin.model
    assert _llama_step.supports_sdpa(hf)
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(5, model.cfg.d_vocab, (3, 90), generator=gen)
    mask = torch.ones_like(tokens)
    if padded:
        mask[0, :30] = 0
        mask[2, :5] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    theirs, ours = DynamicCache(config=hf.config), DynamicCache(config=hf.config)
    for start, end in ((0, 60), (60, 90)):  # a second chunk reads the first one's cache
        kw = {"position_ids": positions[:, start:end]} if padded else {}
        hf(input_ids=tokens[:, start:end], attention_mask=mask[:, :end], use_cache=True,
           cache=theirs, logits_to_keep=1, **kw)
        _llama_step.prefill(hf, tokens[:, start:end], ours, mask[:, :end],
                            kw.get("position_ids"))
    for a, b in zip(theirs.layers, ours.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@pytest.mark.tl4
@pytest.mark.parametrize("padded", [False, True])
@torch.no_grad()
def test_the_prefill_reads_its_last_query_as_the_eager_forward_does(padded):
    """The SDPA prefill that also reads its last query (a prompt's last token forwarded with
    the prompt) against the eager forward of the same chunk with every layer's attention
    weights: the same argmax positions and span masses, logits within float rounding."""
    from transformers import DynamicCache

    from rh_lens.scoring import span_mass

    model = load_model("zoo:llama-s", backend="bridge")
    twin, eager = model.__dict__[_bridge.TWIN_ATTR], model.__dict__[_bridge.EAGER_ATTR]
    twin.tie()
    eager.tie()
    gen = torch.Generator().manual_seed(6)
    tokens = torch.randint(5, model.cfg.d_vocab, (3, 70), generator=gen)
    mask = torch.ones_like(tokens)
    if padded:
        mask[0, :25] = 0
        mask[2, :6] = 0
    kw = {"position_ids": (mask.cumsum(1) - 1).clamp(min=0)} if padded else {}
    spans = torch.tensor([[30, 40], [3, 9], [50, 52]])
    out = eager.model(input_ids=tokens, attention_mask=mask, use_cache=True,
                      output_attentions=True, cache=DynamicCache(config=eager.model.config), **kw)
    logits, table, mass = _llama_step.prefill(
        twin.model, tokens, DynamicCache(config=twin.model.config), mask,
        kw.get("position_ids"), read_last=True, spans=spans)
    rows = [a[:, :, -1] for a in out.attentions]
    assert torch.equal(table, torch.stack([r.argmax(-1) for r in rows], dim=1))
    if padded:
        assert int(table[0].min()) >= 25 and int(table[2].min()) >= 6
    torch.testing.assert_close(mass, torch.stack([span_mass(r, spans) for r in rows], dim=1),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, out.logits[:, -1:], rtol=0, atol=1e-4)
