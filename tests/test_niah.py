"""NIAH trial construction: the answer span is found exactly, bad input is named."""

import dataclasses
import json

import pytest
import torch

from rh_lens.errors import ContextTooLongError
from rh_lens.models import load_model, tokenize
from rh_lens.niah import (
    TRIAL_MEMO,
    Needle,
    NeedleError,
    TextHaystack,
    _cut_haystack,
    build_trial,
    clear_trial_memo,
    read_needles,
    reference_inputs,
)
from tests.conftest import CORPUS, save_hf_model, shared_path, train_tokenizer

pytestmark = pytest.mark.tl4

NEEDLE = Needle(
    "The secret ingredient of Mara's soup is purple ginger and sea salt.",
    "What is the secret ingredient of Mara's soup?",
    "purple ginger and sea salt.",
)
HAY = TextHaystack(" ".join(CORPUS[:4]))


@pytest.fixture(scope="module")
def model(hf_dirs):
    return load_model(hf_dirs["llama"], n_ctx=4096)


@pytest.mark.parametrize("depth", [0, 10, 50, 90, 100])
@pytest.mark.parametrize("length", [80, 300, 1000])
def test_answer_span_is_located_in_prompt_tokens(model, depth, length):
    trial = build_trial(model, NEEDLE, HAY, context_length=length, depth=depth, buffer=40)
    s, e = trial.answer_span
    decoded = model.to_string(trial.tokens[s:e])
    assert NEEDLE.answer in decoded
    # minimal: dropping the first or last token loses part of the answer
    assert NEEDLE.answer not in model.to_string(trial.tokens[s + 1 : e])
    assert NEEDLE.answer not in model.to_string(trial.tokens[s : e - 1])
    assert trial.prompt[trial.needle_char :].startswith(NEEDLE.needle)
    assert trial.prompt.endswith(f"Question: {NEEDLE.question}\nAnswer:")
    # haystack + needle fill length - buffer tokens (up to merges at the two junctions)
    question = trial.prompt[trial.prompt.rindex("Based on the content"):]
    n_question = len(tokenize(model, question, prepend_bos=False))
    assert abs(trial.n_tokens - 1 - n_question - (length - 40)) <= 3


def test_depth_moves_back_to_a_sentence_end(model):
    trial = build_trial(model, NEEDLE, HAY, context_length=300, depth=50, buffer=40)
    before = trial.prompt[: trial.needle_char].rstrip()
    assert before.endswith(".")
    first = build_trial(model, NEEDLE, HAY, context_length=300, depth=0, buffer=40)
    assert first.needle_char == 0
    last = build_trial(model, NEEDLE, HAY, context_length=300, depth=100, buffer=40)
    assert last.prompt.rindex("Based on the content") == last.needle_char + len(NEEDLE.needle)


def test_answer_at_the_very_end_of_the_context(model):
    """At depth 100 the answer's last character touches the question text."""
    trial = build_trial(model, NEEDLE, HAY, context_length=200, depth=100, buffer=40)
    s, e = trial.answer_span
    assert NEEDLE.answer in model.to_string(trial.tokens[s:e])


def test_merge_across_the_boundary_is_handled(model):
    """An answer glued to the preceding text ('X:answer') still maps to its tokens."""
    glued = Needle("Codeword:ginger", "What is the codeword?", "ginger")
    trial = build_trial(model, glued, HAY, context_length=200, depth=50, buffer=40)
    s, e = trial.answer_span
    assert "ginger" in model.to_string(trial.tokens[s:e])


def test_bad_needles():
    with pytest.raises(NeedleError, match="does not occur in needle"):
        Needle("The sky is blue.", "What colour?", "green")
    with pytest.raises(NeedleError, match="non-empty"):
        Needle("", "q", "a")


def test_context_longer_than_n_ctx(hf_dirs):
    small = load_model(hf_dirs["llama"])  # n_ctx 256
    with pytest.raises(ContextTooLongError, match="n_ctx=256"):
        build_trial(small, NEEDLE, HAY, context_length=1000, depth=50, buffer=40)
    with pytest.raises(ContextTooLongError, match="new tokens"):
        build_trial(small, NEEDLE, HAY, context_length=256, depth=50, buffer=10,
                    max_new_tokens=100)


def test_empty_haystack():
    with pytest.raises(NeedleError, match="empty"):
        TextHaystack("   ")


def test_malformed_needles_file(tmp_path):
    path = tmp_path / "needles.jsonl"
    path.write_text('{"needle": "a b.", "question": "q?", "real_needle": "b."}\n{broken\n')
    with pytest.raises(NeedleError, match="line 2: not valid JSON"):
        read_needles(path)
    path.write_text(json.dumps({"needle": "a b.", "question": "q?"}) + "\n")
    with pytest.raises(NeedleError, match="line 1: missing field.*real_needle"):
        read_needles(path)
    path.write_text(json.dumps({"needle": "a b.", "question": "q?", "real_needle": "c"}) + "\n")
    with pytest.raises(NeedleError, match="line 1: answer 'c' does not occur"):
        read_needles(path)
    path.write_text("\n")
    with pytest.raises(NeedleError, match="no needles"):
        read_needles(path)
    with pytest.raises(NeedleError, match="does not exist"):
        read_needles(tmp_path / "missing.jsonl")


@pytest.mark.needs_shared
def test_reference_inputs_load_and_build(model):
    root = shared_path("data", "official_niah")
    needles, haystacks = reference_inputs(root)
    assert len(needles) == len(haystacks) == 3
    for needle, hay in zip(needles, haystacks, strict=True):
        for depth in (0, 100):
            trial = build_trial(model, needle, hay, context_length=1500, depth=depth)
            s, e = trial.answer_span
            assert needle.answer.strip().lower() in model.to_string(trial.tokens[s:e]).lower()


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """A second tiny Llama whose tokenizer has more merges than ``model``'s: the same text
    splits into fewer tokens."""
    path = tmp_path_factory.mktemp("other") / "tiny-llama-wide"
    return load_model(save_hf_model(path, "llama", train_tokenizer(vocab_size=400)), n_ctx=4096)


@dataclasses.dataclass(frozen=True)
class CountingHaystack:
    """A :class:`TextHaystack` that records every ``text`` call (outside its hash and
    equality, so it still keys the memo by its text)."""

    source: str
    name: str = "counting"
    calls: list = dataclasses.field(default_factory=list, compare=False, hash=False)

    def text(self, n_chars: int) -> str:
        self.calls.append(n_chars)
        return TextHaystack(self.source, self.name).text(n_chars)


def assert_same_trial(a, b, where):
    assert torch.equal(a.tokens, b.tokens), where
    assert (a.answer_span, a.prompt, a.needle_char, a.context_length, a.depth) == (
        b.answer_span, b.prompt, b.needle_char, b.context_length, b.depth), where


def test_memoized_sweep_equals_trials_built_without_the_memo(model, other_model, monkeypatch):
    """Two tokenizers share one haystack, their trials interleaved: every trial built through
    the memo equals the one built with the memo disabled (no cross-talk between tokenizers)."""
    hay = " ".join(CORPUS[:4])
    assert len(tokenize(other_model, hay)) < len(tokenize(model, hay))  # they do differ
    needles = [NEEDLE, Needle("Codeword:ginger", "What is the codeword?", "ginger")]
    cells = [(m, n, length, depth) for length in (80, 300, 700) for depth in (0, 30, 100)
             for n in needles for m in (model, other_model)]

    def sweep(haystack):
        return [build_trial(m, n, haystack, context_length=length, depth=depth, buffer=40)
                for m, n, length, depth in cells]

    clear_trial_memo()
    counting = CountingHaystack(hay)
    memoized = sweep(counting)
    assert set(TRIAL_MEMO.sizes()) == {id(model.tokenizer), id(other_model.tokenizer)}
    # one haystack cut per (tokenizer, needle, length), a few text calls each
    assert len(counting.calls) <= 2 * 2 * 3 * 2 < len(cells)

    with monkeypatch.context() as patch:
        patch.setattr(TRIAL_MEMO, "max_entries", 0)
        clear_trial_memo()
        fresh = sweep(TextHaystack(hay))
        assert all(size == 0 for size in TRIAL_MEMO.sizes().values())
    for a, b, (m, n, length, depth) in zip(memoized, fresh, cells, strict=True):
        assert_same_trial(a, b, (m.cfg.model_name, n.answer, length, depth))


def test_haystack_cuts_are_kept_apart_per_tokenizer(model, other_model, monkeypatch):
    hay = TextHaystack(" ".join(CORPUS[:4]))
    clear_trial_memo()
    cuts = {m: _cut_haystack(m, hay, 60) for m in (model, other_model)}
    assert cuts[model] != cuts[other_model]
    assert len(tokenize(model, cuts[model], prepend_bos=False)) == 60
    assert len(tokenize(other_model, cuts[other_model], prepend_bos=False)) == 60
    for m in (other_model, model):  # now read from the memo
        assert _cut_haystack(m, hay, 60) == cuts[m]
