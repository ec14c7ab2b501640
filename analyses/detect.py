"""Retrieval-score detection by Needle-in-a-Haystack decoding (Wu et al. 2024, section 2).

    python -m analyses.detect                                  # zoo:llama-s, a few minutes on CPU
    python -m analyses.detect --model /ckpt/llama-2-7b-80k --device auto --dtype bfloat16 \\
        --needles ../shared/data/official_niah/needles.jsonl \\
        --haystack ../shared/data/official_niah --lengths 1000 ... 80000 --n-ctx 81920
    python -m analyses.detect ... --shard 0/4 --out runs/a     # split a sweep over machines
    python -m analyses.detect --merge runs/a runs/b ... --out runs/all

    python -m analyses.detect --score qr --extra-scores mass  # attention scores as well

Writes into --out: ``cells/`` (one file per trial, written atomically; a rerun skips finished
cells), ``result.json`` + ``arrays.npz`` (config, provenance, per-head aggregates),
``head_score.json`` (the reference's ``{"layer-head": [...]}`` format, of the --score score),
``trials.jsonl`` and HTML figures; it prints the top heads.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from analyses import _cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    _cli.add_model_args(p)
    _cli.add_run_args(p, out_help="output directory (default runs/detect/<model>)")
    _cli.add_sweep_args(p, points=10)
    p.add_argument("--protocol", choices=("paper", "reference"), default="paper",
                   help="paper: rh_lens's trials; reference: the reference code's prompt "
                   "construction, answer-span search and stop rule, exactly (trials whose span "
                   "it cannot find are reported, not scored)")
    p.add_argument("--score", choices=("step", "set", "mass", "qr"), default="step",
                   help="the score that ranks and prints the heads and goes into "
                   "head_score.json; step: the reference code's score; set: the paper's "
                   "formula; mass: attention on the answer span while decoding; qr: "
                   "attention from the question to the needle minus that from a null question "
                   "(mass and qr are computed when named here or in --extra-scores)")
    p.add_argument("--extra-scores", nargs="+", choices=("mass", "qr"), default=[],
                   help="attention scores to compute beside the copy scores (stored cells "
                   "without them are run again)")
    p.add_argument("--merge", type=Path, nargs="+", metavar="DIR",
                   help="combine the cells of shard directories into --out")
    p.add_argument("--allow-partial", action="store_true",
                   help="with --merge: accept shards that do not cover the sweep (the result "
                   "is marked partial)")
    p.add_argument("--top", type=int, default=15, help="heads to print")
    _cli.add_launch_args(p)
    return p


def _run(args, argv) -> int:
    from rh_lens.detect import DetectResult, cells, compute_detect
    from rh_lens.results import RunMetadata
    from rh_lens.store import unit

    settings = _cli.launch_settings(args)
    if args.merge and settings.launcher != "local":
        raise ValueError("--merge runs here: drop --launcher")
    if args.merge:
        if args.out is None:
            raise ValueError("--merge needs --out")
        result, identity = DetectResult.merge(args.merge, allow_partial=args.allow_partial)
        identity = {k: v for k, v in identity.items() if k != "config"}
        extra = {"merged_from": [str(d) for d in args.merge],
                 "partial": bool(result.missing), "missing_cells": list(result.missing)}
        meta = RunMetadata.collect(model_spec=identity["model"], seed=identity.get("seed"),
                                   argv=argv, extra=extra)
        if result.missing:
            print(f"warning: partial result, {len(result.missing)} cells missing (listed in "
                  "summary.json)", file=sys.stderr)
        write_outputs(args.out, result, meta, identity, score=args.score, top=args.top,
                      self_contained=args.self_contained_figures)
        return 0

    model = _cli.load_model(args)
    needles, haystacks, source = _cli.niah_inputs(args.needles, args.haystack,
                                                  n_needles=args.n_needles, seed=args.seed)
    cfg = _cli.sweep_config(model, args, points=10, needles=needles)
    out = args.out or _cli.detect_dir(args.model)
    identity = _cli.sweep_identity(model, args.model, needles, source, seed=args.seed)
    meta = _cli.launch(args, argv, settings, module="analyses.detect", out=out,
                       units=[unit(c.key) for c in cells(len(needles), cfg)],
                       meta=_cli.metadata(args, model, argv))
    if meta is None:  # --dry-run
        return 0
    result = compute_detect(model, needles, haystacks, cfg, out_dir=out, shard=args.shard,
                            identity=identity, progress=not args.quiet,
                            recompute_bad_cells=args.recompute_bad_cells,
                            scores=[args.score, *args.extra_scores])
    if args.shard != (0, 1):
        done = len(list((out / "cells").glob("*.json")))
        print(f"shard {args.shard[0]}/{args.shard[1]}: {done} cells in {out}; combine shards "
              "with --merge")
        return 0
    write_outputs(out, result, meta, identity, score=args.score, top=args.top,
                  self_contained=args.self_contained_figures)
    return 0


def write_outputs(out: Path, result, meta, identity: dict, *, score: str, top: int,
                  self_contained: bool = False) -> None:
    """Save the result, its figures, and print the top heads."""
    from rh_lens import plotting
    from rh_lens.heads import label

    if score not in result.scores:
        raise ValueError(f"the trials have no {score} score (they hold "
                         f"{', '.join(result.scores)}): run the sweep with --score {score}")
    summary = result.save(out, meta=meta, identity=identity, score=score)
    if not result.n_scored:
        print("warning: no trial succeeded (ROUGE-1 recall > 0.5) with its answer span found, "
              "so no head has a score and head_score.json is not written", file=sys.stderr)
    cfg = result.config
    table = result.mean_scores(score)
    name = identity["model"]
    figures = {
        "heatmap": _heatmap(plotting, result, score, name),
        **{f"heatmap_{kind}": _heatmap(plotting, result, kind, name)
           for kind in result.scores if kind not in ("step", "set", score)},
        "niah_grid": plotting.plot_niah_grid(
            result.rouge_grid(), depths=list(cfg.depths), lengths=list(cfg.lengths),
            title=f"{name}: NIAH ROUGE-1 recall"),
        "top_heads": plotting.plot_top_heads(table, k=20,
                                             title=f"{name}: top heads ({score} score)"),
    }
    _cli.save_figures(out, figures, self_contained=self_contained)
    print(f"{len(result.records)} trials, {result.n_success} successful "
          f"(mean ROUGE-1 recall {summary['mean_rouge1_recall'] or 0:.3f}); results in {out}")
    lost = summary.get("span_not_found")
    if lost is not None:
        cells = ", ".join(lost["cells"][:SHOWN]) + (", ..." if lost["count"] > SHOWN else "")
        print(f"{cfg.protocol} protocol: answer span not found in {lost['count']} of "
              f"{len(result.records)} trials, not scored ({result.n_scored} scored)"
              + (f": {cells} (all in summary.json)" if lost["count"] else ""))
    print(f"{'head':>8}  {score:>6}  {'active':>6}")
    freq = result.activation_frequency()
    for lay, h, s in result.ranked(score)[:top]:
        print(f"  {label((lay, h)):<{len(str(lay)) + 5}}  {s:6.3f}  {freq[lay, h]:6.2f}")


SHOWN = 8  # span-not-found cells printed (summary.json lists them all)
TITLES = {"step": "retrieval score (step)", "set": "retrieval score (set)",
          "mass": "answer-span attention mass (mass)", "qr": "QR score (qr)"}


def _heatmap(plotting, result, kind: str, name: str):
    """The mean ``kind`` score per head; signed QR scores on a diverging scale."""
    table = np.nan_to_num(result.mean_scores(kind))
    if kind == "qr":
        return plotting.plot_head_heatmap(table, title=f"{name}: {TITLES[kind]}",
                                          diverging=True, zmax=float(np.abs(table).max()) or 1.0)
    return plotting.plot_head_heatmap(
        table, title=f"{name}: {TITLES[kind]}",
        zmax=max(1.0, float(np.nanmax(table))) if result.n_scored else 1.0)


def main(argv: list[str] | None = None) -> int:
    return _cli.run_guarded(_run, build_parser().parse_args(argv), argv)


if __name__ == "__main__":
    raise SystemExit(main())
