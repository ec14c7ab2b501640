"""Activation and path patching: known answers, equivalences, TransformerLens as reference."""

import numpy as np
import pytest
import torch
from torch.testing import assert_close
from transformer_lens import HookedTransformer, HookedTransformerConfig

from rh_lens import hooks
from rh_lens import patching as P
from rh_lens.errors import RhLensError
from rh_lens.interventions import replace_output_hooks
from rh_lens.models import backend_of
from rh_lens.niah import Needle, TextHaystack
from rh_lens.patching import PatchConfig, PatchPair, Receiver
from rh_lens.patching.runs import _positions as positions_of
from rh_lens.plotting import plot_activation_patching, plot_path_patching
from tests.conftest import BACKENDS, CORPUS, build_tiny_gqa, scaled_on
from tests.known_answer import build_copy_model
from tests.known_paths import HEAD_A, HEAD_B, HEAD_C, IDLE, build_path_model, path_pair

FLAGS = ("use_split_qkv_input", "ungroup_grouped_query_attention", "use_hook_mlp_in")


def build_tiny_mha(tokenizer, backend: str):
    """Multi-head attention, LayerNorm, learned positions, 3 layers: the GPT-2 family."""
    cfg = HookedTransformerConfig(
        n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=64,
        d_vocab=len(tokenizer), act_fn="gelu", normalization_type="LN",
        positional_embedding_type="standard", seed=1, model_name="tiny-mha",
    )
    return scaled_on(HookedTransformer(cfg, tokenizer=tokenizer), backend, 3.0)


@pytest.fixture(scope="module", params=BACKENDS)
def tiny_mha(request, tokenizer):
    return build_tiny_mha(tokenizer, request.param)


@pytest.fixture(scope="module", params=[(kind, b) for kind in ("gqa", "mha") for b in BACKENDS],
                ids=lambda p: f"tiny_{p[0]}-{p[1]}")
def model(request, tokenizer):
    kind, backend = request.param
    return (build_tiny_gqa if kind == "gqa" else build_tiny_mha)(tokenizer, backend)


def random_pairs(model, n: int = 2, length: int = 12, seed: int = 0) -> list[PatchPair]:
    """Random prompts; the corrupted one differs at positions 3..5; answers are tokens 5 and 7."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        clean = torch.randint(2, model.cfg.d_vocab, (length,), generator=g)
        corrupted = clean.clone()
        corrupted[3:6] = torch.randint(2, model.cfg.d_vocab, (3,), generator=g)
        pairs.append(PatchPair(clean, corrupted, 5, 7, needle_span=(3, 6)))
    return pairs


def attached(model) -> int:
    return sum(len(hp._forward_hooks) for hp in model.hook_dict.values())


def plain_activation_patch(model, pairs, senders, positions) -> np.ndarray:
    """The obvious way: cache the clean run, patch the senders' hook_z into the corrupted run."""
    out = []
    with torch.no_grad():
        for pair in pairs:
            _, cache = model.run_with_cache(pair.clean[None])
            source = {layer: cache[hooks.z(layer)] for layer in range(model.cfg.n_layers)}
            pos = positions_of(pair, positions)
            with model.hooks(fwd_hooks=replace_output_hooks(senders, source, positions=pos)):
                logits = model(pair.corrupted[None])[0, -1].double()
            out.append(float(logits[pair.clean_answer] - logits[pair.corrupted_answer]))
    return np.array(out)


# ------------------------------------------------------------------ equivalences


@pytest.mark.parametrize("positions", ["answer", "all"])
@pytest.mark.parametrize("senders", [[(0, 1)], [(0, 2), (1, 3)]])
def test_path_through_every_receiver_equals_activation_patching(model, positions, senders):
    pairs = random_pairs(model)
    receivers = P.all_receivers(model, senders)
    assert any(r.component == "mlp" for r in receivers)
    cfg = PatchConfig(positions=positions)
    if backend_of(model) == "bridge" and model.cfg.n_key_value_heads not in (None, 4):
        with pytest.raises(RhLensError, match="per-query-head key/value receivers"):
            P.path_patch(model, pairs, senders, receivers, cfg)
        assert attached(model) == 0 and not any(getattr(model.cfg, f) for f in FLAGS)
        return
    got = P.path_patch(model, pairs, senders, receivers, cfg)
    want = plain_activation_patch(model, pairs, senders, positions)
    assert_close(got, want, rtol=1e-5, atol=1e-5)
    corrupted = P.path_patch(model, pairs, senders, [Receiver("direct")], cfg)
    assert not np.allclose(want, corrupted)  # the patch does something here
    assert attached(model) == 0
    assert not any(getattr(model.cfg, f) for f in FLAGS)


@pytest.mark.slow
def test_activation_patching_matches_transformer_lens(model):
    from transformer_lens.patching import (
        get_act_patch_attn_head_out_all_pos,
        get_act_patch_attn_head_out_by_pos,
    )

    pairs = random_pairs(model, n=3, length=7)
    clean = torch.stack([p.clean for p in pairs])
    corrupted = torch.stack([p.corrupted for p in pairs])

    def metric(logits):
        return (logits[:, -1, 5] - logits[:, -1, 7]).mean()

    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
        every = get_act_patch_attn_head_out_all_pos(model, corrupted, cache, metric)
        by_pos = get_act_patch_attn_head_out_by_pos(model, corrupted, cache, metric)
    for positions, want in [("answer", by_pos[:, -1]), ("all", every)]:
        res = P.compute_activation_patching(model, pairs, PatchConfig(positions=positions,
                                                                      batch_size=2))
        assert res.logit_diff.shape == (3, model.cfg.n_layers, model.cfg.n_heads)
        assert_close(torch.from_numpy(res.logit_diff.mean(0)), want.double(),
                     rtol=1e-4, atol=1e-4)
    # The totals of path patching are activation patching of each sender (all positions).
    senders = [(0, 0), (1, 2)]
    path = P.compute_path_patching(model, pairs, senders, [Receiver("direct")],
                                   PatchConfig(positions="all"))
    for i, (layer, head) in enumerate(senders):
        assert_close(path.total[:, i], res.logit_diff[:, layer, head], rtol=1e-5, atol=1e-5)
    assert_close(path.clean_logit_diff, res.clean_logit_diff, rtol=1e-5, atol=1e-5)


def manual_receiver_input(model, pair, senders, receiver: Receiver, positions):
    """Slow obvious path patching for one receiver: recompute its q/k/v (or MLP output, or
    logits) by hand from the base cache plus the senders' change through W_O."""
    with torch.no_grad():
        _, src = model.run_with_cache(pair.clean[None])
        _, base = model.run_with_cache(pair.corrupted[None])
        upto = receiver.reads_layer(model)
        delta = torch.zeros_like(base[hooks.resid_pre(0)])
        for layer, head in senders:
            if layer < upto:
                diff = src[hooks.z(layer)][0, :, head] - base[hooks.z(layer)][0, :, head]
                delta[0, positions] += (diff @ model.blocks[layer].attn.W_O[head])[positions]
        if receiver.component == "direct":
            final = base[hooks.resid_post(model.cfg.n_layers - 1)] + delta
            return None, model.unembed(model.ln_final(final))
        block = model.blocks[receiver.layer]
        if receiver.component == "mlp":
            mid = base[f"blocks.{receiver.layer}.hook_resid_mid"] + delta
            new = block.mlp(block.ln2(mid))
            return (f"blocks.{receiver.layer}.hook_mlp_out", None), new
        x = block.ln1(base[hooks.resid_pre(receiver.layer)] + delta)
        comp, h = receiver.component, receiver.head
        w = getattr(block.attn, f"W_{comp.upper()}")[h]
        b = getattr(block.attn, f"b_{comp.upper()}")[h]
        name = {"q": hooks.q, "k": hooks.k, "v": hooks.v}[comp](receiver.layer)
        return (name, h), x @ w + b


@pytest.mark.parametrize("receiver", [Receiver("q", 2, 1), Receiver("k", 2, 0),
                                      Receiver("v", 1, 3), Receiver("mlp", 1),
                                      Receiver("mlp", 0), Receiver("direct")])
def test_one_receiver_equals_slow_recomputation(tiny_mha, receiver):
    model, senders = tiny_mha, [(0, 2), (1, 1)]
    (pair,) = random_pairs(model, n=1, seed=3)
    positions = [4, 5, 11]
    where, new = manual_receiver_input(model, pair, senders, receiver, positions)
    if where is None:
        logits = new[0, -1].double()
    else:
        name, head = where

        def put(act, hook):
            out = act.clone()
            if head is None:
                out[:] = new
            else:
                out[:, :, head] = new[:, :, :]
            return out

        with torch.no_grad(), model.hooks(fwd_hooks=[(name, put)]):
            logits = model(pair.corrupted[None])[0, -1].double()
    want = float(logits[pair.clean_answer] - logits[pair.corrupted_answer])
    got = P.path_patch(model, [pair], senders, [receiver], PatchConfig(positions=tuple(positions)))
    assert_close(got, np.array([want]), rtol=1e-5, atol=1e-5)


def test_bridge_path_patching_equals_hooked(tokenizer):
    """Query, MLP and direct receivers of a grouped-query model: same effects on both engines."""
    if "bridge" not in BACKENDS or "hooked" not in BACKENDS:
        pytest.skip("needs both backends")
    hooked, bridge = (build_tiny_gqa(tokenizer, b) for b in ("hooked", "bridge"))
    pairs = random_pairs(hooked)
    senders = [(0, 1)]
    receivers = [r for r in P.all_receivers(hooked, senders) if r.component not in ("k", "v")]
    assert {r.component for r in receivers} == {"q", "mlp", "direct"}
    got = [P.path_patch(m, pairs, senders, receivers, PatchConfig(positions="all"))
           for m in (hooked, bridge)]
    assert_close(got[1], got[0], rtol=1e-4, atol=1e-4)
    assert np.abs(got[0]).max() > 1e-3


def test_gqa_key_receiver_is_per_query_head(tiny_gqa):
    """Patching head (1, 2)'s keys leaves its key/value sibling (1, 3) and every other head's
    attention alone: the model runs with ungrouped keys while patching."""
    model, (pair,) = tiny_gqa, random_pairs(tiny_gqa, n=1, seed=5)
    receivers = [Receiver("k", 1, 2)]
    if backend_of(model) == "bridge":  # HF attention has keys per KV head only: refused
        with pytest.raises(RhLensError, match="ungroup_grouped_query_attention is not avail"):
            with P.receiver_mode(model, receivers):
                pass
        assert not model.cfg.use_split_qkv_input  # nothing was switched on
        return
    with torch.no_grad():
        _, src = model.run_with_cache(pair.clean[None], names_filter=[hooks.z(0)])
        _, base = model.run_with_cache(pair.corrupted[None], names_filter=[hooks.pattern(1)])
        with P.receiver_mode(model, receivers):
            assert model.cfg.ungroup_grouped_query_attention
            fwd = P.path_patching_hooks(model, [(0, 1)], receivers, {0: src[hooks.z(0)]},
                                        positions=list(range(pair.n_tokens)))
            with model.hooks(fwd_hooks=fwd):
                _, cache = model.run_with_cache(pair.corrupted[None],
                                                names_filter=[hooks.pattern(1)])
    assert not model.cfg.ungroup_grouped_query_attention
    new, old = cache[hooks.pattern(1)][0], base[hooks.pattern(1)][0]
    for h in (0, 1, 3):
        assert_close(new[h], old[h])
    assert (new[2] - old[2]).abs().max() > 1e-4


# ------------------------------------------------------------------ known answers


def test_known_path_structure():
    """A -> B.k carries A's whole effect; A -> B.q/v, A -> C, A -> direct carry exactly none."""
    model, pair = build_path_model(), path_pair()
    cfg = PatchConfig(positions="all")
    act = P.compute_activation_patching(model, [pair], cfg)
    assert act.clean_logit_diff[0] == pytest.approx(10.0, abs=1e-4)
    assert act.corrupted_logit_diff[0] == pytest.approx(-10.0, abs=1e-4)
    want = np.zeros((2, 2))
    want[HEAD_A] = want[HEAD_B] = 1.0
    assert_close(act.normalized, want, atol=1e-6, rtol=0)
    receivers = P.head_receivers([HEAD_B, HEAD_C], ["q", "k", "v", "direct"])
    res = P.compute_path_patching(model, [pair], [HEAD_A, IDLE], receivers, cfg)
    assert res.receiver_labels == ["L1H0.q", "L1H0.k", "L1H0.v", "L1H1.q", "L1H1.k", "L1H1.v",
                                   "direct"]
    want = np.zeros((2, 7))
    want[0, 1] = 1.0
    assert_close(res.effect, want, atol=1e-6, rtol=0)
    assert_close(res.total_effect, np.array([1.0, 0.0]), atol=1e-6, rtol=0)
    assert_close(res.logit_diff[:, 0, 1], res.total[:, 0])  # the one path is all of it
    zero_paths = np.delete(res.logit_diff[0], 1, axis=1)
    np.testing.assert_array_equal(zero_paths, np.full_like(zero_paths, -10.0 + 0 * zero_paths))
    # Noising (Wang et al.'s direction): the same path, the opposite sign.
    noise = P.compute_path_patching(model, [pair], [HEAD_A], receivers[:3],
                                    PatchConfig(positions="all", direction="noise"))
    assert_close(noise.effect, np.array([[0.0, -1.0, 0.0]]), atol=1e-6, rtol=0)
    assert_close(noise.normalized, np.array([[1.0, 0.0, 1.0]]), atol=1e-6, rtol=0)


def single_token_words(tokenizer, haystack: str, n: int) -> list[str]:
    out = []
    for idx in sorted(tokenizer.get_vocab().values()):
        word = tokenizer.decode([idx])
        if (word.startswith(" ") and word[1:].isalpha() and len(word) > 4
                and word.strip().lower() not in haystack.lower()
                and tokenizer.encode(word, add_special_tokens=False) == [idx]):
            out.append(word.strip())
            if len(out) == n:
                return out
    raise AssertionError("not enough single-token words in the test vocabulary")


def test_copy_head_recovers_the_whole_logit_difference(tokenizer, backend):
    haystack = TextHaystack(" ".join([CORPUS[0], CORPUS[2]]))
    first, second = single_token_words(tokenizer, haystack.source, 2)
    ids = [tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in (first, second)]
    model = build_copy_model(tokenizer, ids, copy_head=1, n_ctx=128, backend=backend)
    needle = Needle(f"The magic word is {first}.", "What is the magic word?", first)
    pairs = [P.make_pair(model, needle, second, haystack, context_length=80, depth=d, buffer=30)
             for d in (20, 70)]
    pair = pairs[0]
    assert (pair.clean != pair.corrupted).sum() == 1
    assert (pair.clean_answer, pair.corrupted_answer) == tuple(ids)
    res = P.compute_activation_patching(model, pairs)
    assert (res.clean_logit_diff > 5).all() and (res.corrupted_logit_diff < -5).all()
    want = np.zeros((1, 4))
    want[0, 1] = 1.0
    assert_close(res.normalized, want, atol=1e-6, rtol=0)
    assert_close(res.effect, want, atol=1e-6, rtol=0)
    assert plot_activation_patching(res).data[0].z.shape == (1, 4)


# ------------------------------------------------------------------ hooks and errors


def test_no_hook_left_attached_and_flags_restored_after_an_exception(tiny_gqa):
    pairs = random_pairs(tiny_gqa)
    calls = []

    def boom(act, hook):
        calls.append(1)
        if len(calls) == 4:  # raise in a patched run, with path-patching hooks attached
            raise RuntimeError("boom")

    receivers = P.all_receivers(tiny_gqa, [(0, 1)])
    if backend_of(tiny_gqa) == "bridge":  # no per-query-head keys/values there (tested above)
        receivers = tuple(r for r in receivers if r.component not in ("k", "v"))
    with pytest.raises(RuntimeError, match="boom"):
        with tiny_gqa.hooks(fwd_hooks=[(hooks.pattern(1), boom)]):
            P.compute_path_patching(tiny_gqa, pairs, [(0, 1)], receivers)
    assert attached(tiny_gqa) == 0
    assert not any(getattr(tiny_gqa.cfg, f) for f in FLAGS)
    calls.clear()
    with pytest.raises(RuntimeError, match="boom"):
        with tiny_gqa.hooks(fwd_hooks=[(hooks.pattern(1), boom)]):
            P.compute_activation_patching(tiny_gqa, pairs)
    assert attached(tiny_gqa) == 0


def test_clear_errors(tiny_gqa, tokenizer):
    clean = torch.arange(2, 12)
    with pytest.raises(ValueError, match="clean prompt has 10 tokens, corrupted 11"):
        PatchPair(clean, torch.arange(2, 13), 5, 7)
    with pytest.raises(ValueError, match="same token"):
        PatchPair(clean, clean, 5, 5)
    haystack = TextHaystack(" ".join([CORPUS[0], CORPUS[2]]))
    needle = Needle("The magic word is ginger.", "What is the magic word?", "ginger")
    with pytest.raises(P.PairError, match="equal token length"):
        P.make_pair(tiny_gqa, needle, "purple ginger and sea salt", haystack,
                    context_length=80, depth=50, buffer=30)
    pairs = random_pairs(tiny_gqa)
    with pytest.raises(ValueError, match="head 9 of .* out of range"):
        P.compute_path_patching(tiny_gqa, pairs, [(0, 9)], [Receiver("direct")])
    with pytest.raises(ValueError, match="layer 5 of .* out of range"):
        P.path_patch(tiny_gqa, pairs, [(5, 0)], [Receiver("direct")])
    with pytest.raises(ValueError, match="head 4 out of range"):
        P.compute_path_patching(tiny_gqa, pairs, [(0, 1)], [Receiver("q", 1, 4)])
    with pytest.raises(ValueError, match="takes a layer and a head"):
        Receiver("k", 1)
    with pytest.raises((ValueError, TypeError)):  # TypeError: the test run's type checker
        Receiver("z", 1, 1)
    with pytest.raises(ValueError, match="does not read the output of any sender"):
        P.path_patch(tiny_gqa, pairs, [(1, 0)], [Receiver("q", 1, 2)])
    with pytest.raises(ValueError, match="out of range for a prompt of 12 tokens"):
        P.compute_activation_patching(tiny_gqa, pairs, PatchConfig(positions=(3, 40)))
    with pytest.raises((ValueError, TypeError)):
        PatchConfig(direction="sideways")
    with pytest.raises(RuntimeError, match="receiver_mode"):
        P.path_patching_hooks(tiny_gqa, [(0, 1)], [Receiver("q", 1, 0)], {}, positions=[0])
    assert attached(tiny_gqa) == 0


def test_path_patching_figure(tiny_gqa):
    pairs = random_pairs(tiny_gqa, n=1)
    res = P.compute_path_patching(tiny_gqa, pairs, [(0, 1), (1, 2)],
                                  P.head_receivers([(1, 0), (1, 2)], ["q", "direct"]))
    assert np.isnan(res.effect[1, :2]).all() and np.isfinite(res.effect[0]).all()
    fig = plot_path_patching(res)
    assert list(fig.data[0].x) == ["L1H0.q", "L1H2.q", "direct", "all paths"]
    assert list(fig.data[0].y) == ["L0H1", "L1H2"]


# ------------------------------------------------------------------ head sets and draws


def test_set_patching_of_known_sets():
    """{A} into B's key carries A's whole effect, {IDLE} none; two draws average them."""
    model, pair = build_path_model(), path_pair()
    cfg = PatchConfig(positions="all")
    into = P.head_receivers([HEAD_B], ["k"])
    res = P.compute_set_patching(model, [pair, pair], [[HEAD_A], [IDLE]], [into], cfg)
    assert res.n_draws == 2 and res.logit_diff.shape == (2, 2)
    assert_close(res.effect, np.array([1.0, 0.0]), atol=1e-6, rtol=0)
    ci = res.interval(n_boot=200)
    assert ci.mean == pytest.approx(0.5, abs=1e-6)
    # resampling draws: some resamples hold only {A} or only {IDLE}
    assert ci.low == pytest.approx(0.0, abs=1e-6) and ci.high == pytest.approx(1.0, abs=1e-6)
    one = P.compute_set_patching(model, [pair], [[HEAD_A]], [into], cfg)
    assert_close(one.logit_diff[0], P.path_patch(model, [pair], [HEAD_A], into, cfg))
    got = one.to_json()
    assert got["draws"] == [{"senders": ["L0H0"], "receivers": ["L1H0.k"],
                             "effect": pytest.approx(1.0, abs=1e-6)}]
    with pytest.raises(ValueError, match="2 sender sets but 3 receiver sets"):
        P.compute_set_patching(model, [pair], [[HEAD_A], [IDLE]], [into] * 3, cfg)


PATCH_ARGS = ["--model", "zoo:llama-s", "--receivers", "top:2", "--n-pairs", "2", "--quiet",
              "--components", "direct"]


@pytest.mark.slow
def test_path_patch_draws_are_seeded_and_saved(tmp_path, capsys):
    from analyses import path_patch
    from rh_lens.heads import select_heads
    from rh_lens.properties import load_head_scores
    from tests.test_cli_guards import RELEASE_DETECT

    out = tmp_path / "out"
    assert path_patch.main([*PATCH_ARGS, "--scores", str(RELEASE_DETECT), "--out", str(out),
                            "--senders", "matched:2", "--draws", "3", "--seed", "1"]) == 0
    assert "as one set into the receivers" in capsys.readouterr().out
    saved = P.PatchingResult.load(out)
    want = select_heads("matched:2", n_layers=4, n_heads=8, n_draws=3, seed=1,
                        scores=load_head_scores(RELEASE_DETECT).mean)
    assert saved.sets.senders == want and len(set(want)) == 3
    assert saved.path.senders == want[0]  # the sender x receiver matrices are the first draw's
    assert saved.sets.logit_diff.shape == (3, 2) and np.isfinite(saved.sets.logit_diff).all()


def test_path_patch_refuses_bad_draws(capsys):
    from analyses import path_patch

    with pytest.raises(SystemExit):
        path_patch.main([*PATCH_ARGS, "--draws", "0"])
    assert "--draws must be >= 1, got 0" in capsys.readouterr().err
    assert path_patch.main([*PATCH_ARGS, "--senders", "top:2", "--draws", "3"]) == 2
    assert "neither --senders top:2 nor --receivers top:2 is drawn" in capsys.readouterr().err
