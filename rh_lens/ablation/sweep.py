"""The ablation sweep: NIAH on the same cells under every head set (:func:`compute_ablation`).

Under ``resample`` a trial's donor prompt is the same cell (context length, depth) built with the
next needle of the sweep (needle ``(n + 1) % N``) and that needle's haystack; see
:mod:`rh_lens.interventions` for how its outputs are read.  ``mean`` averages over plain haystack
text (:func:`reference_prompts`: no needle, no question).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from rh_lens.ablation.conditions import Condition, model_shape
from rh_lens.ablation.config import AblationConfig
from rh_lens.ablation.records import AblationRecord
from rh_lens.ablation.result import AblationResult
from rh_lens.ablation.taxonomy import Regions, attention_places, classify_output, prompt_regions
from rh_lens.decode import decode_greedy
from rh_lens.detect import Cell, cells, score_trial
from rh_lens.errors import RhLensError
from rh_lens.heads import HeadLike, validate_heads
from rh_lens.interventions import ablation_hooks, capture_donor, compute_mean_z
from rh_lens.models import tokenize
from rh_lens.niah import Haystack, Needle, Trial, build_trial
from rh_lens.store import SweepStore, read_finished, unit
from rh_lens.store import shard as shard_items

CONDITION_JSON = "condition.json"


@dataclass(frozen=True)
class _Prepared:
    trial: Trial
    regions: Regions


def _run_cells(model, cond: Condition, todo: Sequence[Cell], prepared: dict[str, _Prepared],
               cfg: AblationConfig, *, watch: tuple[HeadLike, ...], mean_z, donor_of: Callable
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


def sweep_units(conditions: Sequence[Condition], n_needles: int, cfg: AblationConfig
                ) -> list[str]:
    """The records of an ablation sweep in order, every cell under each condition in turn, as
    :func:`rh_lens.store.unit` names them; ``shard=(i, n)`` of :func:`compute_ablation` runs
    ``sweep_units(...)[i::n]``."""
    return [unit(c.key, cond.name) for cond in conditions for c in cells(n_needles, cfg.sweep)]


def compute_ablation(
    model, needles: Sequence[Needle], haystacks: Sequence[Haystack],
    conditions: Sequence[Condition], cfg: AblationConfig, *, watch: Sequence[HeadLike] = (),
    out_dir: str | Path | None = None, identity: dict | None = None, progress: bool = True,
    recompute_bad_cells: bool = False, shard: tuple[int, int] = (0, 1),
) -> AblationResult:
    """Run (or resume) NIAH on the same cells under every condition.

    With ``out_dir`` each finished (condition, cell) is written at once to
    ``conditions/<name>/cells/`` and found again on a rerun; ``identity`` (model spec, needle
    source, ...) is stored with the config so one directory never mixes two sweeps.  ``watch``:
    heads whose top-1 keys are kept for the attention analysis (the top retrieval heads).
    ``shard=(i, n)`` runs only part ``i`` of ``n`` of the records (:func:`sweep_units`), whose
    result then holds only those, per condition.
    """
    from tqdm.auto import tqdm

    if len(needles) != len(haystacks):
        raise ValueError(f"{len(needles)} needles but {len(haystacks)} haystacks")
    if not conditions:
        raise ValueError("no conditions to run")
    names = [c.name for c in conditions]
    if len(set(names)) != len(names):
        raise ValueError(f"condition names repeat: {names}")
    n_layers, n_heads, _ = model_shape(model)
    for cond in conditions:
        validate_heads(cond.heads, n_layers, n_heads)
    watch = validate_heads(watch, n_layers, n_heads)
    if cfg.mode == "resample" and len(needles) < 2 and any(c.heads for c in conditions):
        raise ValueError("mode 'resample' needs at least two needles: a trial's donor prompt is "
                         "the same cell built with the next needle")
    sweep = cfg.sweep
    root = None
    if out_dir is not None:
        root = SweepStore.open(out_dir, {"config": cfg.to_dict(),
                                         "watch": [list(h) for h in watch], **(identity or {})})
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

    mine = set(shard_items(sweep_units(conditions, len(needles), cfg), *shard))
    results: list[tuple[AblationRecord, ...]] = []
    with tqdm(total=len(mine), desc="ablation trials", disable=not progress) as bar:
        for cond in conditions:
            todo = [c for c in cells(len(needles), sweep) if unit(c.key, cond.name) in mine]
            by_key: dict[str, AblationRecord] = {}
            store = None
            if root is not None:
                store = root.sub(cond.name, cond.to_json(), identity_file=CONDITION_JSON)
                by_key = read_finished(store, [c.key for c in todo], AblationRecord.from_record,
                                       recompute_bad=recompute_bad_cells)
            bar.update(len(by_key))
            pending = [c for c in todo if c.key not in by_key]
            step = max(sweep.batch_size, 1) * 4
            for start in range(0, len(pending), step):
                chunk = pending[start : start + step]
                for cell in chunk:
                    prepare(cell)
                for record in _run_cells(model, cond, chunk, prepared, cfg, watch=watch,
                                         mean_z=mean_z, donor_of=donor_of):
                    if store is not None:
                        store.write(record.cell.key, record.to_json(), record.arrays())
                    by_key[record.cell.key] = record
                    bar.update(1)
            results.append(tuple(by_key[c.key] for c in todo))
    return AblationResult(cfg, tuple(conditions), tuple(results), watch, n_layers, n_heads,
                          None if mean_z is None else mean_z.double().cpu().numpy())




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
