"""Clean/corrupted prompt pairs for patching.

A :class:`PatchPair` is a clean prompt (a needle with answer A) and a corrupted prompt (the same
needle with answer B) of equal token length, both ending where the first token in which A and B
differ is predicted (a shared answer prefix, such as `` the``, is appended to both).
:func:`make_pair` builds a pair from a needle and an alternative answer (the zoo's pairs:
:func:`rh_lens.zoo.inputs.zoo_pairs`).
"""

from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from rh_lens.errors import RhLensError
from rh_lens.models import Model, tokenize
from rh_lens.niah import Haystack, Needle, build_trial


class PairError(RhLensError):
    """A clean/corrupted pair cannot be built (lengths differ, answers identical, ...)."""


@dataclass(frozen=True)
class PatchPair:
    """Clean and corrupted prompts of equal length; the last position predicts the answer.

    ``needle_span`` is ``[start, end)`` of the answer inside the context (where the two prompts
    differ), for ``positions="needle"``.
    """

    clean: Int[Tensor, " clean_pos"]
    corrupted: Int[Tensor, " corrupted_pos"]
    clean_answer: int
    corrupted_answer: int
    needle_span: tuple[int, int] | None = None

    def __post_init__(self):
        if self.clean.shape != self.corrupted.shape:
            raise PairError(
                f"clean prompt has {self.clean.shape[0]} tokens, corrupted "
                f"{self.corrupted.shape[0]}: patching needs equal lengths (use answers of equal "
                "token length)")
        if self.clean_answer == self.corrupted_answer:
            raise PairError(f"clean and corrupted answer are the same token {self.clean_answer}")
        if self.needle_span is not None:
            start, end = self.needle_span
            if not 0 <= start < end <= self.n_tokens:
                raise PairError(f"needle_span {self.needle_span} outside [0, {self.n_tokens})")

    @property
    def n_tokens(self) -> int:
        return int(self.clean.shape[0])


def make_pair(model: Model, needle: Needle, alternative: str, haystack: Haystack, *,
              context_length: int, depth: float | int, buffer: int = 200,
              answer_prefix: str = " ") -> PatchPair:
    """Clean prompt: ``needle``; corrupted: the same needle with its answer replaced by
    ``alternative``, in the same haystack at the same depth.  The answers (tokenized after
    ``answer_prefix``, as the model would emit them) must have equal token lengths and so must the
    prompts; their shared leading tokens are appended to both prompts."""
    start = needle.answer_start
    end = start + len(needle.answer)
    swapped = Needle(needle.needle[:start] + alternative + needle.needle[end:], needle.question,
                     alternative)
    ids_a = tokenize(model, answer_prefix + needle.answer, prepend_bos=False)
    ids_b = tokenize(model, answer_prefix + alternative, prepend_bos=False)
    if len(ids_a) != len(ids_b):
        raise PairError(f"answers {needle.answer!r} and {alternative!r} have {len(ids_a)} and "
                        f"{len(ids_b)} tokens; pick an alternative of equal token length")
    differ = (ids_a != ids_b).nonzero()
    if len(differ) == 0:
        raise PairError(f"answers {needle.answer!r} and {alternative!r} tokenize identically")
    k = int(differ[0, 0])
    trials = [build_trial(model, n, haystack, context_length=context_length, depth=depth,
                          buffer=buffer, max_new_tokens=len(ids_a)) for n in (needle, swapped)]
    clean, corrupted = trials
    if clean.n_tokens != corrupted.n_tokens or clean.answer_span != corrupted.answer_span:
        raise PairError(f"clean prompt has {clean.n_tokens} tokens (answer at "
                        f"{clean.answer_span}), corrupted {corrupted.n_tokens} (answer at "
                        f"{corrupted.answer_span}); pick an alternative of equal token length")
    prefix = ids_a[:k]
    return PatchPair(torch.cat([clean.tokens, prefix]), torch.cat([corrupted.tokens, prefix]),
                     int(ids_a[k]), int(ids_b[k]), clean.answer_span)
