"""Head-level ablation: Needle-in-a-Haystack with chosen heads masked (Wu et al., sec. 3, Fig. 7).

What a masked head outputs (``mode``):

- ``uniform`` (the paper's masking): its query is zeroed, so it attends uniformly over every visible
  key and outputs the mean of their values; its key/value-group siblings are untouched.
- ``zero``: its output ``hook_z`` is 0.
- ``mean``: its output is its mean ``hook_z`` over a reference set of prompts and all their
  positions (:func:`compute_mean_z`; by default plain haystack text, no needle, no question).
- ``resample``: its output comes from a clean (unablated) run on a *donor* prompt: the same cell
  (context length, depth) built with the next needle of the sweep (needle ``(n + 1) % N``) and that
  needle's haystack.  Prompts are aligned at their ends: trial position ``p`` reads donor position
  ``p + M - N`` (``N``, ``M`` the trial's and the donor's prompt lengths), so the trial's decode
  step ``t`` reads the donor's decode step ``t``, in which the donor produces token ``t`` of its
  own clean greedy answer.  Once the donor has stopped (newline or cap), every later step reads
  the donor's last step; a trial position before the donor's first one reads the donor's first.

Where (``positions``): ``decode`` (the paper) masks only the forwards that predict a new token
(the last prompt token's and each generated token's; see :func:`rh_lens.decode.decode_greedy`),
so the prefilled keys/values are the clean run's; ``all`` masks the prefill too.

Head sets (``Condition``): none; top-K by a detection result's mean scores (ties layer-major);
random-K drawn with ``numpy.random.default_rng(seed)`` from the heads that are neither retrieval
heads (score > ``threshold``) nor excluded, sizes from ``model.cfg``, ``n_draws`` draws, draw ``d``
being the first K of the ``d``-th permutation so that draws are nested in K and one draw serves
every cell of a sweep; explicit lists (``"L.H,L.H"``) and whole key/value groups (``"L.G"``).  The
reference implementation's defects are not repeated: its random set did not exclude retrieval
heads, assumed 32 x 32 heads, and was unseeded and redrawn for every cell.

Error analysis (:func:`classify_output`, ``ERROR_TYPES``), on ROUGE-1 recall of the answer and the
words of the output: ``correct`` (every answer word recalled), ``incomplete`` (some),
``wrong_extraction`` (none, and every word of the output occurs in the prompt: content copied
from elsewhere), ``hallucinated`` (none, and some word occurs nowhere in the prompt: content not
in the context), ``empty`` (no word at all).  A trial counts as a success as in
detection (recall > 0.5), so a success can be ``incomplete``.  Where the watched heads (the top
retrieval heads) attend is read from the top-1 key positions that decoding records, in
``PLACES``: ``sink`` (position 0), ``answer`` (the answer span), ``needle`` (the rest of the
needle sentence), ``question`` (the prompt after the context), ``generated`` (the model's own
output), ``elsewhere`` (the haystack).  Under ``uniform`` a masked head's attention is set by the
mask, so masked heads are left out of these shares; the other modes leave attention untouched.
"""

import dataclasses
import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from plotly.subplots import make_subplots
from torch import Tensor

from rh_lens import hooks, scoring
from rh_lens.decode import decode_greedy
from rh_lens.detect import (
    Cell,
    DetectConfig,
    cells,
    check_sweep_config,
    finished_cells,
    score_trial,
)
from rh_lens.errors import RhLensError
from rh_lens.hooks import Head, HookList, heads_by_layer, validate_heads
from rh_lens.models import ModelFacts, model_facts, tokenize, tokenize_with_offsets
from rh_lens.niah import BASE_TEMPLATE, Haystack, Needle, Trial, build_trial
from rh_lens.plotting import NIAH_SCALE
from rh_lens.properties import THRESHOLD, ranked_heads
from rh_lens.results import read_json, write_json_atomic, write_npz_atomic

Mode = Literal["uniform", "zero", "mean", "resample"]
Where = Literal["decode", "all"]
Kind = Literal["none", "top", "random", "heads", "groups"]
MODES: tuple[str, ...] = get_args(Mode)
WHERE: tuple[str, ...] = get_args(Where)
ERROR_TYPES = ("correct", "incomplete", "wrong_extraction", "hallucinated", "empty")
PLACES = ("sink", "answer", "needle", "question", "generated", "elsewhere")
RECORD_FORMAT = 1


# --------------------------------------------------------------------------------------------
# Head sets


def _shape(model) -> tuple[int, int, int]:
    """``(n_layers, n_heads, n_kv_heads)`` of a model (read from ``model.cfg``) or ModelFacts."""
    facts = model if isinstance(model, ModelFacts) else model_facts(model)
    return facts.n_layers, facts.n_heads, facts.n_kv_heads


def _scores(model, scores) -> np.ndarray:
    n_layers, n_heads, _ = _shape(model)
    table = np.asarray(scores, dtype=np.float64)
    if table.shape != (n_layers, n_heads):
        raise ValueError(f"scores have shape {table.shape} but the model has {n_layers} layers x "
                         f"{n_heads} heads: are they another model's?")
    if not np.isfinite(table).all():
        raise ValueError("scores hold NaN or inf (did no detection trial succeed?)")
    return table


def parse_heads(text: str) -> tuple[Head, ...]:
    """``"L.H,L.H"`` (also for key/value groups ``"L.G"``) -> ``((L, H), ...)``, unvalidated."""
    out = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", item)
        if match is None:
            raise ValueError(f"bad head {item!r} in {text!r}: write LAYER.HEAD, e.g. 3.5")
        out.append((int(match[1]), int(match[2])))
    return tuple(out)


def top_heads(model, scores: Float[np.ndarray, "n_layers n_heads"], k: int) -> tuple[Head, ...]:
    """The ``k`` heads with the highest scores (ties in layer-major order)."""
    table = _scores(model, scores)
    if not 1 <= k <= table.size:
        raise ValueError(f"top-{k}: K must be in [1, {table.size}] (the model's head count)")
    return tuple((layer, head) for layer, head, _ in ranked_heads(table)[:k])


def random_head_draws(
    model, k: int, *, scores: Float[np.ndarray, "n_layers n_heads"] | None = None,
    threshold: float = THRESHOLD, exclude: Sequence[Head] = (), seed: int = 0, n_draws: int = 1,
) -> tuple[tuple[Head, ...], ...]:
    """``n_draws`` random sets of ``k`` heads, none a retrieval head or in ``exclude``.

    Draw ``d`` is the first ``k`` heads of the ``d``-th permutation of the eligible heads drawn
    from ``numpy.random.default_rng(seed)``: the same seed gives the same draws, and for a
    larger ``k`` each draw contains the smaller one's heads.
    """
    n_layers, n_heads, _ = _shape(model)
    if k < 1 or n_draws < 1:
        raise ValueError(f"random-{k} with {n_draws} draws: K and the draw count must be >= 1")
    excluded = set(validate_heads(exclude, n_layers, n_heads))
    if scores is not None:
        table = _scores(model, scores)
        excluded |= {(int(lay), int(h)) for lay, h in np.argwhere(table > threshold)}
    pool = [(lay, h) for lay in range(n_layers) for h in range(n_heads) if (lay, h) not in excluded]
    if k > len(pool):
        raise ValueError(
            f"random-{k} needs {k} heads but only {len(pool)} of the model's {n_layers * n_heads} "
            f"heads are neither retrieval heads (score > {threshold}) nor excluded"
        )
    rng = np.random.default_rng(seed)
    return tuple(tuple(sorted(pool[i] for i in rng.permutation(len(pool))[:k]))
                 for _ in range(n_draws))


def kv_group_heads(model, groups: Sequence[Head]) -> tuple[Head, ...]:
    """Every query head of the key/value groups ``(layer, group)``: head ``h`` is in group
    ``h // (n_heads // n_kv_heads)``."""
    n_layers, n_heads, n_kv = _shape(model)
    size = n_heads // n_kv
    return tuple((lay, g * size + i) for lay, g in validate_heads(groups, n_layers, n_kv)
                 for i in range(size))


@dataclass(frozen=True)
class Condition:
    """One set of masked heads, named for files and tables (``top-5``, ``random-5-d0``, ...)."""

    kind: Kind
    name: str
    heads: tuple[Head, ...] = ()
    k: int | None = None
    draw: int | None = None

    @property
    def group(self) -> str:
        """The display group: the draws of one random-K share ``random-K``."""
        return f"random-{self.k}" if self.kind == "random" else self.name

    def to_json(self) -> dict:
        return {"kind": self.kind, "name": self.name, "heads": [list(h) for h in self.heads],
                "k": self.k, "draw": self.draw}

    @classmethod
    def from_json(cls, data: dict) -> "Condition":
        return cls(data["kind"], data["name"], tuple((int(a), int(b)) for a, b in data["heads"]),
                   data["k"], data["draw"])


def _list_name(prefix: str, items: Sequence[Head], letter: str) -> str:
    name = f"{prefix}-" + "_".join(f"L{a}{letter}{b}" for a, b in items)
    if len(name) > 60:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{prefix}-{len(items)}-{digest}"
    return name


def conditions_from_masks(
    model, masks: Sequence[str], *, scores: Float[np.ndarray, "n_layers n_heads"] | None = None,
    threshold: float = THRESHOLD, exclude: Sequence[Head] = (), seed: int = 0, n_draws: int = 1,
) -> tuple[Condition, ...]:
    """``none`` followed by one condition per mask (``n_draws`` for ``random:K``), duplicates
    dropped.  Masks: ``top:K``, ``random:K``, ``heads:L.H,...``, ``groups:L.G,...``."""
    n_layers, n_heads, _ = _shape(model)
    out = [Condition("none", "none")]
    for mask in masks:
        kind, _, arg = mask.partition(":")
        if kind in ("top", "random"):
            if not arg.strip().isdigit():
                raise ValueError(f"mask {mask!r}: write {kind}:K with K a positive integer")
            if scores is None:
                raise ValueError(f"mask {mask!r} needs retrieval scores")
            k = int(arg)
            if kind == "top":
                out.append(Condition("top", f"top-{k}", top_heads(model, scores, k), k=k))
            else:
                draws = random_head_draws(model, k, scores=scores, threshold=threshold,
                                          exclude=exclude, seed=seed, n_draws=n_draws)
                out += [Condition("random", f"random-{k}-d{d}", h, k=k, draw=d)
                        for d, h in enumerate(draws)]
        elif kind == "heads":
            heads = tuple(sorted(validate_heads(parse_heads(arg), n_layers, n_heads)))
            out.append(Condition("heads", _list_name("heads", heads, "H"), heads))
        elif kind == "groups":
            groups = parse_heads(arg)
            out.append(Condition("groups", _list_name("groups", groups, "G"),
                                 kv_group_heads(model, groups)))
        else:
            raise ValueError(f"unknown mask {mask!r}: use top:K, random:K, heads:L.H,... or "
                             "groups:L.G,...")
    unique: dict[str, Condition] = {}
    for cond in out:
        unique.setdefault(cond.name, cond)
    return tuple(unique.values())


# --------------------------------------------------------------------------------------------
# Hooks for one mode


@dataclass(frozen=True)
class Donor:
    """Clean ``hook_z`` of the masked heads on a donor prompt, for ``resample``.

    ``z[layer]`` holds the layer's masked heads in :func:`rh_lens.hooks.heads_by_layer` order;
    row ``i`` is the donor's absolute position ``start + i`` (``start`` is 0 when the prefill
    was recorded, else ``n_prompt - 1``, the first decode step).
    """

    heads: tuple[Head, ...]
    n_prompt: int
    start: int
    z: dict[int, Float[Tensor, "pos _k d_head"]]
    text: str


def _donor_rows(first: int, n: int, shift: int, start: int, n_rows: int) -> Tensor:
    """Donor rows for trial positions ``first .. first + n - 1`` (aligned at the prompts' ends)."""
    return (torch.arange(first, first + n) + shift - start).clamp(0, n_rows - 1)


def _resample_hooks(heads: tuple[Head, ...], donor: Donor, *, n_prompt: int,
                    start: int) -> HookList:
    if set(donor.heads) != set(heads):
        raise ValueError(f"the donor holds heads {donor.heads}, not the masked {heads}")
    out = []
    for layer, hs in heads_by_layer(heads).items():
        src, index, seen = donor.z[layer], torch.tensor(hs), {"pos": start}

        def hook(act: Float[Tensor, "batch pos head_index d_head"], hook, src=src, index=index,
                 seen=seen) -> Tensor:
            rows = _donor_rows(seen["pos"], act.shape[1], donor.n_prompt - n_prompt,
                               donor.start, src.shape[0])
            seen["pos"] += act.shape[1]
            patched = act.clone()
            value = src[rows.to(src.device)].to(act.device, act.dtype)
            patched[:, :, index.to(act.device)] = value.expand(act.shape[0], -1, -1, -1)
            return patched

        out.append((hooks.z(layer), hook))
    return out


def ablation_hooks(
    model, mode: Mode, heads: Sequence[Head], *, positions: Where = "decode",
    mean_z: Float[Tensor, "n_layers n_heads d_head"] | None = None,
    donor: Donor | None = None, n_prompt: int | None = None,
) -> tuple[HookList, HookList]:
    """``(prefill_hooks, decode_hooks)`` for :func:`rh_lens.decode.decode_greedy`.

    ``decode`` positions give no prefill hooks; ``all`` gives the same hooks in both lists.
    ``mean`` needs ``mean_z`` (:func:`compute_mean_z`); ``resample`` needs a ``donor``
    (:func:`capture_donor`, recorded with the same ``positions``) and the trial's prompt length
    ``n_prompt``; its hooks count positions, so build new ones for every decoding run.  No heads
    give two empty lists: the clean run.
    """
    n_layers, n_heads, _ = _shape(model)
    heads = validate_heads(heads, n_layers, n_heads)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if positions not in WHERE:
        raise ValueError(f"positions must be 'decode' or 'all', got {positions!r}")
    if not heads:
        return [], []
    if mode == "uniform":
        fwd = hooks.zero_query_hooks(heads)
    elif mode == "zero":
        fwd = hooks.zero_output_hooks(heads)
    elif mode == "mean":
        want = (n_layers, n_heads, model.cfg.d_head)
        if mean_z is None or tuple(mean_z.shape) != want:
            got = None if mean_z is None else tuple(mean_z.shape)
            raise ValueError(f"mode 'mean' needs mean_z of shape {want}, got {got}")
        source = {layer: mean_z[layer][None, None] for layer in range(n_layers)}
        fwd = hooks.replace_output_hooks(heads, source)
    else:
        if donor is None or n_prompt is None:
            raise ValueError("mode 'resample' needs a donor and the trial's n_prompt")
        if positions == "all" and donor.start != 0:
            raise ValueError("positions 'all' needs a donor recorded with positions 'all'")
        fwd = _resample_hooks(heads, donor, n_prompt=n_prompt,
                              start=0 if positions == "all" else n_prompt - 1)
    return (list(fwd) if positions == "all" else []), list(fwd)


def capture_donor(
    model, tokens: Int[Tensor, " pos"], heads: Sequence[Head], *, positions: Where = "decode",
    max_new_tokens: int = 50, chunk_size: int = 512,
) -> Donor:
    """Decode ``tokens`` cleanly, keeping the masked heads' ``hook_z`` (prefill too for
    ``positions="all"``)."""
    n_layers, n_heads, _ = _shape(model)
    heads = validate_heads(heads, n_layers, n_heads)
    store: dict[int, list[Tensor]] = {}
    fwd = []
    for layer, hs in heads_by_layer(heads).items():
        chunks: list[Tensor] = []
        store[layer] = chunks
        index = torch.tensor(hs)

        def keep(act: Float[Tensor, "batch pos head_index d_head"], hook, chunks=chunks,
                 index=index) -> None:
            chunks.append(act[0][:, index.to(act.device)].detach().clone())

        fwd.append((hooks.z(layer), keep))
    (out,) = decode_greedy(model, tokens[None], max_new_tokens=max_new_tokens,
                           chunk_size=chunk_size, record=False,
                           prefill_hooks=fwd if positions == "all" else [], decode_hooks=fwd)
    n = int(tokens.shape[0])
    return Donor(heads, n, 0 if positions == "all" else n - 1,
                 {layer: torch.cat(chunks) for layer, chunks in store.items()}, out.text)


def reference_prompts(model, haystacks: Sequence[Haystack], *, n_prompts: int = 8,
                      length: int = 128) -> list[Int[Tensor, " pos"]]:
    """``n_prompts`` windows of ``length`` tokens of plain haystack text (no needle, no
    question), taken in turn from each haystack; BOS first when the model prepends one."""
    if n_prompts < 1 or length < 2 or not haystacks:
        raise ValueError("reference prompts need n_prompts >= 1, length >= 2 and a haystack")
    bos = [model.tokenizer.bos_token_id] if model.cfg.default_prepend_bos else []
    body = length - len(bos)
    out = []
    for i, hay in enumerate(haystacks):
        count = len(range(i, n_prompts, len(haystacks)))
        if count == 0:
            break
        ids = tokenize(model, hay.text(6 * body * count + 64), prepend_bos=False).tolist()
        if len(ids) < body * count:
            raise RhLensError(f"haystack {hay.name!r} gives fewer than {body * count} tokens")
        out += [torch.tensor(bos + ids[j * body : (j + 1) * body]) for j in range(count)]
    return out


@torch.no_grad()
def compute_mean_z(model, prompts: Sequence[Int[Tensor, " pos"]]
                   ) -> Float[Tensor, "n_layers n_heads d_head"]:
    """Every head's mean ``hook_z`` over all positions of ``prompts`` (accumulated in float64)."""
    names = {hooks.z(layer) for layer in range(model.cfg.n_layers)}
    total = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head,
                        dtype=torch.float64)
    count = 0
    for prompt in prompts:
        tokens = prompt[None].to(model.cfg.device)
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names,
                                        attention_mask=torch.ones_like(tokens))
        for layer in range(model.cfg.n_layers):
            total[layer] += cache[hooks.z(layer)][0].double().sum(dim=0).cpu()
        count += tokens.shape[1]
    if count == 0:
        raise ValueError("no reference prompts to average over")
    return (total / count).to(model.cfg.dtype)


# --------------------------------------------------------------------------------------------
# Error analysis


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


# --------------------------------------------------------------------------------------------
# Records and their files


@dataclass(frozen=True)
class AblationRecord:
    """One trial under one condition.  ``watch_positions[t, i]``: watched head ``i``'s top-1 key
    at step ``t``; ``step_score``: every head's retrieval (step) score in this trial."""

    condition: str
    cell: Cell
    n_tokens: int
    generated: str
    rouge1_recall: float
    success: bool
    error: str
    tokens: Int[np.ndarray, " step"]
    step_score: Float[np.ndarray, "n_layers n_heads"]
    watch_positions: Int[np.ndarray, "step n_watch"]
    watch_places: Int[np.ndarray, "n_watch n_places"]
    donor: str | None = None

    def to_json(self) -> dict:
        return {"record_format": RECORD_FORMAT, "condition": self.condition,
                "cell": dataclasses.asdict(self.cell), "n_tokens": self.n_tokens,
                "generated": self.generated, "rouge1_recall": self.rouge1_recall,
                "success": self.success, "error": self.error, "donor": self.donor}


def _record_paths(directory: Path, key: str) -> tuple[Path, Path]:
    return directory / "cells" / f"{key}.json", directory / "cells" / f"{key}.npz"


def write_record(directory: Path, record: AblationRecord) -> None:
    """Arrays first, then the JSON that marks the cell done (both atomic)."""
    json_path, npz_path = _record_paths(directory, record.cell.key)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_npz_atomic(npz_path, tokens=record.tokens, step_score=record.step_score,
                     watch_positions=record.watch_positions, watch_places=record.watch_places)
    write_json_atomic(json_path, record.to_json())


def read_record(json_path: Path) -> AblationRecord:
    data = read_json(json_path)
    if not isinstance(data, dict) or data.get("record_format") != RECORD_FORMAT:
        raise RhLensError(f"{json_path}: not an ablation record of format {RECORD_FORMAT}")
    try:
        with np.load(json_path.with_suffix(".npz"), allow_pickle=False) as npz:
            arr = {k: npz[k] for k in npz.files}
        return AblationRecord(
            data["condition"], Cell(**data["cell"]), data["n_tokens"], data["generated"],
            data["rouge1_recall"], data["success"], data["error"], arr["tokens"],
            arr["step_score"], arr["watch_positions"], arr["watch_places"], data["donor"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise RhLensError(f"{json_path}: cannot read the ablation record ({err})") from err


# --------------------------------------------------------------------------------------------
# The sweep


@dataclass(frozen=True)
class AblationConfig:
    """Everything that decides an ablation sweep's numbers besides the head sets."""

    sweep: DetectConfig
    mode: Mode = "uniform"
    positions: Where = "decode"
    n_reference: int = 8
    reference_length: int = 128

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.positions not in WHERE:
            raise ValueError(f"positions must be 'decode' or 'all', got {self.positions!r}")
        if self.n_reference < 1 or self.reference_length < 2:
            raise ValueError("n_reference must be >= 1 and reference_length >= 2")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "sweep": self.sweep.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "AblationConfig":
        return cls(**{**data, "sweep": DetectConfig.from_dict(data["sweep"])})


@dataclass(frozen=True)
class _Prepared:
    trial: Trial
    regions: Regions


def _run_cells(model, cond: Condition, todo: Sequence[Cell], prepared: dict[str, _Prepared],
               cfg: AblationConfig, *, watch: tuple[Head, ...], mean_z, donor_of: Callable
               ) -> list[AblationRecord]:
    """Decode and score ``todo`` under one condition; equal-length trials share a batch except
    under ``resample`` (each trial has its own donor)."""
    sweep = cfg.sweep
    per_trial = cfg.mode == "resample" and bool(cond.heads)
    batches: list[list[Cell]] = []
    by_length: dict[int, list[Cell]] = {}
    for cell in todo:
        by_length.setdefault(prepared[cell.key].trial.n_tokens, []).append(cell)
    size = 1 if per_trial else sweep.batch_size
    for group in by_length.values():
        batches += [group[i : i + size] for i in range(0, len(group), size)]
    records = []
    for batch in batches:
        trials = [prepared[c.key].trial for c in batch]
        donor = None
        if per_trial:
            donor = capture_donor(model, donor_of(batch[0]).tokens, cond.heads,
                                  positions=cfg.positions, max_new_tokens=sweep.max_new_tokens,
                                  chunk_size=sweep.chunk_size)
        prefill, decode = ablation_hooks(model, cfg.mode, cond.heads, positions=cfg.positions,
                                         mean_z=mean_z, donor=donor, n_prompt=trials[0].n_tokens)
        outs = decode_greedy(model, torch.stack([t.tokens for t in trials]),
                             max_new_tokens=sweep.max_new_tokens, chunk_size=sweep.chunk_size,
                             prefill_hooks=prefill, decode_hooks=decode)
        for cell, trial, out in zip(batch, trials, outs, strict=True):
            scored = score_trial(cell, trial, out)
            watched = (out.positions[:, [h[0] for h in watch], [h[1] for h in watch]]
                       if watch else np.zeros((len(out.tokens), 0), dtype=np.int32))
            records.append(AblationRecord(
                cond.name, cell, trial.n_tokens, out.text, scored.rouge1_recall, scored.success,
                classify_output(trial.needle.answer, out.text, trial.prompt), out.tokens,
                scored.step_score, watched.astype(np.int32),
                attention_places(watched, prepared[cell.key].regions),
                None if donor is None else donor.text))
    return records


def _check_condition_dir(directory: Path, cond: Condition) -> None:
    path = directory / "condition.json"
    if path.is_file():
        if read_json(path) != cond.to_json():
            raise RhLensError(f"{directory} holds cells of a different head set named "
                              f"{cond.name!r} (other scores or seed?); use a new output directory")
    else:
        directory.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, cond.to_json())


def compute_ablation(
    model, needles: Sequence[Needle], haystacks: Sequence[Haystack],
    conditions: Sequence[Condition], cfg: AblationConfig, *, watch: Sequence[Head] = (),
    out_dir: str | Path | None = None, identity: dict | None = None, progress: bool = True,
) -> "AblationResult":
    """Run (or resume) NIAH on the same cells under every condition.

    With ``out_dir`` each finished (condition, cell) is written at once to
    ``conditions/<name>/cells/`` and found again on a rerun; ``identity`` (model spec, needle
    source, ...) is stored with the config so one directory never mixes two sweeps.  ``watch``:
    heads whose top-1 keys are kept for the attention analysis (the top retrieval heads).
    """
    from tqdm.auto import tqdm

    if len(needles) != len(haystacks):
        raise ValueError(f"{len(needles)} needles but {len(haystacks)} haystacks")
    if not conditions:
        raise ValueError("no conditions to run")
    names = [c.name for c in conditions]
    if len(set(names)) != len(names):
        raise ValueError(f"condition names repeat: {names}")
    n_layers, n_heads, _ = _shape(model)
    for cond in conditions:
        validate_heads(cond.heads, n_layers, n_heads)
    watch = validate_heads(watch, n_layers, n_heads)
    if cfg.mode == "resample" and len(needles) < 2 and any(c.heads for c in conditions):
        raise ValueError("mode 'resample' needs at least two needles: a trial's donor prompt is "
                         "the same cell built with the next needle")
    sweep = cfg.sweep
    todo = cells(len(needles), sweep)
    root = Path(out_dir) if out_dir is not None else None
    if root is not None:
        check_sweep_config(root, {"config": cfg.to_dict(), "watch": [list(h) for h in watch],
                                  **(identity or {})})
    mean_z = None
    if cfg.mode == "mean":
        length = min(cfg.reference_length, model.cfg.n_ctx)
        mean_z = compute_mean_z(model, reference_prompts(
            model, haystacks, n_prompts=cfg.n_reference, length=length))
    prepared: dict[str, _Prepared] = {}

    def prepare(cell: Cell) -> Trial:
        if cell.key not in prepared:
            trial = build_trial(model, needles[cell.needle], haystacks[cell.needle],
                                context_length=cell.length, depth=cell.depth,
                                buffer=sweep.buffer, max_new_tokens=sweep.max_new_tokens,
                                chat=sweep.chat)
            prepared[cell.key] = _Prepared(trial, prompt_regions(model, trial, chat=sweep.chat))
        return prepared[cell.key].trial

    def donor_of(cell: Cell) -> Trial:
        return prepare(Cell((cell.needle + 1) % len(needles), cell.length, cell.depth))

    results: list[tuple[AblationRecord, ...]] = []
    with tqdm(total=len(todo) * len(conditions), desc="ablation trials",
              disable=not progress) as bar:
        for cond in conditions:
            by_key: dict[str, AblationRecord] = {}
            directory = None
            if root is not None:
                directory = root / "conditions" / cond.name
                _check_condition_dir(directory, cond)
                done = finished_cells(directory)
                by_key = {c.key: read_record(done[c.key]) for c in todo if c.key in done}
            bar.update(len(by_key))
            pending = [c for c in todo if c.key not in by_key]
            step = max(sweep.batch_size, 1) * 4
            for start in range(0, len(pending), step):
                chunk = pending[start : start + step]
                for cell in chunk:
                    prepare(cell)
                for record in _run_cells(model, cond, chunk, prepared, cfg, watch=watch,
                                         mean_z=mean_z, donor_of=donor_of):
                    if directory is not None:
                        write_record(directory, record)
                    by_key[record.cell.key] = record
                    bar.update(1)
            results.append(tuple(by_key[c.key] for c in todo))
    return AblationResult(cfg, tuple(conditions), tuple(results), watch, n_layers, n_heads,
                          None if mean_z is None else mean_z.double().cpu().numpy())


# --------------------------------------------------------------------------------------------
# Aggregates


@dataclass(frozen=True)
class KCurve:
    """The paper's Figure 7: a metric vs the number of masked heads K.  ``ks`` starts at 0
    (no head masked) when the sweep has the ``none`` condition; NaN where a K was not run."""

    metric: str
    ks: Int[np.ndarray, " n_k"]
    top: Float[np.ndarray, " n_k"]
    random: Float[np.ndarray, "n_draws n_k"]


@dataclass(frozen=True)
class AblationResult:
    """Every condition's records (in cell order) and their aggregates."""

    config: AblationConfig
    conditions: tuple[Condition, ...]
    records: tuple[tuple[AblationRecord, ...], ...]
    watch: tuple[Head, ...]
    n_layers: int
    n_heads: int
    mean_z: Float[np.ndarray, "n_layers n_heads d_head"] | None = None

    def condition(self, name: str) -> tuple[AblationRecord, ...]:
        for cond, recs in zip(self.conditions, self.records, strict=True):
            if cond.name == name:
                return recs
        raise KeyError(f"no condition {name!r}; have {[c.name for c in self.conditions]}")

    def mean_rouge(self) -> Float[np.ndarray, " n_conditions"]:
        return np.array([np.mean([r.rouge1_recall for r in recs]) if recs else np.nan
                         for recs in self.records])

    def success_rate(self) -> Float[np.ndarray, " n_conditions"]:
        return np.array([np.mean([r.success for r in recs]) if recs else np.nan
                         for recs in self.records])

    def grids(self, metric: Literal["rouge", "success"] = "rouge"
              ) -> Float[np.ndarray, "n_conditions n_depths n_lengths"]:
        """Mean per (depth, context length) over needles, per condition."""
        sweep = self.config.sweep
        out = np.full((len(self.conditions), len(sweep.depths), len(sweep.lengths)), np.nan)
        for c, recs in enumerate(self.records):
            for i, depth in enumerate(sweep.depths):
                for j, length in enumerate(sweep.lengths):
                    vals = [r.rouge1_recall if metric == "rouge" else float(r.success)
                            for r in recs if r.cell.length == length
                            and np.isclose(r.cell.depth, depth)]
                    if vals:
                        out[c, i, j] = float(np.mean(vals))
        return out

    def error_counts(self) -> Int[np.ndarray, "n_conditions n_errors"]:
        return np.array([[sum(r.error == e for r in recs) for e in ERROR_TYPES]
                         for recs in self.records], dtype=np.int64).reshape(-1, len(ERROR_TYPES))

    def attention_shares(self, *, failed: bool = True
                         ) -> Float[np.ndarray, "n_conditions n_places"]:
        """Share of the watched heads' decode steps per place, over failed (ROUGE-1 recall
        <= 0.5) or successful trials; under ``uniform``, masked heads are left out."""
        out = np.full((len(self.conditions), len(PLACES)), np.nan)
        for c, (cond, recs) in enumerate(zip(self.conditions, self.records, strict=True)):
            keep = [i for i, h in enumerate(self.watch)
                    if not (self.config.mode == "uniform" and h in cond.heads)]
            counts = sum((r.watch_places[keep].sum(axis=0) for r in recs
                          if r.success != failed), np.zeros(len(PLACES)))
            if counts.sum() > 0:
                out[c] = counts / counts.sum()
        return out

    def k_curve(self, metric: Literal["rouge", "success"] = "rouge") -> KCurve:
        values = self.mean_rouge() if metric == "rouge" else self.success_rate()
        by_name = dict(zip((c.name for c in self.conditions), values, strict=True))
        ks = sorted({c.k for c in self.conditions if c.kind in ("top", "random")})
        has_none = "none" in by_name
        ks = ([0] if has_none else []) + ks
        draws = sorted({c.draw for c in self.conditions if c.kind == "random"}) or [0]
        top = np.full(len(ks), np.nan)
        random = np.full((len(draws), len(ks)), np.nan)
        for j, k in enumerate(ks):
            if k == 0:
                top[j] = random[:, j] = by_name["none"]
                continue
            top[j] = by_name.get(f"top-{k}", np.nan)
            for d_i, d in enumerate(draws):
                random[d_i, j] = by_name.get(f"random-{k}-d{d}", np.nan)
        return KCurve(metric, np.array(ks, dtype=np.int64), top, random)

    def group_names(self) -> list[str]:
        return list(dict.fromkeys(c.group for c in self.conditions))

    def by_group(self, values: np.ndarray) -> np.ndarray:
        """Per-condition values (first axis) averaged within each display group, NaN skipped."""
        groups = [c.group for c in self.conditions]
        return np.stack([_nanmean(values[[i for i, g in enumerate(groups) if g == name]])
                         for name in self.group_names()])


def _nanmean(rows: np.ndarray) -> np.ndarray:
    """Mean over the first axis ignoring NaN; NaN (no warning) where a column has no value."""
    finite = np.isfinite(rows)
    count = finite.sum(axis=0)
    total = np.where(finite, rows, 0.0).sum(axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


# --------------------------------------------------------------------------------------------
# Plots


def plot_k_curve(result: AblationResult, *, metric: Literal["rouge", "success"] = "rouge",
                 title: str = "") -> go.Figure:
    """Top-K vs random-K masking (mean over needles and cells; random: mean and range of draws)."""
    curve = result.k_curve(metric)
    label = "mean ROUGE-1 recall" if metric == "rouge" else "success rate"
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=curve.ks, y=curve.top, mode="lines+markers",
                             name="top-K retrieval heads"))
    if np.isfinite(curve.random[:, curve.ks > 0]).any():
        mean = _nanmean(curve.random)
        finite = np.isfinite(curve.random)
        low = np.where(finite.any(0), np.where(finite, curve.random, np.inf).min(0), np.nan)
        high = np.where(finite.any(0), np.where(finite, curve.random, -np.inf).max(0), np.nan)
        fig.add_trace(go.Scatter(
            x=curve.ks, y=mean, mode="lines+markers", name=f"random-K ({len(curve.random)} draws)",
            error_y=dict(type="data", symmetric=False, array=high - mean, arrayminus=mean - low)))
    fig.update_xaxes(title_text="masked heads K")
    fig.update_yaxes(title_text=label, range=[-0.02, 1.02])
    cfg = result.config
    fig.update_layout(title=dict(text=title or f"NIAH under {cfg.mode} masking "
                                 f"({cfg.positions} positions)"), width=640, height=420)
    return fig


def plot_grids(result: AblationResult, *, title: str = "") -> go.Figure:
    """The depth x length ROUGE-1 grid of every display group (random draws averaged)."""
    names = result.group_names()
    grids = result.by_group(result.grids("rouge"))
    sweep = result.config.sweep
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=names, horizontal_spacing=0.05,
                        vertical_spacing=0.12)
    for i, grid in enumerate(grids):
        fig.add_trace(go.Heatmap(
            z=grid, x=[str(n) for n in sweep.lengths], y=[f"{d:g}" for d in sweep.depths],
            coloraxis="coloraxis",
            hovertemplate="depth %{y}%, length %{x}: %{z:.2f}<extra></extra>",
        ), row=i // cols + 1, col=i % cols + 1)
    fig.update_xaxes(type="category", title_text="context length")
    fig.update_yaxes(type="category", autorange="reversed", title_text="depth (%)")
    fig.update_layout(title=dict(text=title or "NIAH ROUGE-1 recall per condition"),
                      coloraxis=dict(colorscale=NIAH_SCALE, cmin=0.0, cmax=1.0),
                      width=300 * cols + 160, height=280 * rows + 120)
    return fig


def _stacked(result: AblationResult, table: np.ndarray, labels: Sequence[str], *, title: str,
             yaxis: str) -> go.Figure:
    names = result.group_names()
    fig = go.Figure([go.Bar(x=names, y=table[:, j], name=label)
                     for j, label in enumerate(labels)])
    fig.update_layout(barmode="stack", title=dict(text=title), yaxis_title=yaxis,
                      width=max(520, 70 * len(names) + 260), height=440)
    return fig


def plot_error_types(result: AblationResult, *, title: str = "") -> go.Figure:
    """Share of each output class per display group."""
    counts = result.by_group(result.error_counts().astype(np.float64))
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    return _stacked(result, shares, ERROR_TYPES, yaxis="share of trials",
                    title=title or "What the model answered, per condition")


def plot_failure_attention(result: AblationResult, *, title: str = "") -> go.Figure:
    """Where the watched (top retrieval) heads look during failed trials, per display group."""
    shares = np.nan_to_num(result.by_group(result.attention_shares(failed=True)))
    heads = ", ".join(f"L{a}H{b}" for a, b in result.watch)
    return _stacked(result, shares, PLACES, yaxis="share of decode steps",
                    title=title or f"Top-1 keys of {heads or 'no heads'} in failed trials")
