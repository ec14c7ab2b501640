"""Batched decoding of prompts of different lengths against the slow obvious implementation.

Left padding must change nothing: every row's tokens, recorded argmax positions (indexing its own
prompt, never the padding) and text equal ``decode_slow`` on that prompt alone, on every engine,
for a grouped-query rotary model and a multi-head model with learned positions.
"""

import numpy as np
import pytest
import torch

from rh_lens import _bridge
from rh_lens import decode
from rh_lens.decode import decode_greedy, decode_slow, is_stop_token, left_pad, phase_times
from rh_lens.detect import DetectConfig, cells, run_trials
from rh_lens.engine import (attached, forward_argmax, forward_chunk, new_kv_state,
                            reads_whole_chunks)
from rh_lens.hooks import pattern
from rh_lens.models import load_model
from rh_lens.niah import build_trial
from rh_lens.zoo.inputs import zoo_inputs
from tests.conftest import BACKENDS, CORPUS

ZOO = ("zoo:llama-s", "zoo:gpt2-s")  # GQA + rotary; MHA + learned positions


@pytest.fixture(scope="module", params=[(m, b) for m in ZOO for b in BACKENDS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def zoo_model(request):
    name, backend = request.param
    return load_model(name, backend=backend)


def mixed_prompts(model) -> list[torch.Tensor]:
    """NIAH prompts of four lengths (answers stop at a newline after a few tokens) and two
    prompts cut inside the haystack (prose that runs on), so rows leave the batch at
    different steps."""
    needles, haystacks = zoo_inputs(3, seed=0)
    trials = [build_trial(model, needles[i % 3], haystacks[i % 3], context_length=length,
                          depth=depth, buffer=64, max_new_tokens=12)
              for i, (length, depth) in enumerate([(200, 50.0), (112, 0.0), (160, 100.0),
                                                    (136, 30.0)])]
    prompts = [t.tokens for t in trials]
    return [*prompts, prompts[0][:37], prompts[2][:90]]


@pytest.mark.tl4
def test_padded_batch_equals_slow_reference(zoo_model):
    prompts = mixed_prompts(zoo_model)
    assert len({len(p) for p in prompts}) == len(prompts)
    batched = decode_greedy(zoo_model, prompts, max_new_tokens=12, chunk_size=40)
    assert len({len(out.tokens) for out in batched}) > 1  # rows left the batch at different steps
    for prompt, out in zip(prompts, batched, strict=True):
        slow = decode_slow(zoo_model, prompt, max_new_tokens=12)
        np.testing.assert_array_equal(out.tokens, slow.tokens)
        np.testing.assert_array_equal(out.positions, slow.positions)
        assert out.text == slow.text
        assert out.positions.min() >= 0  # a padding column would map to a negative position


@pytest.mark.tl4
def test_phase_times_clock_each_forward(zoo_model, monkeypatch):
    """With a clock that advances one second per reading, the prefill is one block and the
    steps are one per decode-step forward plus one per shrinking of the batch: counts that
    follow from what was decoded (rows leave after their last token; the last prompt token
    goes with the prompt when the engine reads whole chunks)."""
    ticks = iter(range(10**6))
    monkeypatch.setattr(decode, "time", type("Clock", (), {
        "process_time": staticmethod(lambda: float(next(ticks)))}))
    prompts = mixed_prompts(zoo_model)
    with phase_times() as outer, phase_times() as clock:
        outs = decode_greedy(zoo_model, prompts, max_new_tokens=12, chunk_size=40)
    lengths = {len(out.tokens) for out in outs}
    forwards = max(lengths) - 1 + (0 if reads_whole_chunks(zoo_model) else 1)
    assert clock == {"prefill": 1.0, "steps": float(forwards + len(lengths) - 1)}
    assert outer == {"prefill": 0.0, "steps": 0.0}  # the innermost block takes the time
    decode_greedy(zoo_model, prompts[:1], max_new_tokens=2)
    assert clock["prefill"] == 1.0 and not decode._PHASES  # closed blocks clock nothing


@pytest.mark.tl4
def test_detection_batches_equal_single_trials(zoo_model):
    needles, haystacks = zoo_inputs(2, seed=1)
    cfg = DetectConfig(lengths=(112, 200), depths=(0.0, 60.0), buffer=64, max_new_tokens=12)
    todo = cells(2, cfg)[:6]
    single = run_trials(zoo_model, needles, haystacks, todo, cfg)
    batched = run_trials(zoo_model, needles, haystacks, todo,
                         DetectConfig(**{**cfg.to_dict(), "batch_size": 4}))
    assert [r.cell for r in batched] == todo
    for a, b in zip(single, batched, strict=True):
        assert a.generated == b.generated and a.rouge1_recall == b.rouge1_recall
        for name, value in a.arrays().items():
            np.testing.assert_array_equal(value, b.arrays()[name], err_msg=name)


def test_padding_is_never_attended(tiny_gqa):
    """Random prompts on a tiny untrained model: padded rows equal single rows equal the slow
    reference, with stop at end-of-sequence only."""
    gen = torch.Generator().manual_seed(3)
    vocab = tiny_gqa.cfg.d_vocab
    prompts = [torch.randint(3, vocab, (n,), generator=gen) for n in (5, 19, 11, 2)]
    batched = decode_greedy(tiny_gqa, prompts, max_new_tokens=6, chunk_size=4, stop="eos")
    for prompt, out in zip(prompts, batched, strict=True):
        (single,) = decode_greedy(tiny_gqa, prompt[None], max_new_tokens=6, stop="eos")
        slow = decode_slow(tiny_gqa, prompt, max_new_tokens=len(single.tokens))
        np.testing.assert_array_equal(out.tokens, single.tokens)
        np.testing.assert_array_equal(out.positions, single.positions)
        np.testing.assert_array_equal(out.tokens, slow.tokens)
        np.testing.assert_array_equal(out.positions, slow.positions)


@pytest.mark.tl4
def test_left_pad_known_answer():
    tokens, mask, n_pad = left_pad([torch.tensor([5, 6, 7]), torch.tensor([8])], pad_id=0)
    assert tokens.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert n_pad.tolist() == [0, 2]
    _, mask, _ = left_pad([torch.tensor([1, 2]), torch.tensor([3, 4])], pad_id=0)
    assert mask is None


def test_hooks_refuse_prompts_of_different_lengths(tiny_gqa):
    prompts = [torch.tensor([4, 5, 6]), torch.tensor([7, 8])]
    with pytest.raises(ValueError, match="different lengths cannot be decoded under hooks"):
        decode_greedy(tiny_gqa, prompts, max_new_tokens=2,
                      decode_hooks=[(pattern(0), lambda x, hook: None)])


def test_stop_tokens_by_id(tiny_gqa):
    tok = tiny_gqa.tokenizer
    newline = tok.encode("\n", add_special_tokens=False)[0]
    word = tok.encode(" the", add_special_tokens=False)[0]
    for _ in range(2):  # the second answer comes from the cache
        assert is_stop_token(tiny_gqa, newline) and not is_stop_token(tiny_gqa, word)
        assert not is_stop_token(tiny_gqa, newline, stop="eos")
        assert is_stop_token(tiny_gqa, tok.eos_token_id, stop="eos")


@pytest.mark.tl4
def test_bridge_unhooked_argmax_equals_hooked_argmax():
    """The Bridge's hook-free decode step (eager twin) against its own hooked recording: a
    hook that changes nothing forces the bridge's path."""
    model = load_model("zoo:llama-s", backend="bridge")
    assert _bridge.records_unhooked(model)
    prompts = mixed_prompts(model)[:3]
    tables = []
    for hooked in (False, True):
        state = new_kv_state(model, 1)
        forward_chunk(model, prompts[0][None, :-1], state)
        with attached(model, [(pattern(0), lambda x, hook: None)] if hooked else []):
            assert _bridge.records_unhooked(model) is not hooked
            logits, table = forward_argmax(model, prompts[0][None, -1:], state)
        tables.append((logits.argmax(-1), table))
    assert torch.equal(tables[0][0], tables[1][0]) and torch.equal(tables[0][1], tables[1][1])


def test_attached_leaves_other_hooks(tiny_gqa):
    calls = []
    with tiny_gqa.hooks(fwd_hooks=[(pattern(0), lambda x, hook: calls.append(1))]):
        with attached(tiny_gqa, [(pattern(0), lambda x, hook: calls.append(2))]):
            tiny_gqa(torch.tensor([[CORPUS[0].count(" ") + 3, 4]]))
        tiny_gqa(torch.tensor([[5, 6]]))
    assert calls == [1, 2, 1]
    with pytest.raises(ValueError, match="no hook point"):
        with attached(tiny_gqa, [("blocks.0.attn.hook_nothing", lambda x, hook: None)]):
            pass
