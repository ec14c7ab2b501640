"""Head-level ablation: NIAH with top retrieval heads or random heads masked (Wu et al., Fig. 7).

    python -m analyses.ablate                      # zoo:llama-s, scores of analyses.detect's run
    python -m analyses.ablate --model /ckpt/mistral --scores runs/detect/mistral --ks 10 20 50 \\
        --draws 3 --mode uniform --positions decode --out runs/ablate/mistral --device auto
    python -m analyses.ablate --scores head_score.json --mask heads:16.19,11.15 --mask random:2 \\
        --mode mean --positions all

Masks (repeatable): ``top:K`` (the K highest retrieval scores), ``random:K`` (``--draws`` seeded
draws of K heads that are not retrieval heads, the same draw for every cell), ``matched:K``
(``--draws`` seeded draws with top-K's layer histogram, disjoint from it), ``bottom:K``,
``heads:L.H,...``, ``groups:L.G,...`` (whole key/value groups); ``--ks K ...`` adds ``top:K`` and
each ``--controls`` kind (default ``random``) for each K (the curve).  Top-K is compared with
each control per K: bootstrap intervals over trials and draws, a paired permutation test and
Benjamini-Hochberg over K (``rh_lens.ablation.controls``), in ``result.json``, the printed table
and the K-curve's bands.  Without masks the curve runs for K in 1, 2, 4, 8, 16 (as far as the
model has heads).  Modes and positions: see ``rh_lens.ablation``.

Writes into --out: ``conditions/<name>/cells/`` (one record per trial, written atomically; a
rerun skips finished cells; ``condition.json`` holds the masked heads), ``result.json`` +
``arrays.npz`` (mean ROUGE-1 recall and success rate per condition, depth x length grids, the
K-curve, error types, where the top retrieval heads look), ``summary.json``, ``trials.jsonl`` and
HTML figures (``k_curve``, ``k_curve_success``, ``grids``, ``errors``, ``failure_attention``).
"""

import argparse
from pathlib import Path

from analyses import _cli

DEFAULT_KS = (1, 2, 4, 8, 16)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    _cli.add_model_args(p)
    _cli.add_run_args(p, out_help="output directory (default runs/ablate/<model>-<mode>-"
                      "<positions>)")
    _cli.add_scores_args(p, scores_help="detection directory (python -m analyses.detect) or "
                         "reference-format head_score.json; default: analyses.detect's default "
                         "output for --model")
    _cli.add_mask_args(p, modes=("uniform", "zero", "mean", "resample"), draws=3,
                       mask_help="{spec} (repeatable; see rh_lens.heads)",
                       ks_help="add top:K and the --controls for each K (default without "
                       "--mask: "
                       f"{' '.join(map(str, DEFAULT_KS))}, as far as the model has heads)")
    p.add_argument("--exclude", default="", metavar="L.H,...",
                   help="further heads never drawn for random-K")
    p.add_argument("--watch", type=int, default=5,
                   help="top retrieval heads whose attention the error analysis reads")
    _cli.add_sweep_args(p, points=5, needle_seed="--needle-seed")
    p.add_argument("--n-reference", type=int, default=8, help="mode mean: reference prompts")
    p.add_argument("--reference-length", type=int, default=128,
                   help="mode mean: tokens per reference prompt")
    _cli.add_launch_args(p)
    return p


def _run(args, argv) -> int:
    from rh_lens.ablation import (
        AblationConfig,
        compute_ablation,
        conditions_from_masks,
        sweep_units,
    )
    from rh_lens.heads import parse_heads, parse_spec, select_heads
    from rh_lens.models import model_facts

    settings = _cli.launch_settings(args)
    model = _cli.load_model(args)
    facts = model_facts(model)
    n_total = facts.n_layers * facts.n_heads
    exclude = parse_heads(args.exclude) if args.exclude.strip() else ()
    masks, ks = list(args.mask), args.ks
    if not masks and not ks:
        ks = [k for k in DEFAULT_KS if k <= n_total]
    needs_scores = bool(ks) or any(parse_spec(m).needs_scores for m in masks)
    table, scores_path = _cli.load_scores(args, needed=needs_scores)
    if ks:
        if args.ks is None:  # the default curve: only the K this model can give every set for
            ks = _cli.feasible_ks(ks, args.controls, facts, table, threshold=args.threshold,
                                  exclude=exclude)
        masks += _cli.control_masks(ks, args.controls)
    conditions = conditions_from_masks(model, masks, scores=table, threshold=args.threshold,
                                       exclude=exclude, seed=args.seed, n_draws=args.draws)
    watch = () if table is None or not args.watch else select_heads(
        f"top:{min(args.watch, n_total)}", n_layers=facts.n_layers, n_heads=facts.n_heads,
        scores=table)[0]

    needles, haystacks, source = _cli.niah_inputs(args.needles, args.haystack,
                                                  n_needles=args.n_needles, seed=args.needle_seed)
    cfg = AblationConfig(_cli.sweep_config(model, args, points=5, needles=needles), mode=args.mode,
                         positions=args.positions, n_reference=args.n_reference,
                         reference_length=args.reference_length)
    out = args.out or _cli.run_dir("ablate", args.model, args.mode, args.positions)
    identity = _cli.sweep_identity(model, args.model, needles, source)
    meta = _cli.launch(args, argv, settings, module="analyses.ablate", out=out,
                       units=sweep_units(conditions, len(needles), cfg),
                       meta=_cli.metadata(args, model, argv))
    if meta is None:  # --dry-run
        return 0
    result = compute_ablation(model, needles, haystacks, conditions, cfg, watch=watch,
                              out_dir=out, identity=identity, progress=not args.quiet,
                              recompute_bad_cells=args.recompute_bad_cells, shard=args.shard)
    if args.shard != (0, 1):
        print(f"shard {args.shard[0]}/{args.shard[1]} written to {out}; run the command "
              "without --shard once every shard is done to write the result")
        return 0
    settings = {"scores": None if table is None else str(scores_path), "score": args.score,
                "seed": args.seed, "draws": args.draws, "threshold": args.threshold,
                "exclude": [list(h) for h in exclude]}
    write_outputs(out, result, meta, {**identity, **settings}, table,
                  self_contained=args.self_contained_figures)
    return 0


def print_controls(result) -> None:
    """Top-K against each control per K: means with intervals, p and Benjamini-Hochberg q."""
    for metric in ("rouge", "success"):
        for comp in result.controls(metric):
            print(f"\n{metric}: top-K vs {comp.control}-K ({comp.n_trials} trials, "
                  f"{comp.level:.0%} bootstrap intervals, paired permutation test, BH over K)")
            print(f"{'K':>4} {'top':>21} {comp.control:>21} {'diff':>21} {'p':>8} {'q':>8}")
            fmt = lambda r: f"{r[0]:.3f} [{r[1]:.3f},{r[2]:.3f}]"  # noqa: E731
            for i, k in enumerate(comp.ks):
                mark = " *" if comp.significant[i] else ""
                print(f"{k:>4} {fmt(comp.top[i]):>21} {fmt(comp.control_values[i]):>21} "
                      f"{fmt(comp.diff[i]):>21} {comp.p[i]:8.2g} {comp.q[i]:8.2g}{mark}")


def write_outputs(out: Path, result, meta, identity: dict, scores, *,
                  self_contained: bool = False) -> None:
    """Save the result and its figures, and print the table of conditions."""
    from rh_lens import ablation, plotting

    summary = result.save(out, meta=meta, identity=identity, scores=scores)
    name = identity["model"]
    figures = {
        "k_curve": plotting.plot_k_curve(result, metric="rouge",
                                         title=f"{name}: NIAH vs masked heads"),
        "k_curve_success": plotting.plot_k_curve(result, metric="success",
                                                 title=f"{name}: NIAH success vs masked heads"),
        "grids": plotting.plot_grids(result, title=f"{name}: NIAH ROUGE-1 recall per condition"),
        "errors": plotting.plot_error_types(result, title=f"{name}: output types"),
        "failure_attention": plotting.plot_failure_attention(result),
    }
    _cli.save_figures(out, figures, self_contained=self_contained)
    print(f"{result.config.mode} masking at {result.config.positions} positions, "
          f"{len(result.records[0])} cells per condition; results in {out}")
    short = {"correct": "ok", "incomplete": "part", "wrong_extraction": "wrong",
             "hallucinated": "halluc", "empty": "empty"}
    print(f"{'condition':<24} {'heads':>5} {'ROUGE':>6} {'success':>7}  "
          + " ".join(f"{short[e]:>6}" for e in ablation.ERROR_TYPES))
    for row, cond in zip(summary["conditions"], result.conditions, strict=True):
        print(f"{cond.name:<24} {len(cond.heads):>5} {row['mean_rouge1_recall']:6.3f} "
              f"{row['success_rate']:7.2f}  "
              + " ".join(f"{n:>6}" for n in row["errors"].values()))
    print_controls(result)


def main(argv: list[str] | None = None) -> int:
    return _cli.run_guarded(_run, build_parser().parse_args(argv), argv)


if __name__ == "__main__":
    raise SystemExit(main())
