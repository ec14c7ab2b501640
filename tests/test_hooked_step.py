"""A HookedTransformer's lean forward against TransformerLens's own: the same logits, cache,
argmax positions and span masses, bit for bit, over a prefill and decode steps, with and
without left padding, on the Llama-family variants it accepts; and everything else (a hook, a
hook flag, another architecture) goes through TransformerLens."""

import pytest
import torch

from rh_lens import _hooked_step, engine, hooks
from rh_lens.models import HAS_HOOKED, load_model

pytestmark = pytest.mark.skipif(not HAS_HOOKED, reason="needs transformer-lens 3.x")


def _random_llama(**overrides):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    fields = dict(n_layers=3, d_model=64, d_head=16, n_heads=4, d_mlp=96, d_vocab=300,
                  n_ctx=96, act_fn="silu", normalization_type="RMS",
                  positional_embedding_type="rotary", rotary_dim=16, gated_mlp=True,
                  final_rms=True, seed=0, default_prepend_bos=False)
    fields.update(overrides)
    model = HookedTransformer(HookedTransformerConfig(**fields))
    with torch.no_grad():  # random norm weights and biases, so that a skipped one shows
        for name, param in model.named_parameters():
            if name.endswith((".w", "b_Q", "_b_K", "b_K", "_b_V", "b_V", "b_O", "b_in", "b_U")):
                param.normal_(0.5 if name.endswith(".w") else 0.0, 0.3)
    return model.eval()


VARIANTS = {
    "zoo:llama-s": lambda: load_model("zoo:llama-s", backend="hooked"),
    "grouped": lambda: _random_llama(n_key_value_heads=2),
    "full heads, adjacent pairs, partial rotary, pre-norm": lambda: _random_llama(
        rotary_adjacent_pairs=True, rotary_dim=8, normalization_type="RMSPre"),
    "bfloat16": lambda: _random_llama(n_key_value_heads=2, dtype=torch.bfloat16),
}


def _decode(model, tokens, mask, *, lean):
    """Prefill then step, through the engine; ``lean=False`` attaches a do-nothing hook, which
    sends every forward through TransformerLens's own."""
    n_prefill = tokens.shape[1] - 4
    spans = torch.tensor([[2, 9]] * tokens.shape[0])
    state = engine.new_kv_state(model, tokens.shape[0])
    noop = [] if lean else [(hooks.resid_pre(0), lambda x, hook: None)]
    out = []
    with engine.attached(model, noop):
        assert engine._lean(model, tokens.shape[1]) is lean
        out.append(engine.forward_chunk(model, tokens[:, :n_prefill], state,
                                        mask[:, :n_prefill], logits=False))
        for t in range(n_prefill, tokens.shape[1] - 1):
            out.extend(engine.forward_reads(model, tokens[:, t : t + 1], state,
                                            mask[:, t : t + 1], spans=spans))
        out.append(engine.forward_chunk(model, tokens[:, -1:], state, mask[:, -1:]))
    return out, state


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("padded", [False, True])
def test_the_lean_forward_is_transformer_lens_bit_for_bit(variant, padded):
    model = VARIANTS[variant]()
    assert _hooked_step.supports(model)
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(1, model.cfg.d_vocab, (3, 40), generator=gen)
    mask = torch.ones_like(tokens)
    if padded:
        mask[0, :11] = 0
        mask[2, :3] = 0
    ours, lean_state = _decode(model, tokens, mask, lean=True)
    theirs, tl_state = _decode(model, tokens, mask, lean=False)
    assert ours[0] is None and theirs[0] is None
    for a, b in zip(ours[1:], theirs[1:], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(lean_state.cache.entries, tl_state.cache.entries, strict=True):
        assert torch.equal(a.past_keys, b.past_keys) and torch.equal(a.past_values, b.past_values)
    assert torch.equal(lean_state.cache.previous_attention_mask,
                       tl_state.cache.previous_attention_mask)
    if padded:  # the padding is never an argmax
        tables = torch.stack([ours[i] for i in range(2, len(ours) - 1, 3)])
        assert int(tables[:, 0].min()) >= 11 and int(tables[:, 2].min()) >= 3


@pytest.mark.parametrize("variant", ["grouped", "full heads, adjacent pairs, partial rotary, pre-norm"])
def test_rotated_keys_follow_every_change_of_the_cache(variant):
    """Lean forwards keep each layer's keys rotated between calls; a forward through
    TransformerLens or a row selection in between must leave every later forward bit for bit
    TransformerLens's, and a frozen cache must keep them as they were."""
    model = VARIANTS[variant]()
    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(1, model.cfg.d_vocab, (3, 30), generator=gen)
    mask = torch.ones_like(tokens)
    mask[1, :6] = 0
    noop = [(hooks.resid_pre(0), lambda x, hook: None)]
    # the forwards: (start, end, through TransformerLens, rows kept afterwards)
    plan = [(0, 9, False, None), (9, 10, False, None), (10, 11, True, None),
            (11, 12, False, None), (12, 13, False, [0, 2]), (13, 14, False, None),
            (14, 20, False, None), (20, 21, False, None)]
    runs = {}
    for lean in (True, False):
        state, rows, out = engine.new_kv_state(model, 3), torch.arange(3), []
        for start, end, through_tl, keep in plan:
            with engine.attached(model, noop if through_tl or not lean else []):
                logits, table, _ = engine.forward_reads(model, tokens[rows, start:end], state,
                                                        mask[rows, start:end])
            out += [logits, table]
            if keep is not None:
                rows = rows[keep]
                engine.select_rows(model, state, torch.tensor(keep))
        runs[lean] = out, state
    (ours, lean_state), (theirs, tl_state) = runs[True], runs[False]
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    for entry, tl_entry in zip(lean_state.cache.entries, tl_state.cache.entries, strict=True):
        assert torch.equal(entry.past_keys, tl_entry.past_keys)
        mirror = getattr(entry, _hooked_step._MIRROR)  # kept up to date, not rebuilt
        assert mirror.source is entry.past_keys and mirror.length == entry.past_keys.shape[1]
    ids = tokens[rows, 21:23]
    for state in (lean_state, tl_state):
        state.cache.freeze()
    ours = _hooked_step.forward(model, ids, lean_state.cache, torch.ones_like(ids))[0]
    assert torch.equal(ours, model(ids, past_kv_cache=tl_state.cache,
                                   attention_mask=torch.ones_like(ids)))
    for entry, tl_entry in zip(lean_state.cache.entries, tl_state.cache.entries, strict=True):
        assert entry.past_keys.shape[:2] == tl_entry.past_keys.shape[:2] == (2, 21)
        assert getattr(entry, _hooked_step._MIRROR).length == 21


def test_a_hook_a_flag_or_another_architecture_takes_transformer_lens():
    model = _random_llama()
    assert _hooked_step.unhooked(model)
    handle = model.blocks[1].mlp.register_forward_hook(lambda *args: None)
    assert not _hooked_step.unhooked(model) and not engine._lean(model, 10)
    handle.remove()
    with model.hooks(fwd_hooks=[("blocks.2.attn.hook_z", lambda x, hook: None)]):
        assert not engine._lean(model, 10)
    assert engine._lean(model, 10)
    saved = engine.set_hook_flags(model, {"use_attn_result": True})
    assert not _hooked_step.supports(model)
    engine.set_hook_flags(model, saved)
    assert _hooked_step.supports(model)
    assert not engine._lean(model, model.blocks[0].attn.rotary_cos.shape[0] + 1)
    assert not _hooked_step.supports(load_model("zoo:gpt2-s", backend="hooked"))


@pytest.mark.parametrize("padded", [False, True])
def test_reading_a_whole_chunk_gives_the_argmax_of_transformer_lens(padded):
    """A prompt's last token forwarded with its chunk (the last layer computing the last
    position alone) against TransformerLens's forward of the chunk under the argmax hooks."""
    model = VARIANTS["zoo:llama-s"]()
    gen = torch.Generator().manual_seed(8)
    tokens = torch.randint(1, model.cfg.d_vocab, (3, 60), generator=gen)
    mask = torch.ones_like(tokens)
    if padded:
        mask[1, :20] = 0
    spans = torch.tensor([[25, 31], [22, 40], [0, 5]])
    out = {}
    for lean in (True, False):
        state = engine.new_kv_state(model, 3)
        noop = [] if lean else [(hooks.resid_pre(0), lambda x, hook: None)]
        with engine.attached(model, noop):
            assert engine.reads_whole_chunks(model) is lean
            out[lean] = engine.forward_reads(model, tokens, state, mask, spans=spans,
                                             last_only=True)
    (logits, table, mass), (tl_logits, tl_table, tl_mass) = out[True], out[False]
    assert logits.shape == tl_logits.shape == (3, 1, model.cfg.d_vocab)
    assert torch.equal(table, tl_table)
    if padded:
        assert int(table[1].min()) >= 20
    torch.testing.assert_close(mass, tl_mass, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits, tl_logits, rtol=0, atol=1e-5)
