"""Needle-in-a-Haystack trials: haystack + needle + question -> prompt tokens, answer span located.

A trial cuts a haystack to a target length in tokens (keeping ``buffer`` tokens free for the
question and answer, 200 in the reference), inserts the needle sentence at a depth (0-100 %)
moved back to the nearest preceding sentence end, and appends the question in the paper's prompt.
The answer span is located in the *prompt's* tokens through character offsets, so tokenizer
merges at the boundary of the inserted text (``The`` vs `` The``) cannot break it.

What the trials of a sweep share, a needle's token count and a haystack cut to a number of
tokens, is memoized per tokenizer (:data:`TRIAL_MEMO`; a haystack only when it is a frozen
dataclass, such as :class:`TextHaystack`): the same inputs give the same cut, so the trials are
those built without the memo.  Each trial's prompt is tokenized afresh.
"""

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from jaxtyping import Int
from torch import Tensor

from rh_lens._memo import TokenizerMemo, value_key
from rh_lens.errors import ContextTooLongError, RhLensError
from rh_lens.models import check_context, tokenize_with_offsets

BASE_TEMPLATE = "{context}Based on the content of the book, Question: {question}\nAnswer:"
CHAT_USER_TEMPLATE = (
    "<book>{context}</book>\nBased on the content of the book, Question: {question}"
)
TRIAL_MEMO = TokenizerMemo()  # shared by rh_lens.protocols


def clear_trial_memo() -> None:
    """Forget every memoized needle length and haystack cut (they are rebuilt on demand)."""
    TRIAL_MEMO.clear()


class NeedleError(RhLensError):
    """A needle, its answer or its haystack cannot make a valid trial."""


@dataclass(frozen=True)
class Needle:
    """A fact to hide (``needle``), the question that asks for it, and the answer span, which
    must occur inside ``needle`` (the reference's ``real_needle``)."""

    needle: str
    question: str
    answer: str

    def __post_init__(self):
        for name in ("needle", "question", "answer"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise NeedleError(f"needle field {name!r} must be a non-empty string: {value!r}")
        self.answer_start  # noqa: B018 (validates)

    @property
    def answer_start(self) -> int:
        """Character position of the answer in the needle; matched ignoring case when not
        verbatim (the reference's third needle capitalises its answer: "Because he is ...")."""
        at = self.needle.find(self.answer)
        if at < 0:
            match = re.search(re.escape(self.answer), self.needle, flags=re.IGNORECASE)
            if match is None:
                raise NeedleError(
                    f"answer {self.answer!r} does not occur in needle {self.needle!r}"
                )
            at = match.start()
        return at


@runtime_checkable
class Haystack(Protocol):
    """Anything that yields at least ``n_chars`` characters of filler text."""

    name: str

    def text(self, n_chars: int) -> str: ...


@dataclass(frozen=True)
class TextHaystack:
    """A fixed text, repeated (joined by a space) when a longer haystack is asked for."""

    source: str
    name: str = "text"

    def __post_init__(self):
        if not self.source.strip():
            raise NeedleError(f"haystack {self.name!r} is empty")

    def text(self, n_chars: int) -> str:
        repeats = max(1, -(-n_chars // len(self.source)))
        return " ".join([self.source] * repeats)


def haystack_from_folder(folder: str | os.PathLike) -> TextHaystack:
    """All ``*.txt`` files of ``folder``, sorted by name, as one raw text (as the reference)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NeedleError(f"haystack folder {folder} does not exist")
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise NeedleError(f"haystack folder {folder} holds no .txt files")
    text = "".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    if not text.strip():
        raise NeedleError(f"haystack folder {folder} holds only empty text")
    return TextHaystack(text, name=folder.name)


def read_needles(path: str | os.PathLike) -> list[Needle]:
    """Needles from a JSONL file with fields ``needle``, ``question``, ``real_needle``."""
    path = Path(path)
    if not path.is_file():
        raise NeedleError(f"needles file {path} does not exist")
    needles = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise NeedleError(f"{path}, line {number}: not valid JSON ({err.msg})") from None
        fields = ("needle", "question", "real_needle")
        missing = [k for k in fields if not isinstance(row, dict) or k not in row]
        if missing:
            raise NeedleError(f"{path}, line {number}: missing field(s) {', '.join(missing)}")
        try:
            needles.append(Needle(row["needle"], row["question"], row["real_needle"]))
        except NeedleError as err:
            raise NeedleError(f"{path}, line {number}: {err}") from None
    if not needles:
        raise NeedleError(f"needles file {path} holds no needles")
    return needles


def reference_inputs(root: str | os.PathLike) -> tuple[list[Needle], list[TextHaystack]]:
    """The reference's layout: ``root/needles.jsonl`` plus one haystack folder per needle
    (subfolders in name order, e.g. ``part1``, ``part2``, ``part3``)."""
    root = Path(root)
    needles = read_needles(root / "needles.jsonl")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if len(folders) != len(needles):
        raise NeedleError(
            f"{root}: {len(needles)} needles but {len(folders)} haystack folders; the reference "
            "layout has one folder per needle"
        )
    return needles, [haystack_from_folder(f) for f in folders]


@dataclass(frozen=True)
class Trial:
    """One prompt, ready to decode.  ``answer_span`` is ``[start, end)`` in ``tokens``."""

    context_length: int
    depth: float
    tokens: Int[Tensor, " pos"]
    answer_span: tuple[int, int]
    needle_char: int
    prompt: str
    needle: Needle

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])


def build_trial(
    model,
    needle: Needle,
    haystack: Haystack,
    *,
    context_length: int,
    depth: float | int,
    buffer: int = 200,
    max_new_tokens: int = 50,
    chat: bool = False,
    sentence_ends: str = ".",
) -> Trial:
    """Build the prompt for one (needle, context length, depth) cell and locate the answer.

    ``context_length`` counts tokens of the whole prompt; the haystack plus needle fill
    ``context_length - buffer`` of them.  ``depth`` is a percentage; 100 puts the needle last.
    """
    if not 0 <= depth <= 100:
        raise ValueError(f"depth must be a percentage in [0, 100], got {depth}")
    if buffer < 0 or context_length <= buffer:
        raise ValueError(f"context_length ({context_length}) must exceed buffer ({buffer})")
    check_context(model, context_length, what=f"context length {context_length}")
    n_needle = _needle_length(model, needle.needle)
    n_hay = context_length - buffer - n_needle
    if n_hay < 0:
        raise NeedleError(
            f"needle takes {n_needle} tokens, more than context_length - buffer = "
            f"{context_length - buffer}"
        )
    hay = _cut_haystack(model, haystack, n_hay)
    at = _insertion_point(hay, float(depth), sentence_ends)
    before, after = hay[:at], hay[at:]
    inserted = (" " if before else "") + needle.needle + ("" if before or not after else " ")
    context = before + inserted + after
    needle_in_context = len(before) + (1 if before else 0)
    prompt, context_at = _render(model, context, needle.question, chat=chat)
    needle_char = context_at + needle_in_context
    answer_char = needle_char + needle.answer_start
    tokens, offsets = tokenize_with_offsets(model, prompt)
    span = _token_span(offsets, answer_char, answer_char + len(needle.answer))
    if span is None:
        raise NeedleError(f"answer {needle.answer!r} not found in the prompt after tokenization")
    decoded = model.to_string(tokens[span[0] : span[1]])
    if needle.answer.strip().lower() not in decoded.lower():
        raise NeedleError(
            f"answer {needle.answer!r} not found after tokenization: its tokens decode to "
            f"{decoded!r}"
        )
    total = len(tokens) + max_new_tokens
    if total > model.cfg.n_ctx:
        raise ContextTooLongError(
            f"prompt of {len(tokens)} tokens plus {max_new_tokens} new tokens exceeds n_ctx="
            f"{model.cfg.n_ctx}; lower context_length or raise buffer"
        )
    return Trial(context_length, float(depth), tokens, span, needle_char, prompt, needle)


def _needle_length(model, needle: str) -> int:
    """Tokens of ``" " + needle`` without BOS (memoized per tokenizer)."""
    return TRIAL_MEMO.get(
        model.tokenizer, ("needle", needle),
        lambda: len(tokenize_with_offsets(model, " " + needle, prepend_bos=False)[0]))


def _cut_haystack(model, haystack: Haystack, n_tokens: int) -> str:
    """The first ``n_tokens`` tokens of the haystack, as text (memoized per tokenizer when the
    haystack is a frozen dataclass)."""
    if n_tokens == 0:
        return ""
    if not value_key(haystack):
        return _cut_haystack_now(model, haystack, n_tokens)
    return TRIAL_MEMO.get(model.tokenizer, ("cut", haystack, n_tokens),
                          lambda: _cut_haystack_now(model, haystack, n_tokens))


def _cut_haystack_now(model, haystack: Haystack, n_tokens: int) -> str:
    n_chars = 4 * n_tokens + 64
    for _ in range(8):
        text = haystack.text(n_chars)
        if not text.strip():
            raise NeedleError(f"haystack {haystack.name!r} is empty")
        _, offsets = tokenize_with_offsets(model, text, prepend_bos=False)
        if len(offsets) > n_tokens:
            return text[: offsets[n_tokens][0]]
        if len(offsets) == n_tokens:
            return text
        n_chars *= 2
    raise NeedleError(f"haystack {haystack.name!r} gives fewer than {n_tokens} tokens")


def _insertion_point(hay: str, depth: float, sentence_ends: str) -> int:
    """Character position ``depth`` % into ``hay``, moved back to just after a sentence end."""
    if depth >= 100:
        return len(hay)
    target = int(len(hay) * depth / 100)
    best = max((hay.rfind(c, 0, target) for c in sentence_ends), default=-1)
    return best + 1 if best >= 0 else 0


def _render(model, context: str, question: str, *, chat: bool) -> tuple[str, int]:
    """The prompt text and the character position of ``context`` inside it."""
    if not chat:
        return BASE_TEMPLATE.format(context=context, question=question), 0
    tok = model.tokenizer
    if not getattr(tok, "chat_template", None):
        raise NeedleError(f"model {model.cfg.model_name!r} has no chat template; use chat=False")
    user = CHAT_USER_TEMPLATE.format(context=context, question=question)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    at = prompt.find(context)
    if at < 0:
        raise NeedleError("the chat template altered the context text; cannot locate the needle")
    if tok.bos_token and prompt.startswith(tok.bos_token) and model.cfg.default_prepend_bos:
        prompt, at = prompt[len(tok.bos_token):], at - len(tok.bos_token)
    return prompt, at


def chat_overhead(model) -> int:
    """Tokens the model's chat template adds around the base prompt (0 without chat): a
    default buffer for chat prompts must hold them too."""
    from rh_lens.models import tokenize

    base = tokenize(model, _render(model, "", "", chat=False)[0])
    return max(0, len(tokenize(model, _render(model, "", "", chat=True)[0])) - len(base))


def _token_span(offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, int] | None:
    hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    return (hits[0], hits[-1] + 1) if hits else None
