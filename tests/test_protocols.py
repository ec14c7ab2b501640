"""The reference protocol (``rh_lens.protocols``) against a line-by-line transcription of the
reference's loop (``tests/reference_loop.py``), on the zoo's retrieval model."""

import json

import numpy as np
import pytest
import torch

from rh_lens.detect import DetectConfig, compute_detect
from rh_lens.models import load_model
from rh_lens.niah import TRIAL_MEMO, Needle, TextHaystack, clear_trial_memo, reference_inputs
from rh_lens.protocols import (
    NOT_FOUND,
    build_reference_trial,
    find_span,
    period_ids,
    reference_stop,
)
from rh_lens.zoo.inputs import zoo_inputs
from tests.conftest import shared_path
from tests.reference_loop import ReferenceLoop


def find_span_slow(prompt_ids, answer_ids):
    """The reference's ``find_needle_idx``: a set per window."""
    for i in range(len(prompt_ids)):
        window = set(prompt_ids[i : i + len(answer_ids)])
        if len(window & set(answer_ids)) / len(set(answer_ids)) > 0.9:
            return i, i + len(answer_ids)
    return NOT_FOUND


def test_find_span_known_answers():
    assert find_span([5, 1, 2, 3, 4, 6], [1, 2, 3, 4]) == (1, 5)
    assert find_span([5, 1, 2, 3, 9, 6], [1, 2, 3, 4]) == NOT_FOUND  # 3/4 = 0.75
    # 10 of 11 distinct ids (0.909 > 0.9) is enough and order does not matter: the first
    # window holding them starts one token early, at the 7 before them
    answer = list(range(20, 31))
    assert find_span([7, 7, *reversed(answer[1:]), 99], answer) == (1, 12)
    assert find_span([7, *answer[:9], 99, 98], answer) == NOT_FOUND  # 9/11
    assert find_span([1, 2], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]) == NOT_FOUND
    assert find_span([3, 1, 1], [1, 1]) == (0, 2)  # repeated ids count once: [3, 1] holds {1}


def test_find_span_equals_the_reference_loop():
    rng = np.random.default_rng(0)
    for _ in range(300):
        prompt = rng.integers(0, 12, size=int(rng.integers(1, 60))).tolist()
        answer = rng.integers(0, 12, size=int(rng.integers(1, 14))).tolist()
        if rng.random() < 0.5 and len(prompt) > len(answer):  # plant it, partly
            at = int(rng.integers(0, len(prompt) - len(answer)))
            prompt[at : at + len(answer)] = answer
            prompt[at + int(rng.integers(0, len(answer)))] = 99
        assert find_span(prompt, answer) == find_span_slow(prompt, answer), (prompt, answer)


@pytest.fixture(scope="module")
def llama_s():
    return load_model("zoo:llama-s")


def test_reference_stop_rule(llama_s):
    tok = llama_s.tokenizer
    newline = tok.encode("\n", add_special_tokens=False)[-1]
    assert reference_stop(tok, 144)
    assert not reference_stop(tok, newline)  # a byte-level newline is not the sentencepiece one
    assert not reference_stop(tok, tok.eos_token_id)
    assert period_ids(tok) == {tok.get_vocab()["."]}


def test_memoized_reference_trials_equal_trials_built_without_the_memo(llama_s, hf_dirs,
                                                                        monkeypatch):
    """The zoo's and a BPE tokenizer share one haystack, their trials interleaved: every
    reference trial built through the memo equals the one built with the memo disabled."""
    tiny = load_model(hf_dirs["llama"])
    needles, haystacks = zoo_inputs(2)
    text = TextHaystack(haystacks[0].text(3_000))
    cells = [(m, n, h, length, depth) for length in (112, 200) for depth in (0.0, 50.0, 100.0)
             for n in needles for h in (text, haystacks[1]) for m in (llama_s, tiny)]

    def sweep():
        return [build_reference_trial(m, n, h, context_length=length, depth=depth, buffer=64,
                                      max_new_tokens=32, max_length=256)
                for m, n, h, length, depth in cells]

    clear_trial_memo()
    memoized = sweep()
    assert set(TRIAL_MEMO.sizes()) == {id(llama_s.tokenizer), id(tiny.tokenizer)}
    with monkeypatch.context() as patch:
        patch.setattr(TRIAL_MEMO, "max_entries", 0)
        clear_trial_memo()
        fresh = sweep()
    for a, b, (m, n, h, length, depth) in zip(memoized, fresh, cells, strict=True):
        where = (m.cfg.model_name, n.answer, h.name, length, depth)
        assert torch.equal(a.tokens, b.tokens), where
        assert (a.answer_span, a.prompt, a.needle_char) == (
            b.answer_span, b.prompt, b.needle_char), where
    pairs = zip(memoized[::2], memoized[1::2], strict=True)  # the two tokenizers, cell by cell
    assert any(not torch.equal(a.tokens, b.tokens) for a, b in pairs)


def run_both(model, needles, texts, tmp_path, *, lengths, depths, buffer=64, max_new=32):
    """``compute_detect(protocol="reference")`` and the transcribed loop over the same grid;
    the haystacks are written to files for the loop, as the reference reads them."""
    cfg = DetectConfig(lengths=tuple(lengths), depths=tuple(map(float, depths)), buffer=buffer,
                       max_new_tokens=max_new, protocol="reference")
    result = compute_detect(model, needles, [TextHaystack(t) for t in texts], cfg, progress=False)
    loop = ReferenceLoop(model, context_lengths=lengths, final_context_length_buffer=buffer,
                         decode_len=max_new, period_tokens=[model.tokenizer.get_vocab()["."]])
    folders = []
    for i, text in enumerate(texts):
        folder = tmp_path / f"part{i + 1}"
        folder.mkdir()
        (folder / "p1.txt").write_text(text, encoding="utf-8")
        folders.append(folder)
    expected = [loop.evaluate(needles[r.cell.needle], folders[r.cell.needle], r.cell.length,
                              r.cell.depth) for r in result.records]
    return result, expected


def assert_same_trials(result, expected):
    assert len(result.records) == len(expected)
    for record, ref in zip(result.records, expected, strict=True):
        where = record.cell.key
        assert record.n_tokens == len(ref.prompt_ids), where
        assert record.answer_span == (ref.needle_start, ref.needle_end), where
        assert record.tokens.tolist() == ref.output, where
        assert record.generated == ref.response, where
        assert record.success == (ref.rouge > 50), where
        if record.answer_span == NOT_FOUND:
            assert np.isnan(record.step_score).all() and not record.active.any(), where
            assert not ref.step_score.any(), where  # the reference's silent zero
        else:
            torch.testing.assert_close(record.step_score, ref.step_score, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_reference_protocol_equals_the_reference_loop_on_zoo_needles(llama_s, tmp_path):
    needles, haystacks = zoo_inputs(3)
    texts = [h.text(20_000) for h in haystacks]
    # a needle that opens with its answer: the one place a BPE answer keeps its tokens
    needles.append(Needle("Jasper Quill keeps the golden hat of Lunmoor in a blue box.",
                          "Who keeps the golden hat of Lunmoor?", "Jasper Quill"))
    texts.append(texts[0])
    result, expected = run_both(llama_s, needles, texts, tmp_path, lengths=(112, 256),
                                depths=(0, 67))
    assert_same_trials(result, expected)
    found = result.span_found
    assert not found[:12].any()  # the zoo's answers tokenize otherwise inside the context
    assert found[12:].all()
    lost = result.summary()["span_not_found"]
    assert lost["count"] == 12 and lost["cells"][0] == "n000_L0000112_d000.00"


@pytest.mark.slow
@pytest.mark.needs_shared
def test_reference_protocol_equals_the_reference_loop_on_official_needles(llama_s, tmp_path):
    needles, haystacks = reference_inputs(shared_path("data", "official_niah"))
    texts = [h.source for h in haystacks]
    result, expected = run_both(llama_s, needles, texts, tmp_path, lengths=(256,),
                                depths=(50,))
    assert_same_trials(result, expected)
    assert result.span_found.any()


def test_reference_protocol_reports_lost_spans_in_the_cli(tmp_path, capsys):
    from analyses import detect

    out = tmp_path / "ref"
    assert detect.main(["--protocol", "reference", "--lengths", "128", "--depths", "50",
                        "--n-needles", "2", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "reference protocol: answer span not found in 2 of 2 trials, not scored" in printed
    assert "n000_L0000128_d050.00, n001_L0000128_d050.00" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["span_not_found"] == {"count": 2, "cells": ["n000_L0000128_d050.00",
                                                               "n001_L0000128_d050.00"]}
    assert json.loads((out / "result.json").read_text())["config"]["protocol"] == "reference"
    assert not (out / "head_score.json").exists()  # no trial could be scored
