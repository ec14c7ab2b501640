"""Head-level ablation: hooks change what they name, the paper's mask, head sets, a known answer,
resumable sweeps, and the analyses.ablate script."""

import json

import numpy as np
import pytest
import torch

from rh_lens import ablation, hooks, interventions
from rh_lens.ablation import AblationConfig, Condition, compute_ablation, conditions_from_masks
from rh_lens.ablation import sweep as ablation_sweep
from rh_lens.decode import decode_greedy
from rh_lens.detect import DetectConfig, compute_detect
from rh_lens.errors import RhLensError
from rh_lens.heads import random_head_draws
from rh_lens.models import ModelFacts, backend_of, tokenize
from rh_lens.niah import BASE_TEMPLATE, Needle, TextHaystack, build_trial
from tests.conftest import BACKENDS, CORPUS
from tests.known_answer import build_copy_model

HAYSTACK = TextHaystack(" ".join([CORPUS[0], CORPUS[2]]))
TEXT = "The secret ingredient of Mara's soup is purple ginger and sea salt."
OTHER = "Once upon a time there was a girl named Mara who lived in Tolbrook by the sea today."
MODES = ("uniform", "zero", "mean", "resample")


def attached(model) -> int:
    return sum(len(hp._forward_hooks) for hp in model.hook_dict.values())


def mode_kwargs(model, mode, heads, positions, n_prompt):
    """What each mode needs beyond the heads: a mean (over OTHER) or a donor run on OTHER."""
    if mode == "mean":
        return {"mean_z": interventions.compute_mean_z(model, [tokenize(model, OTHER)])}
    if mode == "resample":
        donor = interventions.capture_donor(model, tokenize(model, OTHER), heads,
                                            positions=positions, max_new_tokens=3)
        return {"donor": donor, "n_prompt": n_prompt}
    return {}


# ------------------------------------------------------------------------------- hooks, per mode


@pytest.mark.parametrize("mode", MODES)
def test_hooks_change_only_the_heads_they_name(tiny_gqa, mode):
    model, heads = tiny_gqa, [(1, 2)]
    tokens = tokenize(model, TEXT)[None]
    n = tokens.shape[1]
    names = lambda name: name.endswith(("hook_z", "hook_v", "hook_resid_post"))  # noqa: E731
    with torch.no_grad():
        _, clean = model.run_with_cache(tokens, names_filter=names)
        extra = mode_kwargs(model, mode, heads, "all", n)
        prefill, decode = interventions.ablation_hooks(model, mode, heads, positions="all", **extra)
        assert [name for name, _ in prefill] == [hooks.z(1) if mode != "uniform" else hooks.q(1)]
        with model.hooks(fwd_hooks=prefill):
            _, cache = model.run_with_cache(tokens, names_filter=names)
    assert attached(model) == 0
    z, ref = cache[hooks.z(1)][0], clean[hooks.z(1)][0]
    torch.testing.assert_close(cache[hooks.z(0)], clean[hooks.z(0)], rtol=0, atol=0)
    torch.testing.assert_close(z[:, [0, 1, 3]], ref[:, [0, 1, 3]], rtol=0, atol=0)
    assert not torch.allclose(cache[hooks.resid_post(1)], clean[hooks.resid_post(1)])
    masked = z[:, 2]
    if mode == "uniform":  # the mean of the values seen so far (key/value head 2 // 2 = 1)
        v = clean[hooks.v(1)][0, :, 1]
        expected = v.cumsum(0) / torch.arange(1, n + 1)[:, None]
    elif mode == "zero":
        expected = torch.zeros_like(masked)
    elif mode == "mean":
        expected = extra["mean_z"][1, 2].expand_as(masked)
    else:  # donor position p + M - N, clamped to the donor's rows
        donor = extra["donor"]
        rows = (torch.arange(n) + donor.n_prompt - n).clamp(0, donor.z[1].shape[0] - 1)
        expected = donor.z[1][rows, 0]
        assert donor.start == 0 and donor.z[1].shape[0] > donor.n_prompt - 1  # prefill + steps
    torch.testing.assert_close(masked, expected)


def test_uniform_mask_gives_exactly_uniform_attention_at_decode_steps(tiny_gqa):
    model = tiny_gqa
    tokens = tokenize(model, TEXT)[None]
    n = tokens.shape[1]

    def rows_of(decode_hooks):
        rows = []
        keep = lambda pat, hook: rows.append(pat[0, :, -1].clone())  # noqa: E731
        decode_greedy(model, tokens, max_new_tokens=4, chunk_size=5,
                      decode_hooks=[*decode_hooks, (hooks.pattern(1), keep)])
        return rows

    clean = rows_of([])
    prefill, decode = interventions.ablation_hooks(model, "uniform", [(1, 2)])
    assert prefill == []
    masked = rows_of(decode)
    assert len(masked) == 4
    for t, row in enumerate(masked):
        keys = n + t
        torch.testing.assert_close(row[2], torch.full((keys,), 1.0 / keys), rtol=0, atol=1e-7)
    # At the first decode step everything else (the KV-group sibling head 3 too) is untouched.
    torch.testing.assert_close(masked[0][[0, 1, 3]], clean[0][[0, 1, 3]], rtol=0, atol=0)
    assert attached(model) == 0


@pytest.mark.parametrize("mode", MODES)
def test_masking_nothing_is_the_clean_run(tiny_gqa, mode):
    model = tiny_gqa
    tokens = tokenize(model, TEXT)[None]
    extra = mode_kwargs(model, mode, [(0, 0)], "all", tokens.shape[1])
    assert interventions.ablation_hooks(model, mode, [], positions="all", **extra) == ([], [])
    (clean,) = decode_greedy(model, tokens, max_new_tokens=5)
    (same,) = decode_greedy(model, tokens, max_new_tokens=5, prefill_hooks=[], decode_hooks=[])
    np.testing.assert_array_equal(same.tokens, clean.tokens)
    np.testing.assert_array_equal(same.positions, clean.positions)


@pytest.mark.parametrize("mode", MODES)
def test_decode_only_masking_leaves_the_prefilled_cache_clean(tiny_gqa, mode):
    model, heads = tiny_gqa, [(0, 1)]
    tokens = tokenize(model, TEXT)[None]

    def prefill_kv(positions):
        kept = []
        keep = lambda act, hook: kept.append(act.clone())  # noqa: E731
        prefill = []
        if positions is not None:
            extra = mode_kwargs(model, mode, heads, positions, tokens.shape[1])
            prefill, decode = interventions.ablation_hooks(model, mode, heads, positions=positions,
                                                      **extra)
            assert decode  # decode steps are always masked
        decode_greedy(model, tokens, max_new_tokens=2, chunk_size=6,
                      prefill_hooks=[*prefill, (hooks.k(1), keep), (hooks.v(1), keep)])
        return torch.cat([torch.cat(kept[i::2], dim=1) for i in (0, 1)], dim=-1)

    clean = prefill_kv(None)
    assert torch.equal(prefill_kv("decode"), clean)
    assert not torch.allclose(prefill_kv("all"), clean)
    assert attached(model) == 0


# ------------------------------------------------------------------------------------ head sets

FACTS = ModelFacts("facts", n_layers=4, n_heads=8, n_kv_heads=2, d_head=16, d_model=128,
                   d_vocab=10, n_ctx=64, positional="rotary")


def test_random_conditions_are_named_per_draw_and_reproducible():
    scores = np.zeros((4, 8))
    scores[3, [1, 5]] = [0.9, 0.4]
    conds = conditions_from_masks(FACTS, ["random:3"], scores=scores, seed=1, n_draws=2)
    assert [c.name for c in conds] == ["none", "random-3-d0", "random-3-d1"]
    assert conds == conditions_from_masks(FACTS, ["random:3"], scores=scores, seed=1, n_draws=2)
    draws = random_head_draws(3, n_layers=4, n_heads=8, scores=scores, seed=1, n_draws=2)
    assert [c.heads for c in conds[1:]] == list(draws)


def test_top_k_explicit_lists_and_kv_groups():
    scores = np.arange(32, dtype=float).reshape(4, 8) / 100
    scores[0, 3] = 0.95
    conds = conditions_from_masks(FACTS, ["top:2", "heads:1.2, 0.7", "groups:3.1", "top:2"],
                                  scores=scores)
    assert [c.name for c in conds] == ["none", "top-2", "heads-L0H7_L1H2", "groups-L3G1"]
    assert conds[1].heads == ((0, 3), (3, 7))
    assert conds[2].heads == ((0, 7), (1, 2))
    assert conds[3].heads == ((3, 4), (3, 5), (3, 6), (3, 7))
    conds = conditions_from_masks(FACTS, ["bottom:3", "all", "groups:1.1,0.0"], scores=scores)
    assert [c.name for c in conds] == ["none", "bottom-3", "all", "groups-L1G1_L0G0"]
    assert conds[1].heads == ((0, 0), (0, 1), (0, 2)) and conds[1].k == 3
    assert len(conds[2].heads) == 32
    assert conds[3].heads == ((1, 4), (1, 5), (1, 6), (1, 7), (0, 0), (0, 1), (0, 2), (0, 3))


@pytest.mark.parametrize("mask, message", [
    ("heads:0.8", "head 8 .* out of range"),
    ("heads:4.0", "layer 4 .* out of range"),
    ("heads:1-2", "write LAYER.HEAD"),
    ("groups:0.2", "group 2 of L0G2 is out of range"),
    ("top:33", "top-33: K must be in"),
    ("random:x", "positive integer"),
    ("middle:3", "unknown head set"),
])
def test_bad_head_sets_give_clear_errors(mask, message):
    with pytest.raises(ValueError, match=message):
        conditions_from_masks(FACTS, [mask], scores=np.zeros((4, 8)))


def test_bad_hook_requests_give_clear_errors(tiny_gqa):
    with pytest.raises(ValueError, match="layer 2 .* out of range"):
        interventions.ablation_hooks(tiny_gqa, "zero", [(2, 0)])
    with pytest.raises(ValueError, match="needs mean_z"):
        interventions.ablation_hooks(tiny_gqa, "mean", [(0, 0)])
    with pytest.raises(ValueError, match="needs a donor"):
        interventions.ablation_hooks(tiny_gqa, "resample", [(0, 0)])
    with pytest.raises(ValueError, match="needs retrieval scores"):
        conditions_from_masks(tiny_gqa, ["top:1"])
    with pytest.raises(ValueError, match="another model"):
        conditions_from_masks(tiny_gqa, ["top:1"], scores=np.zeros((4, 8)))


# ------------------------------------------------------------------------------- error analysis


def test_output_classes():
    prompt = BASE_TEMPLATE.format(context=HAYSTACK.source, question="What is it?")
    classify = lambda out: ablation.classify_output("purple ginger", out, prompt)  # noqa: E731
    assert classify(" purple ginger and salt.\n") == "correct"
    assert classify(" Purple.\n") == "incomplete"
    assert classify(" a girl named Mara\n") == "wrong_extraction"
    assert classify(" blue elephants dance\n") == "hallucinated"
    assert classify(" Mara girl the\n") == "wrong_extraction"  # copied words, in any order
    assert classify(" the elephants\n") == "hallucinated"  # one word is in no part of the prompt
    assert classify("\n") == "empty"


def test_attention_places():
    regions = ablation.Regions(n_prompt=20, answer=(6, 8), needle=(4, 10), question_start=15)
    positions = np.array([[0, 6], [5, 9], [16, 21], [12, 7]])
    places = ablation.attention_places(positions, regions)
    expected = {"sink": [1, 0], "answer": [0, 2], "needle": [1, 1], "question": [1, 0],
                "generated": [0, 1], "elsewhere": [1, 0]}
    np.testing.assert_array_equal(places, np.array([expected[p] for p in ablation.PLACES]).T)


# ------------------------------------------------------------------ known answer: the copy model


QUESTIONS = ("What is the magic word?", "What is the other word?")


def words(tokenizer, n: int) -> list[str]:
    """Words that are one token after a space and occur neither in the haystack nor the prompt."""
    avoid = (HAYSTACK.source + BASE_TEMPLATE + QUESTIONS[0] + QUESTIONS[1]).lower()
    out = []
    for idx in sorted(tokenizer.get_vocab().values()):
        word = tokenizer.decode([idx])
        if (word.startswith(" ") and word[1:].isalpha() and len(word) > 4
                and word.strip().lower() not in avoid
                and tokenizer.encode(word, add_special_tokens=False) == [idx]):
            out.append(word.strip())
    assert len(out) >= n, "the test vocabulary has too few suitable words"
    return out[:n]


@pytest.fixture(scope="module", params=BACKENDS)
def copy_setup(request, tokenizer):
    a, b = words(tokenizer, 2)
    needles = [Needle(f"The magic word is {a}.", QUESTIONS[0], a),
               Needle(f"The other word is {b}.", QUESTIONS[1], b)]
    ids = [tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in (a, b)]
    return build_copy_model(tokenizer, ids, copy_head=1, backend=request.param), needles


SWEEP = DetectConfig(lengths=(60,), depths=(0.0, 100.0), buffer=30, max_new_tokens=5)
COPY = Condition("heads", "copy", ((0, 1),))
OTHERS = Condition("heads", "others", ((0, 0), (0, 2), (0, 3)))
NONE = Condition("none", "none")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.slow
def test_masking_the_copy_head_kills_niah_and_other_heads_change_nothing(copy_setup, mode):
    model, needles = copy_setup
    cfg = AblationConfig(SWEEP, mode=mode, n_reference=2, reference_length=40)
    result = compute_ablation(model, needles, [HAYSTACK] * 2, [NONE, COPY, OTHERS], cfg,
                              watch=[(0, 1)], progress=False)
    assert attached(model) == 0
    assert result.success_rate().tolist() == [1.0, 0.0, 1.0]
    none, copy, others = result.records
    assert [r.generated for r in others] == [r.generated for r in none]
    assert {r.error for r in none} == {"correct"}
    assert "correct" not in {r.error for r in copy}
    if mode == "uniform":  # the mean of its values: it emits the prompt's most frequent token
        first = copy[0]
        trial = build_trial(model, needles[0], HAYSTACK, context_length=first.cell.length,
                            depth=first.cell.depth, buffer=30, max_new_tokens=5)
        assert first.tokens[0] == np.bincount(trial.tokens.numpy()).argmax()
        assert first.generated.strip() == "" and {r.error for r in copy} == {"empty"}
        assert np.isnan(result.attention_shares(failed=True)[1]).all()  # its attention is the mask
    else:  # the output is replaced, the attention is not: the head still looks at the answer
        shares = dict(zip(ablation.PLACES, result.attention_shares(failed=True)[1], strict=True))
        assert shares["answer"] == 1.0
    if mode == "resample":  # it emits the donor's answer, which is nowhere in this prompt
        assert {r.error for r in copy} == {"hallucinated"}
        assert [r.generated.strip() for r in copy] == [r.donor.strip() for r in copy]
        assert {r.generated.strip() for r in copy[:2]} == {needles[1].answer}
    if mode == "uniform":  # the none condition is the detection run itself
        detected = compute_detect(model, needles, [HAYSTACK] * 2, SWEEP, progress=False)
        assert [r.generated for r in none] == [r.generated for r in detected.records]
        curve = result.k_curve()
        assert curve.ks.tolist() == [0]


@pytest.mark.slow
def test_only_one_head_matters_so_the_interval_and_p_value_are_known(copy_setup):
    # The copy head is top-1; matched-1 draws one of the three heads that write nothing.
    # Masking top-1 fails all 6 trials, every matched draw fails none: the intervals are points
    # and the exact two-sided p-value of 6 paired trials of equal sign is 2 / 2**6.
    model, needles = copy_setup
    scores = np.array([[0.0, 1.0, 0.0, 0.0]])
    conds = conditions_from_masks(model, ["top:1", "matched:1", "bottom:1"], scores=scores,
                                  seed=2, n_draws=3)
    assert [c.name for c in conds] == ["none", "top-1", "matched-1-d0", "matched-1-d1",
                                       "matched-1-d2", "bottom-1"]
    assert all(c.heads != ((0, 1),) and c.group == "matched-1" for c in conds[2:5])
    sweep = DetectConfig(lengths=(60,), depths=(0.0, 50.0, 100.0), buffer=30, max_new_tokens=5)
    result = compute_ablation(model, needles, [HAYSTACK] * 2, conds, AblationConfig(sweep),
                              progress=False)
    comps = {c.control: c for c in result.controls("success")}
    assert set(comps) == {"matched", "bottom"}
    matched = comps["matched"]
    assert matched.ks.tolist() == [1] and matched.n_trials == 6 and matched.n_draws[0] == 3
    np.testing.assert_array_equal(matched.top, [[0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(matched.control_values, [[1.0, 1.0, 1.0]])
    np.testing.assert_array_equal(matched.diff, [[1.0, 1.0, 1.0]])
    assert matched.p.tolist() == [2 / 2**6] and matched.q.tolist() == [2 / 2**6]
    assert matched.significant.tolist() == [True]
    summary = result.summary()
    row = summary["controls"]["rouge"][0]
    assert (row["control"], row["rows"][0]["k"], row["rows"][0]["p"]) == ("matched", 1, 2 / 64)
    assert result.arrays()["ctl_matched_success_p"].tolist() == [2 / 64]


def test_matched_controls_need_enough_heads_per_layer():
    scores = np.zeros((4, 8))
    scores[1] = np.linspace(1.0, 0.5, 8)  # every head of layer 1 is a retrieval head
    assert len(conditions_from_masks(FACTS, ["matched:4"], scores=scores, n_draws=2)) == 3
    with pytest.raises(ValueError, match="top-5 has 5 heads in layer 1, which leaves only 3"):
        conditions_from_masks(FACTS, ["matched:5"], scores=scores)
    with pytest.raises(ValueError, match="number of draws must be >= 1"):
        conditions_from_masks(FACTS, ["matched:2"], scores=scores, n_draws=0)


def test_no_hook_left_after_a_hook_raises(copy_setup, monkeypatch):
    model, needles = copy_setup

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(interventions, "_donor_rows", boom)  # called inside the resample hook
    cfg = AblationConfig(SWEEP, mode="resample", positions="all")
    with pytest.raises(RuntimeError, match="boom"):
        compute_ablation(model, needles, [HAYSTACK] * 2, [COPY], cfg, progress=False)
    assert attached(model) == 0
    _, decode = interventions.ablation_hooks(model, "uniform", [(0, 1)])
    with pytest.raises(RuntimeError, match="boom"):
        decode_greedy(model, tokenize(model, TEXT)[None], max_new_tokens=2,
                      decode_hooks=[*decode, (hooks.pattern(0), boom)])
    assert attached(model) == 0


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_losing_cells(copy_setup, tmp_path, monkeypatch):
    model, needles = copy_setup
    sweep = DetectConfig(lengths=(60,), depths=(0.0, 25.0, 50.0, 75.0, 100.0), buffer=30,
                         max_new_tokens=5)
    cfg = AblationConfig(sweep)
    conds = [NONE, COPY]
    full = compute_ablation(model, needles[:1], [HAYSTACK], conds, cfg, progress=False)

    real, calls = ablation_sweep._run_cells, []

    def flaky(model, cond, todo, *args, **kwargs):
        calls.append(len(todo))
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(model, cond, todo, *args, **kwargs)

    monkeypatch.setattr(ablation_sweep, "_run_cells", flaky)
    out = tmp_path / "sweep"
    with pytest.raises(KeyboardInterrupt):
        compute_ablation(model, needles[:1], [HAYSTACK], conds, cfg, out_dir=out, progress=False)
    count = lambda name: len(list((out / "conditions" / name / "cells").glob("*.json")))  # noqa
    assert (count("none"), count("copy")) == (5, 4)
    assert not list(out.rglob("*.tmp"))

    calls.clear()
    resumed = compute_ablation(model, needles[:1], [HAYSTACK], conds, cfg, out_dir=out,
                               progress=False)
    assert calls == [1]  # only the missing cell ran
    for a, b in zip(full.records, resumed.records, strict=True):
        assert [(r.cell, r.generated, r.rouge1_recall, r.error) for r in a] == \
               [(r.cell, r.generated, r.rouge1_recall, r.error) for r in b]
    np.testing.assert_array_equal(full.grids(), resumed.grids())

    with pytest.raises(RhLensError, match="different head set"):
        compute_ablation(model, needles[:1], [HAYSTACK], [Condition("heads", "copy", ((0, 2),))],
                         cfg, out_dir=out, progress=False)
    with pytest.raises(RhLensError, match="different sweep"):
        compute_ablation(model, needles[:1], [HAYSTACK], conds, AblationConfig(sweep, mode="zero"),
                         out_dir=out, progress=False)


# ------------------------------------------------------------------------ the analyses script


@pytest.mark.slow
def test_ablate_script_on_the_copy_model(copy_setup, tokenizer, tmp_path, capsys):
    from analyses import ablate, detect
    from rh_lens.models import save_model_dir
    from rh_lens.results import load_result

    model, needles = copy_setup
    backend = backend_of(model)
    ids = [tokenizer.encode(" " + n.answer, add_special_tokens=False)[0] for n in needles]
    hooked = build_copy_model(tokenizer, ids, copy_head=1)  # the same weights, savable
    save_model_dir(tmp_path / "model", cfg=hooked.cfg, state_dict=hooked.state_dict(),
                   tokenizer=tokenizer)
    (tmp_path / "needles.jsonl").write_text("".join(
        json.dumps({"needle": n.needle, "question": n.question, "real_needle": n.answer}) + "\n"
        for n in needles))
    (tmp_path / "hay").mkdir()
    (tmp_path / "hay" / "a.txt").write_text(HAYSTACK.source)
    common = ["--model", str(tmp_path / "model"), "--needles", str(tmp_path / "needles.jsonl"),
              "--haystack", str(tmp_path / "hay"), "--lengths", "80", "--depths", "50",
              "--buffer", "30", "--max-new-tokens", "5", "--quiet", "--backend", backend]
    assert detect.main([*common, "--out", str(tmp_path / "detect")]) == 0
    assert load_result(tmp_path / "detect").meta["backend"] == backend
    out = tmp_path / "ablate"
    code = ablate.main([*common, "--scores", str(tmp_path / "detect"), "--out", str(out),
                        "--ks", "1", "--draws", "2", "--mask", "heads:0.2", "--watch", "1"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "top-1" in printed.out and "random-1-d1" in printed.out
    result = load_result(out)
    assert result.kind == "ablation"
    rows = {c["name"]: c for c in result.summary["conditions"]}
    assert list(rows) == ["none", "heads-L0H2", "top-1", "random-1-d0", "random-1-d1"]
    assert rows["top-1"]["heads"] == [[0, 1]] and rows["top-1"]["success_rate"] == 0.0
    for name in ("none", "heads-L0H2", "random-1-d0", "random-1-d1"):
        assert rows[name]["success_rate"] == 1.0
    assert all(rows[f"random-1-d{d}"]["heads"] != [[0, 1]] for d in (0, 1))
    np.testing.assert_array_equal(result.arrays["k"], [0, 1])
    np.testing.assert_array_equal(result.arrays["k_top_success"], [1.0, 0.0])
    np.testing.assert_array_equal(result.arrays["k_random_success"], [[1.0, 1.0], [1.0, 1.0]])
    assert result.arrays["rouge_grids"].shape == (5, 1, 1)
    for name in ("k_curve.html", "grids.html", "errors.html", "failure_attention.html",
                 "plotly.min.js", "trials.jsonl", "summary.json"):
        assert (out / name).is_file()
    assert len((out / "trials.jsonl").read_text().splitlines()) == 5 * 2

    assert ablate.main([*common, "--scores", str(tmp_path / "nowhere"), "--out",
                        str(tmp_path / "x")]) == 2
    assert "no retrieval scores" in capsys.readouterr().err
    assert ablate.main([*common, "--mask", "heads:0.9", "--out", str(tmp_path / "y")]) == 2
    assert "head 9" in capsys.readouterr().err
