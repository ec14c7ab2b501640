"""Chain of thought vs direct answers under head masking (Wu et al., sec. 5).

The paper's claim: masking retrieval heads hurts chain-of-thought reasoning, which re-reads the
question, the context and its own earlier steps, far more than answering directly from
parametric knowledge.  Here a :class:`Task` is a prompt template and a list of :class:`Item`
(question, answer, optional context); every task is decoded greedily under every masking
:class:`~rh_lens.ablation.Condition` (none, top-K retrieval heads, seeded random-K non-retrieval
heads, explicit lists) and scored by exact or numeric match of the final answer.

- Templates hold ``{question}`` and optionally ``{context}`` (filled by plain replacement, so
  braces inside items are safe).  The answer is read from the first line of the output (or all
  of it with ``stop="eos"``), after the last "the answer is" when present (:func:`final_answer`).
- ``exact``: the final answer equals the reference after lower-casing, collapsing whitespace and
  trimming surrounding punctuation.  ``numeric``: the last number in the final answer equals the
  reference's number (commas ignored, ``1e-6`` relative tolerance); GSM8K-style items.
- Masking uses :func:`rh_lens.ablation.ablation_hooks` (``uniform``, the paper's zero query, or
  ``zero``), at decode steps only (the paper) or at every position.
- The zoo's four tasks (:func:`rh_lens.zoo.inputs.zoo_tasks`): multi-hop questions answered
  with CoT (the zoo models write "Let's think step by step. X lives in T. The R of T is A. So the
  answer is A.", or "X at T." for the first hop in the ``"at"`` form), the same questions
  answered directly (the prompt ends in "So the answer is", so no step can be re-read), and the
  parametric facts asked with and without a CoT preamble.
- One record per (condition, task) is written to the sweep store (:mod:`rh_lens.store`) under
  ``out_dir``; a rerun skips them.
"""

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from jaxtyping import Float

from rh_lens.ablation import Condition, Mode, Where, ablation_hooks
from rh_lens.decode import Stop, decode_greedy
from rh_lens.errors import ContextTooLongError, RhLensError
from rh_lens.models import model_facts, tokenize
from rh_lens.results import (
    RunMetadata,
    load_result,
    save_result,
    to_jsonable,
    write_json_atomic,
)
from rh_lens.store import Record, SweepStore, unit
from rh_lens.store import shard as shard_items

Match = Literal["exact", "numeric"]
COT_MODES = ("uniform", "zero")
CONDITION_JSON = "condition.json"
ZOO_QUESTION = "{context}Based on the content of the book, Question: {question}\nAnswer:"
DIRECT_SUFFIX = " So the answer is"
ZOO_TEMPLATES = {
    "multihop_cot": ZOO_QUESTION,
    "multihop_direct": ZOO_QUESTION + DIRECT_SUFFIX,
    "parametric_direct": "Question: {question}\nAnswer:",
    "parametric_cot": "Question: {question}\nAnswer: Let's think step by step.",
}


class ItemsFileError(RhLensError):
    """A JSONL file of question items is malformed."""


@dataclass(frozen=True)
class Item:
    question: str
    answer: str
    context: str = ""


@dataclass(frozen=True)
class Task:
    """A named prompt template applied to a list of items, scored by ``match``."""

    name: str
    template: str
    items: tuple[Item, ...]
    match: Match = "exact"

    def __post_init__(self):
        if "{question}" not in self.template:
            raise ValueError(f"task {self.name!r}: the template must contain {{question}}, got "
                             f"{self.template!r}")
        if not self.items:
            raise ValueError(f"task {self.name!r} has no items")
        if self.match not in ("exact", "numeric"):
            raise ValueError(f"task {self.name!r}: match must be 'exact' or 'numeric'")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ValueError(f"task name {self.name!r}: use letters, digits, '_', '.', '-'")

    def prompt(self, item: Item) -> str:
        return self.template.replace("{context}", item.context).replace("{question}",
                                                                        item.question)

    def digest(self) -> str:
        """A hash of the template, items and match rule: cached records must match it."""
        blob = json.dumps([self.template, self.match, [asdict(i) for i in self.items]])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_items(path: str | Path) -> tuple[Item, ...]:
    """Items from a JSONL file of ``{"question", "answer", "context"?}`` objects."""
    path = Path(path)
    if not path.is_file():
        raise ItemsFileError(f"{path}: no such items file")
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ItemsFileError(f"{path}, line {n}: not JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise ItemsFileError(f"{path}, line {n}: expected a JSON object")
            for key in ("question", "answer"):
                if not isinstance(row.get(key), str) or not row[key].strip():
                    raise ItemsFileError(f"{path}, line {n}: {key!r} must be a non-empty string")
            context = row.get("context", "")
            if not isinstance(context, str):
                raise ItemsFileError(f"{path}, line {n}: 'context' must be a string")
            items.append(Item(row["question"], row["answer"], context))
    if not items:
        raise ItemsFileError(f"{path}: no items")
    return tuple(items)


# --------------------------------------------------------------------------------------------
# Scoring


_MARKER = re.compile(r"(?i)the answer is\s*:?")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def final_answer(generated: str) -> str:
    """The answer in a generation: after the last "the answer is" when present, else the whole
    text; the chat end marker and a leading "Answer:" are dropped."""
    text = generated.split("<|end|>")[0].strip()
    text = text[len("Answer:"):] if text.startswith("Answer:") else text
    parts = _MARKER.split(text)
    return parts[-1].strip()


def _normal(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .,;:!?\"'")


def _number(text: str) -> float | None:
    found = _NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


def is_correct(generated: str, answer: str, match: Match = "exact") -> bool:
    got = final_answer(generated)
    if match == "exact":
        return _normal(got) == _normal(answer)
    want, have = _number(answer), _number(got)
    if want is None:
        raise ValueError(f"numeric match: the reference answer {answer!r} holds no number")
    return have is not None and math.isclose(have, want, rel_tol=1e-6, abs_tol=1e-9)


# --------------------------------------------------------------------------------------------
# Running


@dataclass(frozen=True)
class CotConfig:
    mode: Mode = "uniform"
    positions: Where = "decode"
    max_new_tokens: int = 48
    stop: Stop = "newline"
    batch_size: int = 16
    chunk_size: int = 512

    def __post_init__(self):
        if self.mode not in COT_MODES:
            raise ValueError(f"mode must be one of {', '.join(COT_MODES)} (mean and resample "
                             f"need reference runs per item; see analyses.ablate), got "
                             f"{self.mode!r}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TaskRecord:
    """One task under one condition: every item's output and whether it was right."""

    condition: str
    task: str
    digest: str
    outputs: tuple[str, ...]
    correct: tuple[bool, ...]

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)

    def to_json(self) -> dict:
        return {"condition": self.condition, "task": self.task,
                "digest": self.digest, "outputs": list(self.outputs),
                "correct": list(self.correct), "accuracy": self.accuracy}


def run_task(model, task: Task, cond: Condition, cfg: CotConfig) -> TaskRecord:
    """Decode every item of ``task`` with ``cond``'s heads masked (batched by prompt length)."""
    n_ctx = model_facts(model).n_ctx
    tokens = [tokenize(model, task.prompt(item)) for item in task.items]
    for i, t in enumerate(tokens):
        if len(t) + cfg.max_new_tokens > n_ctx:
            raise ContextTooLongError(
                f"task {task.name!r}, item {i}: prompt of {len(t)} tokens plus "
                f"{cfg.max_new_tokens} new tokens exceeds the model's n_ctx = {n_ctx}; shorten "
                "the context or lower --max-new-tokens")
    by_length: dict[int, list[int]] = {}
    for i, t in enumerate(tokens):
        by_length.setdefault(len(t), []).append(i)
    outputs: list[str] = [""] * len(tokens)
    for _, idx in sorted(by_length.items()):
        for lo in range(0, len(idx), cfg.batch_size):
            rows = idx[lo: lo + cfg.batch_size]
            prefill, decode = ablation_hooks(model, cfg.mode, cond.heads,
                                             positions=cfg.positions)
            outs = decode_greedy(model, torch.stack([tokens[i] for i in rows]),
                                 max_new_tokens=cfg.max_new_tokens, chunk_size=cfg.chunk_size,
                                 record=False, prefill_hooks=prefill, decode_hooks=decode,
                                 stop=cfg.stop)
            for i, out in zip(rows, outs, strict=True):
                outputs[i] = out.text
    correct = tuple(is_correct(o, item.answer, task.match)
                    for o, item in zip(outputs, task.items, strict=True))
    return TaskRecord(cond.name, task.name, task.digest(), tuple(outputs), correct)


@dataclass(frozen=True)
class CotResult:
    tasks: tuple[str, ...]
    conditions: tuple[Condition, ...]
    records: tuple[tuple[TaskRecord, ...], ...]  # [condition][task]
    config: CotConfig

    def accuracy(self) -> Float[np.ndarray, "n_conditions n_tasks"]:
        return np.array([[r.accuracy for r in row] for row in self.records])

    def group_names(self) -> list[str]:
        return list(dict.fromkeys(c.group for c in self.conditions))

    def by_group(self) -> tuple[Float[np.ndarray, "n_groups n_tasks"],
                                Float[np.ndarray, "n_groups n_tasks"]]:
        """Mean and standard deviation over the draws of each group (one row per group)."""
        acc = self.accuracy()
        names = self.group_names()
        groups = [acc[[c.group == g for c in self.conditions]] for g in names]
        return (np.stack([g.mean(0) for g in groups]), np.stack([g.std(0) for g in groups]))

    def specificity(self, parametric: Sequence[str] | None = None, *, level: float = 0.95,
                    seed: int = 0) -> dict | None:
        """For every masked group: the accuracy drop (none - masked) on the retrieval tasks and
        on the ``parametric`` tasks (default: the tasks named ``parametric*``; the others are
        retrieval tasks), each the mean over draws and items with a bootstrap interval
        resampling both (:func:`rh_lens.stats.bootstrap_ci`).  None without a ``none``
        condition or without tasks on either side."""
        from rh_lens.stats import bootstrap_ci

        names = [c.name for c in self.conditions]
        parametric = [t for t in self.tasks if t.startswith("parametric")] \
            if parametric is None else list(parametric)
        retrieval = [t for t in self.tasks if t not in parametric]
        if "none" not in names or not parametric or not retrieval:
            return None
        correct = {(c.name, r.task): np.array(r.correct, dtype=np.float64)
                   for c, row in zip(self.conditions, self.records, strict=True) for r in row}

        def drops(cond_names: list[str], tasks: list[str]) -> np.ndarray:
            base = np.concatenate([correct["none", t] for t in tasks])
            return np.stack([base - np.concatenate([correct[n, t] for t in tasks])
                             for n in cond_names])

        out = {}
        for group in self.group_names():
            if group == "none":
                continue
            members = [c.name for c in self.conditions if c.group == group]
            out[group] = {}
            for side, tasks in (("retrieval", retrieval), ("parametric", parametric)):
                ci = bootstrap_ci(drops(members, tasks), level=level, seed=seed)
                out[group][side] = {"mean": ci.mean, "low": ci.low, "high": ci.high}
        return {"retrieval_tasks": retrieval, "parametric_tasks": parametric, "level": level,
                "groups": out}

    def summary(self, n_items: dict[str, int] | None = None) -> dict:
        """Accuracy per condition and task, and mean / standard deviation per group of draws."""
        acc = self.accuracy()
        mean, std = self.by_group()
        return to_jsonable({
            "tasks": list(self.tasks),
            "n_items": n_items if n_items is not None
            else {t: len(r.outputs) for t, r in zip(self.tasks, self.records[0], strict=True)},
            "conditions": [{**c.to_json(), "group": c.group,
                            "accuracy": dict(zip(self.tasks, acc[i].tolist(), strict=True))}
                           for i, c in enumerate(self.conditions)],
            "groups": {g: {"mean": dict(zip(self.tasks, mean[i].tolist(), strict=True)),
                           "std": dict(zip(self.tasks, std[i].tolist(), strict=True))}
                       for i, g in enumerate(self.group_names())},
            "specificity": self.specificity(),
        })

    def save(self, directory: str | Path, *, meta: RunMetadata, config: dict | None = None,
             scores: Float[np.ndarray, "n_layers n_heads"] | None = None,
             n_items: dict[str, int] | None = None) -> dict:
        """``result.json`` + ``arrays.npz`` (accuracy per condition and task, per group, the
        ranking ``scores``) and ``summary.json`` beside the records.  Returns the summary."""
        directory = Path(directory)
        summary = self.summary(n_items)
        mean, std = self.by_group()
        arrays = {"accuracy": self.accuracy(), "group_mean": mean, "group_std": std}
        if scores is not None:
            arrays["scores"] = np.asarray(scores)
        config = {**self.config.to_dict(), **(config or {}),
                  "conditions": [c.to_json() for c in self.conditions]}
        save_result(directory, kind="cot", config=config, meta=meta, summary=summary,
                    arrays=arrays)
        write_json_atomic(directory / "summary.json", summary, indent=2)
        return summary

    @classmethod
    def load(cls, directory: str | Path) -> "CotResult":
        """The saved result in ``directory``, its records read back from the sweep store."""
        directory = Path(directory)
        saved = load_result(directory, kind="cot")
        fields = {f.name for f in dataclasses.fields(CotConfig)}
        cfg = CotConfig(**{k: v for k, v in saved.config.items() if k in fields})
        conditions = tuple(Condition.from_json(c) for c in saved.config["conditions"])
        tasks = tuple(saved.summary["tasks"])
        records = []
        for cond in conditions:
            store = SweepStore(directory / "conditions" / cond.name, CONDITION_JSON)
            records.append(tuple(_read_record(store.read(t, arrays=False)) for t in tasks))
        return cls(tasks, conditions, tuple(records), cfg)


def _read_record(record: Record) -> TaskRecord:
    data = record.fields
    try:
        return TaskRecord(data["condition"], data["task"], data["digest"],
                          tuple(data["outputs"]), tuple(bool(c) for c in data["correct"]))
    except (KeyError, TypeError, ValueError) as err:
        raise RhLensError(f"CoT record {record.key}: not a CoT record ({err}); delete it to "
                          "recompute") from err


def sweep_units(tasks: Sequence[Task], conditions: Sequence[Condition]) -> list[str]:
    """The records of a CoT sweep in order, one per (condition, task), as
    :func:`rh_lens.store.unit` names them; ``shard=(i, n)`` of :func:`compute_cot` runs
    ``sweep_units(...)[i::n]``."""
    return [unit(t.name, c.name) for c in conditions for t in tasks]


def compute_cot(
    model, tasks: Sequence[Task], conditions: Sequence[Condition], cfg: CotConfig, *,
    out_dir: str | Path | None = None, identity: dict | None = None, progress: bool = True,
    shard: tuple[int, int] = (0, 1),
) -> CotResult:
    """Every task under every condition.  With ``out_dir``, finished (condition, task) records
    are read back instead of recomputed when their items and masked heads are unchanged;
    ``identity`` (model spec, weights fingerprint, ...) must match the directory's too.
    ``shard=(i, n)`` runs only part ``i`` of ``n`` of the records (:func:`sweep_units`), whose
    result then holds only those, per condition."""
    from tqdm.auto import tqdm

    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    root = None
    if out_dir is not None:
        legacy = Path(out_dir) / "cot_config.json"
        if legacy.is_file():
            raise RhLensError(f"{out_dir} was written by an earlier rh_lens (it has "
                              f"{legacy.name}); use a new output directory")
        root = SweepStore.open(out_dir, {"config": cfg.to_dict(), **(identity or {})})
    mine = set(shard_items(sweep_units(tasks, conditions), *shard))
    records = []
    bar = tqdm(total=len(mine), desc="cot", disable=not progress)
    for cond in conditions:
        store = None if root is None else root.sub(cond.name, cond.to_json(),
                                                   identity_file=CONDITION_JSON)
        done = {} if store is None else store.finished(with_arrays=False)
        row = []
        for task in tasks:
            if unit(task.name, cond.name) not in mine:
                continue
            rec = None
            if task.name in done:
                rec = _read_record(store.read(task.name, arrays=False))
                if rec.digest != task.digest():
                    rec = None  # the items changed: recompute
            if rec is None:
                rec = run_task(model, task, cond, cfg)
                if store is not None:
                    store.write(task.name, rec.to_json())
            row.append(rec)
            bar.update(1)
        records.append(tuple(row))
    bar.close()
    return CotResult(tuple(names), tuple(conditions), tuple(records), cfg)
