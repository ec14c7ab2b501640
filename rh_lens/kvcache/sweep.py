"""NIAH on the detection grid under key/value policies (:func:`compute_kv_compress`).

Each (policy, cell) is decoded with :func:`rh_lens.decode.decode_greedy` under the policy's
hooks in the prefill and at every step, scored like a detection trial, and written at once to
``conditions/<policy>/cells/`` of a :class:`rh_lens.store.SweepStore`: a rerun resumes.
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rh_lens.ablation.records import AblationRecord
from rh_lens.ablation.taxonomy import classify_output
from rh_lens.decode import decode_greedy
from rh_lens.detect import DetectConfig, cells, score_trial
from rh_lens.kvcache.policy import KVPolicy, policy_hooks
from rh_lens.niah import build_trial
from rh_lens.store import SweepStore, read_finished

POLICY_JSON = "policy.json"


def compute_kv_compress(model, needles, haystacks, policies: Sequence[KVPolicy],
                        cfg: DetectConfig, *, out_dir: str | Path | None = None,
                        identity: dict | None = None, progress: bool = True
                        ) -> dict[str, tuple[AblationRecord, ...]]:
    """Every policy's records on the same cells, ``{policy name: records in cell order}``."""
    from tqdm.auto import tqdm

    names = [p.name for p in policies]
    if len(set(names)) != len(names):
        raise ValueError(f"policy names repeat: {names}")
    todo = cells(len(needles), cfg)
    root = None if out_dir is None else SweepStore.open(
        out_dir, {"config": cfg.to_dict(), **(identity or {})})
    trials = {}
    out = {}
    with tqdm(total=len(todo) * len(policies), desc="kv trials", disable=not progress) as bar:
        for policy in policies:
            store = None if root is None else root.sub(policy.name, policy.to_json(),
                                                       identity_file=POLICY_JSON)
            done = {} if store is None else read_finished(store, [c.key for c in todo],
                                                          AblationRecord.from_record)
            bar.update(len(done))
            fwd = policy_hooks(model, policy)
            for cell in todo:
                if cell.key in done:
                    continue
                if cell.key not in trials:
                    trials[cell.key] = build_trial(
                        model, needles[cell.needle], haystacks[cell.needle],
                        context_length=cell.length, depth=cell.depth, buffer=cfg.buffer,
                        max_new_tokens=cfg.max_new_tokens, chat=cfg.chat)
                trial = trials[cell.key]
                (dec,) = decode_greedy(model, trial.tokens[None],
                                       max_new_tokens=cfg.max_new_tokens,
                                       chunk_size=cfg.chunk_size, prefill_hooks=fwd,
                                       decode_hooks=fwd)
                scored = score_trial(cell, trial, dec)
                record = AblationRecord(
                    policy.name, cell, trial.n_tokens, dec.text, scored.rouge1_recall,
                    scored.success, classify_output(trial.needle.answer, dec.text, trial.prompt),
                    dec.tokens, scored.step_score, np.zeros((len(dec.tokens), 0), np.int32),
                    np.zeros((0, 0), np.int32))
                if store is not None:
                    store.write(cell.key, record.to_json(), record.arrays())
                done[cell.key] = record
                bar.update(1)
            out[policy.name] = tuple(done[c.key] for c in todo)
    return out


def summarize(policies: Sequence[KVPolicy], records: dict, *, n_tokens: int, n_layers: int,
              n_kv_heads: int, d_head: int, memory_tokens: int) -> list[dict]:
    """One row per policy: KV kept at ``n_tokens``, bf16 cache MiB at ``memory_tokens``, mean
    ROUGE-1 recall and success rate."""
    from rh_lens.kvcache.policy import cache_bytes

    rows = []
    for p in policies:
        recs = records[p.name]
        rows.append({
            "policy": p.name, "family": p.group, "k": p.k, "draw": p.draw, "sink": p.sink,
            "window": p.window, "full_groups": [list(g) for g in p.full],
            "kv_fraction": p.kept_fraction(n_tokens, n_layers=n_layers, n_kv_heads=n_kv_heads),
            "cache_mib": cache_bytes(p, memory_tokens, n_layers=n_layers,
                                     n_kv_heads=n_kv_heads, d_head=d_head) / 2**20,
            "rouge1_recall": float(np.mean([r.rouge1_recall for r in recs])),
            "success_rate": float(np.mean([r.success for r in recs])),
        })
    return rows


