"""Score functions on hand-made attention records, and ROUGE against the rouge_score package."""

import random

import pytest
import torch

from rh_lens import scoring

pytestmark = pytest.mark.tl4

# prompt:      0    1    2    3    4    5    6     answer span [3, 6) holds ids 7, 8, 7
SEQUENCE = torch.tensor([1, 20, 21, 7, 8, 7, 22])
SPAN = (3, 6)


def record(steps):
    """positions [step, 1 layer, 3 heads] from a list of per-step (h0, h1, h2) key positions."""
    return torch.tensor(steps)[:, None, :]


def test_copy_requires_span_and_matching_token():
    emitted = torch.tensor([7, 8, 9])
    positions = record([(3, 1, 4), (4, 4, 6), (3, 0, 5)])
    copies = scoring.copy_events(positions, emitted, SEQUENCE, SPAN)
    # head 0: step 0 copies 7 from 3; step 1 copies 8 from 4; step 2 emits 9, not at 3
    # head 1: outside the span, then copies 8 from 4, then BOS
    # head 2: 4 holds 8 != 7; 6 is outside the span; 5 holds 7 != 9
    expected = torch.tensor([[True, False, False], [True, True, False], [False, False, False]])
    assert torch.equal(copies[:, 0], expected)


def test_step_and_set_scores_differ_on_repeated_tokens():
    # The answer is 7 8 7.  Head 0 copies 7 twice and 8 once: step 3/3, set 2/2.
    # Head 1 copies the first 7 three times: step 3/3 (the reference's count), set 1/2.
    # Head 2 copies 8 once: step 1/3, set 1/2.
    emitted = torch.tensor([7, 8, 7, 7])
    positions = record([(3, 3, 0), (4, 0, 4), (5, 3, 0), (0, 3, 0)])
    copies = scoring.copy_events(positions, emitted, SEQUENCE, SPAN)
    step = scoring.step_scores(copies, SPAN)[0]
    setv = scoring.set_scores(copies, emitted, SEQUENCE, SPAN)[0]
    torch.testing.assert_close(step, torch.tensor([1.0, 1.0, 1 / 3], dtype=torch.float64))
    torch.testing.assert_close(setv, torch.tensor([1.0, 0.5, 0.5], dtype=torch.float64))
    assert scoring.activation(copies)[0].tolist() == [True, True, True]


def test_step_score_can_exceed_one():
    emitted = torch.tensor([7, 7, 7, 7])
    positions = record([(3, 0, 0)] * 4)
    copies = scoring.copy_events(positions, emitted, SEQUENCE, SPAN)
    assert scoring.step_scores(copies, SPAN)[0, 0] == pytest.approx(4 / 3)
    assert scoring.set_scores(copies, emitted, SEQUENCE, SPAN)[0, 0] == pytest.approx(0.5)


def test_rouge_known_values():
    assert scoring.rouge1_recall("purple ginger and sea salt", "Purple ginger, sea salt!") == 0.8
    # stemming: "walking" and "walks" both stem to "walk"
    assert scoring.rouge1_recall("walking in parks", "he walks in the park") == 1.0
    assert scoring.rouge1_recall("walking in parks", "he walks in the park", stem=False) == 1 / 3
    assert scoring.rouge1_recall("", "anything") == 0.0
    assert not scoring.succeeded(0.5) and scoring.succeeded(0.5001)


WORDS = ("records were once again broken smashed greenhouse gas levels surface temperatures "
         "ocean heat acidification take a walk in Chaoyang Park have cup of Espresso evening "
         "running runs ran happily happiness the and 2024 12th").split()


def test_rouge_equals_rouge_score_package():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    rng = random.Random(0)
    punct = [" ", " ", " ", ", ", ". ", "! ", "-", "'s "]
    for _ in range(300):
        ref = "".join(rng.choice(WORDS) + rng.choice(punct) for _ in range(rng.randint(1, 12)))
        gen = "".join(rng.choice(WORDS) + rng.choice(punct) for _ in range(rng.randint(0, 15)))
        if rng.random() < 0.3:
            gen = ref.upper() if rng.random() < 0.5 else ref[: len(ref) // 2]
        expected = scorer.score(ref, gen)["rouge1"].recall
        assert scoring.rouge1_recall(ref, gen) == pytest.approx(expected, abs=1e-12), (ref, gen)
        assert scoring.succeeded(scoring.rouge1_recall(ref, gen)) == (expected * 100 > 50)
