"""Key/value policies: the masked scores equal an explicitly truncated cache, token for token
and position for position, on tiny GQA and MHA models, the Bridge and every zoo model."""

import numpy as np
import pytest
import torch

from rh_lens import hooks
from rh_lens.decode import decode_greedy
from rh_lens.interventions import kv_window_hooks
from rh_lens.kvcache import (
    KVPolicy,
    cache_bytes,
    decode_kv_policy_slow,
    kept_positions,
    kv_policies,
    matched_window,
    policy_hooks,
)
from tests.conftest import attached_hooks, build_tiny_gqa


def _prompt(model, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, model.cfg.d_vocab, (n,), generator=gen)
    ids[0] = model.tokenizer.bos_token_id
    return ids


def _fast(model, prompt, policy, *, max_new_tokens, chunk_size=7):
    fwd = policy_hooks(model, policy)
    (out,) = decode_greedy(model, prompt[None], max_new_tokens=max_new_tokens,
                           chunk_size=chunk_size, prefill_hooks=fwd, decode_hooks=fwd)
    return out


def _assert_same(fast, slow):
    np.testing.assert_array_equal(fast.tokens, slow.tokens)
    np.testing.assert_array_equal(fast.positions, slow.positions)


def build_tiny_mha(tokenizer):
    """A GPT-2-shaped random model (LayerNorm, learned positions, 4 heads of their own)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from tests.conftest import scaled_on

    cfg = HookedTransformerConfig(
        n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=128, n_ctx=128,
        d_vocab=len(tokenizer), act_fn="gelu", normalization_type="LN", seed=1,
        model_name="tiny-mha", original_architecture="GPT2LMHeadModel")
    return scaled_on(HookedTransformer(cfg, tokenizer=tokenizer), "hooked", 4.0)


@pytest.fixture(scope="module")
def gqa(tokenizer):
    return build_tiny_gqa(tokenizer, "hooked")


@pytest.mark.parametrize("arch", ["gqa", "mha"])
def test_masked_scores_equal_the_truncated_cache_on_tiny_models(arch, gqa, tokenizer):
    model = gqa if arch == "gqa" else build_tiny_mha(tokenizer)
    n_kv = model.cfg.n_key_value_heads or model.cfg.n_heads
    prompt = _prompt(model, 40)
    policy = KVPolicy("top", "top-1", ((1, n_kv - 1),), sink=2, window=6, k=1)
    fast = _fast(model, prompt, policy, max_new_tokens=8)
    slow = decode_kv_policy_slow(model, prompt, policy, max_new_tokens=8)
    _assert_same(fast, slow)
    (plain,) = decode_greedy(model, prompt[None], max_new_tokens=8)
    assert not np.array_equal(plain.positions, fast.positions)  # the policy changes the run
    # every windowed head's top-1 key lies in its kept window
    windowed = policy.windowed_heads(n_layers=2, n_heads=4, n_kv_heads=n_kv)
    for t in range(len(fast.tokens)):
        kept = kept_positions(len(prompt) - 1 + t, sink=2, window=6)
        assert all(int(fast.positions[t, layer, h]) in kept for layer, h in windowed)
    assert attached_hooks(model) == 0


def test_masked_scores_on_the_bridge_equal_the_truncated_cache(gqa, tokenizer):
    from rh_lens.models import HAS_HOOKED

    if not HAS_HOOKED:
        pytest.skip("the reference needs the HookedTransformer")
    bridge = build_tiny_gqa(tokenizer, "bridge")
    prompt = _prompt(gqa, 30, seed=1)
    policy = KVPolicy("random", "random-1-d0", ((0, 0),), sink=1, window=5, k=1, draw=0)
    _assert_same(_fast(bridge, prompt, policy, max_new_tokens=6, chunk_size=11),
                 decode_kv_policy_slow(gqa, prompt, policy, max_new_tokens=6))


def test_windowed_heads_see_only_sink_and_window_and_others_are_untouched(gqa):
    tokens = _prompt(gqa, 20)[None]
    with torch.no_grad():
        _, base = gqa.run_with_cache(tokens)
        with gqa.hooks(fwd_hooks=kv_window_hooks([(0, 1)], sink=2, window=3)):
            _, cache = gqa.run_with_cache(tokens, names_filter=hooks.pattern(0))
    pat = cache[hooks.pattern(0)][0]
    for p in range(20):
        allowed = torch.zeros(20, dtype=torch.bool)
        allowed[[j for j in range(p + 1) if j < 2 or j > p - 3]] = True
        assert (pat[1, p][~allowed] == 0).all() and (pat[1, p][allowed] > 0).all()
        torch.testing.assert_close(pat[1, p].sum(), torch.tensor(1.0))
    for h in (0, 2, 3):
        torch.testing.assert_close(pat[h], base[hooks.pattern(0)][0, h])
    with pytest.raises(ValueError, match="window >= 1"):
        kv_window_hooks([(0, 1)], sink=2, window=0)


def test_memory_and_matched_windows_by_hand():
    full = KVPolicy("top", "top-1", ((0, 0),), sink=4, window=12, k=1)
    # 2 layers x 2 groups at 100 tokens: one full group (100) + three of 16 tokens
    assert full.kept_tokens(100, n_layers=2, n_kv_heads=2) == 148
    assert full.kept_fraction(100, n_layers=2, n_kv_heads=2) == pytest.approx(148 / 400)
    assert cache_bytes(full, 100, n_layers=2, n_kv_heads=2, d_head=8) == 2 * 8 * 2 * 148
    assert full.kept_tokens(10, n_layers=2, n_kv_heads=2) == 40  # shorter than sink + window
    assert matched_window(1, n_groups=4, n_tokens=100, sink=4, window=12) == 148 // 4 - 4
    uniform = KVPolicy("uniform", "uniform-1", (), sink=4, window=33, k=1)
    assert uniform.kept_tokens(100, n_layers=2, n_kv_heads=2) == 4 * 37
    assert kept_positions(9, sink=2, window=3) == [0, 1, 7, 8, 9]
    assert kept_positions(2, sink=2, window=3) == [0, 1, 2]


def test_policies_rank_groups_by_their_best_head_and_match_memory():
    scores = np.zeros((2, 4))
    scores[1, 3] = 0.9  # group (1, 1) of 2 heads per group
    scores[0, 0] = 0.5  # group (0, 0)
    pol = {p.name: p for p in kv_policies(scores, [1, 2], n_layers=2, n_kv_heads=2, sink=4,
                                          window=12, n_tokens=100, draws=2, seed=0)}
    assert pol["top-1"].full == ((1, 1),)
    assert pol["top-2"].full == ((1, 1), (0, 0))
    assert len(pol["full"].full) == 4 and pol["window"].full == ()
    for k in (1, 2):
        want = pol[f"top-{k}"].kept_tokens(100, n_layers=2, n_kv_heads=2)
        got = pol[f"uniform-{k}"].kept_tokens(100, n_layers=2, n_kv_heads=2)
        assert want - 4 < got <= want
        assert all(len(pol[f"random-{k}-d{d}"].full) == k for d in (0, 1))
    with pytest.raises(ValueError, match="full key/value groups"):
        kv_policies(scores, [4], n_layers=2, n_kv_heads=2, sink=4, window=12, n_tokens=100)


@pytest.mark.parametrize("name", ["llama-s", "llama-s-long", "gpt2-s", "llama-m",
                                  "llama-s-chat"])
def test_masked_scores_equal_the_truncated_cache_on_the_zoo(name):
    from rh_lens.models import load_model
    from rh_lens.niah import build_trial
    from rh_lens.zoo.inputs import zoo_inputs

    model = load_model(f"zoo:{name}")
    needles, haystacks = zoo_inputs(1, seed=3)
    trial = build_trial(model, needles[0], haystacks[0], context_length=64, depth=30.0,
                        buffer=32, max_new_tokens=6)
    n_kv = model.cfg.n_key_value_heads or model.cfg.n_heads
    policy = KVPolicy("top", "top-2", ((1, 0), (model.cfg.n_layers - 1, n_kv - 1)), sink=4,
                      window=12, k=2)
    fast = _fast(model, trial.tokens, policy, max_new_tokens=6, chunk_size=24)
    _assert_same(fast, decode_kv_policy_slow(model, trial.tokens, policy, max_new_tokens=6))


def test_kv_compress_script_writes_resumes_and_refuses_bad_k(tmp_path, capsys):
    import json

    from analyses import kv_compress
    from rh_lens.results import export_reference_json

    scores = np.zeros((1, 4, 8))
    scores[0, 1, :2] = 0.9  # group (1, 0) of llama-s (8 query heads on 4 key/value heads)
    export_reference_json(tmp_path / "head_score.json", scores)
    out = tmp_path / "kv"
    argv = ["--model", "zoo:llama-s", "--scores", str(tmp_path / "head_score.json"),
            "--ks", "1", "--draws", "1", "--lengths", "120", "--depths", "50",
            "--n-needles", "1", "--window", "16", "--out", str(out), "--quiet"]
    assert kv_compress.main(argv) == 0
    rows = {r["policy"]: r for r in json.loads((out / "summary.json").read_text())["policies"]}
    assert set(rows) == {"full", "window", "top-1", "random-1-d0", "uniform-1"}
    assert rows["top-1"]["full_groups"] == [[1, 0]]
    assert rows["full"]["kv_fraction"] == 1.0
    assert rows["top-1"]["kv_fraction"] == pytest.approx(rows["random-1-d0"]["kv_fraction"])
    cell = next((out / "conditions" / "top-1" / "cells").glob("*.json"))
    stamp = cell.stat().st_mtime_ns
    assert kv_compress.main(argv) == 0  # resumes: nothing decoded again
    assert cell.stat().st_mtime_ns == stamp
    capsys.readouterr()
    assert kv_compress.main([*argv[:5], "16", *argv[6:]]) == 2
    assert "full key/value groups must be in [1, 15]" in capsys.readouterr().err
