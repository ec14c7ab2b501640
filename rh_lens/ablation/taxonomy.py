"""What a model answered under masking, and where the watched heads looked.

Error analysis (:func:`classify_output`, ``ERROR_TYPES``), on ROUGE-1 recall of the answer and the
words of the output: ``correct`` (every answer word recalled), ``incomplete`` (some),
``wrong_extraction`` (none, and every word of the output occurs in the prompt: content copied
from elsewhere), ``hallucinated`` (none, and some word occurs nowhere in the prompt: content not
in the context), ``empty`` (no word at all).  A trial counts as a success as in
detection (recall > 0.5), so a success can be ``incomplete``.  Where the watched heads (the top
retrieval heads) attend is read from the top-1 key positions that decoding records, in
``PLACES``: ``sink`` (position 0), ``answer`` (the answer span), ``needle`` (the rest of the
needle sentence), ``question`` (the prompt after the context), ``generated`` (the model's own
output), ``elsewhere`` (the haystack).
"""

from dataclasses import dataclass

import numpy as np
from jaxtyping import Int

from rh_lens import scoring
from rh_lens.errors import RhLensError
from rh_lens.models import tokenize_with_offsets
from rh_lens.niah import BASE_TEMPLATE, Trial

ERROR_TYPES = ("correct", "incomplete", "wrong_extraction", "hallucinated", "empty")
PLACES = ("sink", "answer", "needle", "question", "generated", "elsewhere")


def classify_output(answer: str, generated: str, prompt: str) -> str:
    """One of ``ERROR_TYPES`` (see the module docstring)."""
    recall = scoring.rouge1_recall(answer, generated)
    if recall >= 1.0:
        return "correct"
    if recall > 0:
        return "incomplete"
    words = set(scoring.rouge_tokens(generated, stem=False))
    if not words:
        return "empty"
    known = set(scoring.rouge_tokens(prompt, stem=False))
    return "wrong_extraction" if words <= known else "hallucinated"


@dataclass(frozen=True)
class Regions:
    """Token ranges ``[start, end)`` of a prompt, for reading where a head attends."""

    n_prompt: int
    answer: tuple[int, int]
    needle: tuple[int, int]
    question_start: int


def prompt_regions(model, trial: Trial, *, chat: bool = False) -> Regions:
    """Where the answer, the needle sentence and the question sit in ``trial``'s tokens."""
    _, offsets = tokenize_with_offsets(model, trial.prompt)
    if len(offsets) != trial.n_tokens:
        raise RhLensError(f"the prompt retokenizes to {len(offsets)} tokens, not {trial.n_tokens}")
    end = trial.needle_char + len(trial.needle.needle)
    needle = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > trial.needle_char]
    if chat:
        tail = trial.prompt.rfind("</book>")
    else:
        tail = len(trial.prompt) - len(BASE_TEMPLATE.format(context="",
                                                            question=trial.needle.question))
    if tail < 0:
        tail = trial.prompt.rfind(trial.needle.question)
    question = [i for i, (a, b) in enumerate(offsets) if b > a and a >= tail]
    return Regions(len(offsets), trial.answer_span, (needle[0], needle[-1] + 1),
                   question[0] if question else len(offsets))


def attention_places(positions: Int[np.ndarray, "step n_watch"],
                     regions: Regions) -> Int[np.ndarray, "n_watch n_places"]:
    """Per watched head, how many decode steps its top-1 key fell in each of ``PLACES``."""
    pos = np.asarray(positions)
    inside = lambda span: (pos >= span[0]) & (pos < span[1])  # noqa: E731
    sink = pos == 0
    answer = inside(regions.answer) & ~sink
    needle = inside(regions.needle) & ~answer & ~sink
    question = (pos >= regions.question_start) & (pos < regions.n_prompt) & ~needle & ~answer
    generated = pos >= regions.n_prompt
    elsewhere = ~(sink | answer | needle | question | generated)
    places = np.stack([sink, answer, needle, question, generated, elsewhere], axis=-1)
    return places.sum(axis=0).astype(np.int64).reshape(pos.shape[1], len(PLACES))


