"""The attention scores of detection (mass, QR): known answers, fast against slow, resume."""

import numpy as np
import pytest
import torch

from rh_lens import qr
from rh_lens.decode import decode_greedy
from rh_lens.detect import DetectConfig, DetectResult, compute_detect
from rh_lens.hooks import pattern
from rh_lens.niah import Needle, build_trial
from rh_lens.properties import load_head_scores
from tests.conftest import BACKENDS, CORPUS
from tests.known_answer import build_copy_model
from tests.test_detect import HAYSTACK, single_token_word

CFG = DetectConfig(lengths=(60, 150), depths=(0.0, 50.0, 100.0), buffer=30, max_new_tokens=5)


@pytest.fixture(scope="module", params=BACKENDS)
def known(request, tokenizer):
    """The copy model (copy head 1) with a question head (2), its needle, a trial, and the
    question's flagged tokens: all but those of the null question, the answer and the prompt's
    last token (so that the question head is uniform while decoding)."""
    word = single_token_word(tokenizer, HAYSTACK.source)
    needle = Needle(f"The magic word is {word}.", "What is the magic word?", word)
    (word_id,) = tokenizer.encode(" " + word, add_special_tokens=False)
    plain = build_copy_model(tokenizer, [word_id])
    trial = build_trial(plain, needle, HAYSTACK, context_length=120, depth=50, buffer=30)
    _, (qs, qe) = qr.prompt_spans(plain, trial)
    null = set(qr.null_question_ids(plain, qe - qs).tolist())
    flagged = set(trial.tokens[qs:qe].tolist()) - null - {word_id, int(trial.tokens[-1])}
    assert flagged, "no question token to flag"
    model = build_copy_model(tokenizer, [word_id], question_ids=sorted(flagged),
                             backend=request.param)
    return model, needle, trial, flagged


def test_prompt_spans_locate_the_needle_and_the_question(known):
    model, needle, trial, _ = known
    (ns, ne), (qs, qe) = qr.prompt_spans(model, trial)
    assert model.to_string(trial.tokens[ns:ne]).strip() == needle.needle
    assert model.to_string(trial.tokens[qs:qe]).strip() == needle.question
    assert ns <= trial.answer_span[0] < trial.answer_span[1] <= ne < qs


def test_mass_known_answer(known):
    """Copy head: all its attention on the answer at the first step, half at the second (the
    emitted answer token is flagged too); uniform heads: 1/keys."""
    model, needle, _, _ = known
    result = compute_detect(model, [needle], [HAYSTACK], CFG, progress=False, scores=["mass"])
    assert result.n_success == len(result.records) == 6
    for record in result.records:
        n = record.n_tokens
        assert len(record.tokens) == 2  # the answer, then the newline
        uniform = (1 / n + 1 / (n + 1)) / 2
        expected = np.array([[uniform, 0.75, uniform, uniform]])
        np.testing.assert_allclose(record.mass_score, expected, rtol=1e-5, atol=1e-7)
    assert result.scores == ("step", "set", "mass")
    assert result.ranked("mass")[0][:2] == (0, 1)


def test_qr_known_answer(known):
    """Question head: mass 1 from a flagged question token, else (and from every null token)
    the needle's share of the row's keys; every other head looks where it looks whatever is
    asked, so it scores 0."""
    model, _, trial, flagged = known
    (ns, ne), (qs, qe) = qr.prompt_spans(model, trial)
    real, null = qr.question_mass(model, trial.tokens, needle=(ns, ne), question=(qs, qe),
                                  chunk_size=16)
    share = [(ne - ns) / (p + 1) for p in range(qs, qe)]
    on = [1.0 if int(trial.tokens[p]) in flagged else share[p - qs] for p in range(qs, qe)]
    assert any(v == 1.0 for v in on)  # some question token is flagged
    np.testing.assert_allclose(real[0, 2], np.mean(on), rtol=1e-5)
    np.testing.assert_allclose(null[0, 2], np.mean(share), rtol=1e-5)
    np.testing.assert_allclose(real[0, 1], 1.0, rtol=1e-5)  # the copy head looks at the answer
    expected = np.array([[0.0, 0.0, np.mean(on) - np.mean(share), 0.0]])
    np.testing.assert_allclose(qr.qr_scores(model, trial), expected, rtol=1e-5, atol=1e-6)


def test_qr_in_detection_is_the_known_answer(known):
    model, needle, _, _ = known
    cfg = DetectConfig(lengths=(120,), depths=(50.0,), buffer=30, max_new_tokens=5)
    result = compute_detect(model, [needle], [HAYSTACK], cfg, progress=False, scores=["qr"])
    qr_table = result.mean_scores("qr")
    assert result.ranked("qr")[0][:2] == (0, 2) and qr_table[0, 2] > 0.1
    np.testing.assert_allclose(qr_table[0, [0, 1, 3]], 0.0, atol=1e-6)
    np.testing.assert_array_equal(result.mean_scores("step"), [[0, 1, 0, 0]])


# ---------------------------------------------------------------------- fast against slow


NEEDLE = Needle("The secret word is ginger.", "What is the secret word?", "ginger")


def slow_mass(model, prompt, emitted, span):
    """Full forward per step, the whole pattern cached, the span summed head by head."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    out = np.zeros((len(emitted), n_layers, n_heads))
    sequence = prompt.tolist()
    for t, token in enumerate(emitted):
        _, cache = model.run_with_cache(torch.tensor([sequence]),
                                        names_filter=lambda name: name.endswith("hook_pattern"))
        for layer in range(n_layers):
            for head in range(n_heads):
                out[t, layer, head] = float(
                    cache[pattern(layer)][0, head, -1, span[0] : span[1]].sum())
        sequence.append(int(token))
    return out


@torch.no_grad()
def test_span_mass_fast_equals_slow(tiny_gqa):
    trial = build_trial(tiny_gqa, NEEDLE, HAYSTACK, context_length=90, depth=40, buffer=30,
                        max_new_tokens=6)
    (fast,) = decode_greedy(tiny_gqa, trial.tokens[None], max_new_tokens=6, chunk_size=7,
                            spans=[trial.answer_span])
    slow = slow_mass(tiny_gqa, trial.tokens, fast.tokens, trial.answer_span)
    torch.testing.assert_close(torch.from_numpy(fast.span_mass), torch.from_numpy(slow),
                               rtol=1e-4, atol=1e-5)
    assert fast.span_mass.max() > 0.01  # something to compare


@torch.no_grad()
def test_batched_span_mass_equals_single(tiny_gqa):
    prompts = [tiny_gqa.to_tokens(t, prepend_bos=True)[0, :n]
               for t, n in ((CORPUS[0], 20), (CORPUS[1], 13), (CORPUS[2], 17))]
    spans = [(2, 6), (5, 9), (1, 12)]
    batched = decode_greedy(tiny_gqa, prompts, max_new_tokens=5, chunk_size=8, spans=spans)
    for prompt, span, out in zip(prompts, spans, batched, strict=True):
        (single,) = decode_greedy(tiny_gqa, prompt[None], max_new_tokens=5, spans=[span])
        np.testing.assert_array_equal(out.tokens, single.tokens)
        torch.testing.assert_close(torch.from_numpy(out.span_mass),
                                   torch.from_numpy(single.span_mass), rtol=1e-4, atol=1e-5)


def test_decoding_without_spans_records_no_mass(tiny_gqa):
    (out,) = decode_greedy(tiny_gqa, tiny_gqa.to_tokens("a b c"), max_new_tokens=2)
    assert out.span_mass is None
    with pytest.raises(ValueError, match="one \\(start, end\\) per prompt"):
        decode_greedy(tiny_gqa, tiny_gqa.to_tokens("a b c"), max_new_tokens=2, spans=[])


def slow_question_mass(model, tokens, needle, question, null_ids):
    """Both prompts forwarded whole, the full pattern cached, summed and averaged by hand."""
    (ns, ne), (qs, qe) = needle, question
    out = []
    for ids in (tokens, torch.cat([tokens[:qs], null_ids, tokens[qe:]])):
        _, cache = model.run_with_cache(ids[None],
                                        names_filter=lambda name: name.endswith("hook_pattern"))
        table = np.zeros((model.cfg.n_layers, model.cfg.n_heads))
        for layer in range(model.cfg.n_layers):
            for head in range(model.cfg.n_heads):
                rows = cache[pattern(layer)][0, head, qs:qe, ns:ne]
                table[layer, head] = np.mean([float(r.sum()) for r in rows])
        out.append(table)
    return out


@pytest.mark.parametrize("chunk", [1, 9, 1000])
@torch.no_grad()
def test_question_mass_fast_equals_slow(tiny_gqa, chunk):
    trial = build_trial(tiny_gqa, NEEDLE, HAYSTACK, context_length=90, depth=40, buffer=30,
                        max_new_tokens=6)
    needle, question = qr.prompt_spans(tiny_gqa, trial)
    null_ids = qr.null_question_ids(tiny_gqa, question[1] - question[0])
    real, null = qr.question_mass(tiny_gqa, trial.tokens, needle=needle, question=question,
                                  chunk_size=chunk)
    slow_real, slow_null = slow_question_mass(tiny_gqa, trial.tokens, needle, question, null_ids)
    torch.testing.assert_close(torch.from_numpy(real), torch.from_numpy(slow_real),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(null), torch.from_numpy(slow_null),
                               rtol=1e-4, atol=1e-5)
    assert np.abs(real - null).max() > 1e-3  # the null question changes something


def test_question_mass_rejects_bad_spans(tiny_gqa):
    tokens = tiny_gqa.to_tokens("a b c d e f g h")[0]
    with pytest.raises(ValueError, match="must lie before question span"):
        qr.question_mass(tiny_gqa, tokens, needle=(5, 7), question=(2, 4))
    with pytest.raises(ValueError, match="needs 2 tokens"):
        qr.question_mass(tiny_gqa, tokens, needle=(1, 2), question=(3, 5),
                         null_ids=torch.tensor([1, 2, 3]))


# ---------------------------------------------------------------------- stores and resume


def test_resume_adds_a_score_to_old_cells(known, tmp_path):
    """Cells written without attention scores (as before they existed) are read back; asking
    for a score reruns them, keeping the scores they had; a later plain resume keeps all."""
    model, needle, _, _ = known
    out = tmp_path / "sweep"
    old = compute_detect(model, [needle], [HAYSTACK], CFG, out_dir=out, progress=False)
    assert old.scores == ("step", "set") and "mean_mass" not in old.arrays()
    with pytest.raises(ValueError, match="6 of 6 trials have no mass score"):
        old.mean_scores("mass")
    read = compute_detect(model, [needle], [HAYSTACK], CFG, out_dir=out, progress=False)
    np.testing.assert_array_equal(read.mean_scores("step"), old.mean_scores("step"))

    with_qr = compute_detect(model, [needle], [HAYSTACK], CFG, out_dir=out, progress=False,
                             scores=["qr"])
    both = compute_detect(model, [needle], [HAYSTACK], CFG, out_dir=out, progress=False,
                          scores=["mass"])
    assert with_qr.scores == ("step", "set", "qr")
    assert both.scores == ("step", "set", "mass", "qr")
    np.testing.assert_array_equal(both.mean_scores("qr"), with_qr.mean_scores("qr"))
    fresh = compute_detect(model, [needle], [HAYSTACK], CFG, progress=False,
                           scores=["mass", "qr"])
    for kind in ("step", "set", "mass", "qr"):
        np.testing.assert_allclose(both.mean_scores(kind), fresh.mean_scores(kind), atol=1e-12)
    again = DetectResult.load(out)
    assert again.scores == ("step", "set", "mass", "qr")

    both.save(out, identity={"model": "known"}, score="mass")
    loaded = load_head_scores(out, score="mass")
    np.testing.assert_allclose(loaded.mean, both.mean_scores("mass"))
    assert set(load_head_scores(out, score="qr").others) >= {"step", "set", "mass"}


@pytest.mark.slow
def test_release_directory_resumes_with_the_attention_scores(tmp_path):
    """A detection directory written by rh_lens 0.1.0 (no attention scores): a rerun with
    ``--score mass --extra-scores qr`` reruns its cells, and the copy scores come back as
    0.1.0 wrote them."""
    import shutil

    from analyses import detect
    from rh_lens.results import load_result
    from tests.test_release_equivalence import DETECT, RELEASE

    copy = tmp_path / "detect"
    shutil.copytree(RELEASE / "detect", copy)
    assert detect.main([*DETECT, "--out", str(copy), "--score", "mass",
                        "--extra-scores", "qr"]) == 0
    new, old = load_result(copy).arrays, load_result(RELEASE / "detect").arrays
    for name in ("trial_step", "trial_set", "trial_active", "success"):
        np.testing.assert_array_equal(new[name], old[name], err_msg=name)
    assert new["trial_mass"].shape == new["trial_qr"].shape == old["trial_step"].shape
    assert DetectResult.load(copy).scores == ("step", "set", "mass", "qr")
