"""The TransformerBridge backend against the HookedTransformer one, and its fast prefill.

The core tests run on both engines through ``tests/conftest.py``'s ``backend`` and ``tiny_gqa``
fixtures and ``tests/known_answer.py``; this file holds what is the Bridge's own.
"""

import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rh_lens import _bridge, hooks
from rh_lens.decode import decode_greedy, decode_slow
from rh_lens.detect import DetectConfig, compute_detect
from rh_lens.errors import ContextTooLongError, ModelLoadError
from rh_lens.models import (
    forward_chunk,
    load_model,
    model_facts,
    new_kv_state,
    save_model_dir,
    tokenize,
)
from rh_lens.niah import Needle
from tests.conftest import shared_path
from tests.test_detect import HAYSTACK

TEXT = "Once upon a time there was a girl named Mara who lived in Tolbrook by the sea. " * 2
NEEDLE = Needle("The secret word is ginger.", "What is the secret word?", "ginger")
ARCHS = ["llama", "mistral", "qwen2", "gpt2"]


def n_hooks(model) -> int:
    return sum(len(hp._forward_hooks) for hp in model.hook_dict.values())


def hooked_state(cfg, tokenizer, *, scale: float = 4.0, bias: float = 0.0):
    """A random HookedTransformer's state dict, weights scaled so attention is peaked."""
    from transformer_lens import HookedTransformer

    model = HookedTransformer(cfg, tokenizer=tokenizer)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "W_" in name:
                p.mul_(scale)
            elif bias and ".b" in name:
                p.add_(bias * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="session")
def zoo_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Random zoo-format (HookedTransformer weights) models of both zoo families; the GPT-2 one
    has non-zero biases everywhere, the unembedding's included."""
    from transformer_lens import HookedTransformerConfig

    common = dict(n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=128, n_ctx=128,
                  d_vocab=len(tokenizer), seed=0, default_prepend_bos=True)
    cfgs = {
        "llama": (HookedTransformerConfig(
            **common, n_key_value_heads=2, act_fn="silu", gated_mlp=True,
            normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=16,
            final_rms=True, original_architecture="LlamaForCausalLM", model_name="zoo-llama",
        ), 0.0),
        "gpt2": (HookedTransformerConfig(
            **common, act_fn="gelu", normalization_type="LN", positional_embedding_type="standard",
            original_architecture="GPT2LMHeadModel", model_name="zoo-gpt2",
        ), 0.1),
    }
    root = tmp_path_factory.mktemp("zoo")
    out = {}
    for family, (cfg, bias) in cfgs.items():
        model = hooked_state(cfg, tokenizer, bias=bias)
        out[family] = save_model_dir(root / family, cfg=model.cfg, state_dict=model.state_dict(),
                                     tokenizer=tokenizer)
    return out


def assert_same_decoding(a, b):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.tokens, y.tokens)
        np.testing.assert_array_equal(x.positions, y.positions)
        assert x.text == y.text


# ------------------------------------------------------------------ equivalence with "hooked"


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_directory_same_tokens_logits_and_argmax_positions(hf_dirs, arch):
    hooked = load_model(hf_dirs[arch])
    bridge = load_model(hf_dirs[arch], backend="bridge")
    assert _bridge.is_bridge(bridge) and not _bridge.is_bridge(hooked)
    facts_h, facts_b = model_facts(hooked), model_facts(bridge)
    # TL 3.9 caps Mistral's n_ctx at 2048; the Bridge reads max_position_embeddings.
    assert facts_b.n_ctx == (128 if arch == "gpt2" else 256)
    assert facts_h.__dict__ | {"n_ctx": 0} == facts_b.__dict__ | {"n_ctx": 0}
    tokens = tokenize(hooked, TEXT)[None]
    assert torch.equal(tokens, tokenize(bridge, TEXT)[None])
    assert bridge.to_string(tokens[0]) == hooked.to_string(tokens[0])
    with torch.no_grad():
        torch.testing.assert_close(bridge(tokens), hooked(tokens), atol=1e-4, rtol=1e-4)
    prompts = torch.cat([tokens, tokens.flip(1)])[:, :60]  # a batch of two
    fast = decode_greedy(bridge, prompts, max_new_tokens=10, chunk_size=16)
    assert_same_decoding(fast, decode_greedy(hooked, prompts, max_new_tokens=10, chunk_size=16))
    assert_same_decoding(fast[:1], [decode_slow(bridge, prompts[0], max_new_tokens=10)])
    assert n_hooks(bridge) == 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_zoo_format_loads_on_the_bridge_as_an_hf_model(zoo_dirs, family):
    hooked = load_model(zoo_dirs[family])
    bridge = load_model(zoo_dirs[family], backend="bridge")
    assert type(bridge.original_model).__name__ == (
        "LlamaForCausalLM" if family == "llama" else "GPT2LMHeadModel")
    if family == "gpt2":  # the unembedding bias survives the conversion
        assert bridge.original_model.lm_head.bias.abs().sum() > 0
    assert model_facts(bridge) == model_facts(hooked)
    tokens = tokenize(hooked, TEXT)[None]
    with torch.no_grad():
        torch.testing.assert_close(bridge(tokens), hooked(tokens), atol=2e-4, rtol=1e-4)
    assert_same_decoding(decode_greedy(bridge, tokens[:, :70], max_new_tokens=8, chunk_size=9),
                         decode_greedy(hooked, tokens[:, :70], max_new_tokens=8, chunk_size=9))
    longer = load_model(zoo_dirs["llama"], backend="bridge", n_ctx=300)
    assert longer.cfg.n_ctx == 300


@pytest.mark.needs_shared
def test_llama2c_adjacent_pair_rotary_converts_exactly():
    path = shared_path("models", "llama2c", "stories260K.bin")
    hooked = load_model(f"llama2c:{path}")
    bridge = load_model(f"llama2c:{path}", backend="bridge")
    tokens = tokenize(hooked, "Once upon a time, there was a little girl named Lily.")[None]
    with torch.no_grad():
        torch.testing.assert_close(bridge(tokens), hooked(tokens), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_detection_sweep_is_identical_on_both_backends(hf_dirs):
    models = [load_model(hf_dirs["qwen2"]), load_model(hf_dirs["qwen2"], backend="bridge")]
    needle = Needle("The magic word is Mara.", "What is the magic word?", "Mara")
    cfg = DetectConfig(lengths=(80, 150), depths=(0.0, 60.0), buffer=40, max_new_tokens=12,
                       chunk_size=32, batch_size=2)
    hooked, bridge = (compute_detect(m, [needle, NEEDLE], [HAYSTACK, HAYSTACK], cfg,
                                     progress=False) for m in models)
    assert len(bridge.records) == 8
    for a, b in zip(hooked.records, bridge.records, strict=True):
        assert (a.generated, a.success, a.answer_span) == (b.generated, b.success, b.answer_span)
        for field in ("tokens", "positions", "step_score", "set_score", "active"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    for kind in ("step", "set", "active"):
        np.testing.assert_array_equal(hooked.mean_scores(kind), bridge.mean_scores(kind))


# ----------------------------------------------------------------------------- fast prefill


def prefill_then_decode(model, tokens, *, chunk: int, steps: int):
    """Prefill all but the last token, then ``steps`` greedy steps under the argmax recorder."""
    recorder = hooks.LastQueryArgmax(model.cfg.n_layers)
    state = new_kv_state(model)
    logits_seen, positions = [], []
    with torch.no_grad():
        for start in range(0, tokens.shape[1] - 1, chunk):
            forward_chunk(model, tokens[:, start : min(start + chunk, tokens.shape[1] - 1)], state)
        nxt = tokens[:, -1:]
        with model.hooks(fwd_hooks=recorder.hooks):
            for _ in range(steps):
                logits = forward_chunk(model, nxt, state)[:, -1]
                logits_seen.append(logits)
                positions.append(recorder.table())
                nxt = logits.argmax(-1, keepdim=True)
    return torch.stack(logits_seen), torch.stack(positions)


@pytest.mark.parametrize("arch", ARCHS)
def test_fast_prefill_equals_all_eager(hf_dirs, arch, monkeypatch):
    fast = load_model(hf_dirs[arch], backend="bridge")
    eager = load_model(hf_dirs[arch], backend="bridge", fast_prefill=False)
    assert _bridge.has_fast_prefill(fast) and not _bridge.has_fast_prefill(eager)
    twin = fast.__dict__[_bridge.TWIN_ATTR]
    calls = []
    original = twin.model.forward
    monkeypatch.setattr(twin.model, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    tokens = tokenize(fast, TEXT)[None][:, :90]
    logits_f, pos_f = prefill_then_decode(fast, tokens, chunk=25, steps=12)
    logits_e, pos_e = prefill_then_decode(eager, tokens, chunk=25, steps=12)
    assert len(calls) == 4  # every prefill chunk went through SDPA, no decode step did
    torch.testing.assert_close(logits_f, logits_e, atol=1e-4, rtol=1e-5)
    assert torch.equal(logits_f.argmax(-1), logits_e.argmax(-1))
    assert torch.equal(pos_f, pos_e)


def test_fast_prefill_shares_every_weight_and_follows_the_model(hf_dirs):
    model = load_model(hf_dirs["llama"], backend="bridge")
    twin = model.__dict__[_bridge.TWIN_ATTR]
    assert twin.model.config._attn_implementation == "sdpa"
    source = {id(p) for p in model.original_model.parameters()}
    assert {id(p) for p in twin.model.parameters()} <= source
    assert not any(n.startswith(_bridge.TWIN_ATTR) for n in model.state_dict())
    model.to(torch.float64)  # buffers are replaced by .to(); the twin must follow
    tokens = tokenize(model, TEXT)[None][:, :40]
    with torch.no_grad():
        fast = forward_chunk(model, tokens, new_kv_state(model))
        full = model(tokens)
    assert fast.dtype == torch.float64
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)  # eager softmax is fp32


def test_prefill_hooks_see_every_chunk_with_fast_prefill_on(hf_dirs):
    model = load_model(hf_dirs["mistral"], backend="bridge")
    seen = []
    capture = [(hooks.pattern(0), lambda pat, hook: seen.append(pat.shape[-2]))]
    tokens = tokenize(model, TEXT)[None][:, :50]
    decode_greedy(model, tokens, max_new_tokens=3, chunk_size=20, prefill_hooks=capture)
    assert seen == [20, 20, 9]
    assert n_hooks(model) == 0


def test_pad_token_ids_are_not_masked_in_chunks(hf_dirs):
    model = load_model(hf_dirs["llama"], backend="bridge", fast_prefill=False)
    pad = model.tokenizer.pad_token_id
    tokens = tokenize(model, TEXT)[None].clone()
    tokens[0, [6, 13, 20, -1]] = pad
    with torch.no_grad():
        full = model(tokens)
        state = new_kv_state(model)
        parts = [forward_chunk(model, tokens[:, i : i + 7], state)
                 for i in range(0, tokens.shape[1], 7)]
    assert state.n_tokens == tokens.shape[1]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------- hooks and bad input


def test_no_hook_left_attached_after_a_hook_raises(hf_dirs):
    model = load_model(hf_dirs["qwen2"], backend="bridge")
    tokens = tokenize(model, TEXT)[None][:, :30]

    def boom(act, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), model.hooks(fwd_hooks=[(hooks.q(1), boom)]):
        model(tokens)
    with pytest.raises(RuntimeError, match="boom"):
        decode_greedy(model, tokens, max_new_tokens=3, decode_hooks=[(hooks.z(0), boom)])
    assert n_hooks(model) == 0
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == hooks.pattern(1))
    assert set(cache.keys()) == {hooks.pattern(1)}
    assert n_hooks(model) == 0


def test_bad_backend_and_options(hf_dirs):
    # Under the test run's beartype the Literal annotation refuses it first; else a ValueError.
    with pytest.raises((ValueError, TypeError), match="tl4"):
        load_model(hf_dirs["llama"], backend="tl4")
    with pytest.raises(ValueError, match="unknown backend 'tl4'; expected one of hooked, bridge"):
        inspect.unwrap(load_model)(hf_dirs["llama"], backend="tl4")
    with pytest.raises(ValueError, match="fast_prefill needs backend='bridge'"):
        load_model(hf_dirs["llama"], fast_prefill=True)
    with pytest.raises(ModelLoadError, match="only rotary"):
        load_model(hf_dirs["gpt2"], backend="bridge", n_ctx=4096)
    model = load_model(hf_dirs["gpt2"], backend="bridge")
    tokens = tokenize(model, TEXT * 10)[None]
    with pytest.raises(ContextTooLongError, match="n_ctx=128"):
        forward_chunk(model, tokens, new_kv_state(model))


def test_named_model_on_the_bridge_fails_fast_offline(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache.*OFFLINE"):
        load_model("gpt2", backend="bridge")
    with pytest.raises(ModelLoadError, match="'meta-llama/Nope-1B' is not in the local"):
        load_model("meta-llama/Nope-1B", backend="bridge")


@pytest.mark.slow
def test_without_hooked_transformer_the_bridge_is_the_default(hf_dirs, zoo_dirs):
    """transformer-lens 4.x has no HookedTransformer: simulated by removing it before import."""
    script = f"""
import transformer_lens
del transformer_lens.HookedTransformer, transformer_lens.HookedTransformerConfig
from rh_lens import models
from rh_lens.errors import ModelLoadError
assert not models.HAS_HOOKED and models.DEFAULT_BACKEND == "bridge"
for spec in ({str(hf_dirs["llama"])!r}, {str(zoo_dirs["llama"])!r}):
    model = models.load_model(spec)
    assert type(model).__name__ == "TransformerBridge"
try:
    models.load_model({str(hf_dirs["llama"])!r}, backend="hooked")
except ModelLoadError as err:
    print(json.dumps(str(err)))
"""
    done = subprocess.run([sys.executable, "-c", "import json\n" + script], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    message = json.loads(done.stdout.strip().splitlines()[-1])
    assert "needs transformer-lens 3.x" in message
