"""Chain of thought vs direct answers with retrieval heads masked (Wu et al., sec. 5).

    python -m analyses.cot                     # zoo:llama-s, scores of analyses.detect's run
    python -m analyses.cot --model /ckpt/mistral-instruct --scores runs/detect/mistral \\
        --items gsm8k.jsonl --cot-template "Question: {question}\\nLet's think step by step." \\
        --direct-template "Question: {question}\\nThe answer is" --match numeric --stop eos \\
        --max-new-tokens 256 --ks 20 50 100 --device auto --dtype bfloat16

Without ``--items`` the zoo's four tasks run (``rh_lens.zoo.inputs.zoo_tasks``): multi-hop
questions answered with chain of thought and directly, parametric facts asked directly and with a
CoT preamble.  With ``--items`` (JSONL of ``{"question", "answer", "context"?}``) the tasks are
``cot`` and ``direct``, one per template (``{question}`` and ``{context}`` are filled in).
Conditions: no masking, then ``top:K`` and each ``--controls`` kind (default ``random:K``,
``--draws`` seeded draws of K heads that are not retrieval heads; ``matched:K``, ``bottom:K``) for
every ``--ks`` K, plus any ``--mask`` (as in ``analyses.ablate``).  With parametric tasks (the
zoo's) every masked set's accuracy drop on the retrieval tasks is set against its drop on the
parametric facts, with bootstrap intervals (``specificity.html`` and the printed table).

Writes into --out: ``conditions/<name>/<task>.json`` (every output and whether it was right;
a rerun skips finished ones, and is refused if the model's weights or the decoding settings
differ: ``cot_config.json``), ``result.json`` + ``arrays.npz`` (accuracy per condition and
task, specificity), ``summary.json``, ``cot.html`` (bar chart), ``specificity.html`` and prints
the accuracy table.
"""

import argparse
from pathlib import Path

from analyses import _cli
from rh_lens.zoo.tasks import HOP_FORMS

DEFAULT_KS = (2, 4, 8)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    _cli.add_model_args(p)
    _cli.add_run_args(p, out_help="output directory (default runs/cot/<model>-<mode>)")
    _cli.add_scores_args(p, scores_help="detection directory or reference-format "
                         "head_score.json; default: analyses.detect's default output for --model")
    _cli.add_mask_args(p, modes=("uniform", "zero"), draws=2,
                       mask_help="further masks: {spec} (see rh_lens.heads)",
                       ks_help=f"K of top:K and the --controls (default "
                       f"{' '.join(map(str, DEFAULT_KS))}, as far as the model has heads)")
    p.add_argument("--items", type=Path, help='JSONL of {"question", "answer", "context"?}')
    p.add_argument("--cot-template", default="{context}Question: {question}\nAnswer: Let's "
                   "think step by step.", help="CoT prompt for --items")
    p.add_argument("--direct-template", default="{context}Question: {question}\nAnswer:",
                   help="direct prompt for --items")
    p.add_argument("--match", choices=("exact", "numeric"), default="exact",
                   help="how --items answers are scored")
    p.add_argument("--n-multihop", type=int, default=24, help="zoo multi-hop questions")
    p.add_argument("--task-seed", type=int, default=0, help="seed of the zoo questions")
    p.add_argument("--hop-form", choices=sorted(HOP_FORMS), default=None,
                   help="how the zoo questions' facts say where people live (default: the zoo "
                   "model's own, from its card; lives for other models)")
    p.add_argument("--roles", type=int, choices=(1, 2), default=None,
                   help="officials per town in the zoo questions (default: the zoo model's own, "
                   "from its card; 2 for other models)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--stop", choices=("newline", "eos"), default="newline",
                   help="stop decoding at a newline (zoo) or only at end-of-sequence")
    p.add_argument("--batch", type=int, default=16, help="prompts of equal length per batch")
    _cli.add_launch_args(p)
    return p


def _run(args, argv) -> int:
    from rh_lens import cot, plotting
    from rh_lens.ablation import conditions_from_masks
    from rh_lens.models import model_facts, weights_fingerprint
    from rh_lens.zoo.inputs import ZooTaskSizes, zoo_chain, zoo_tasks

    settings = _cli.launch_settings(args)
    if args.items is not None:  # read the user's items before spending time on the model
        items = cot.read_items(args.items)
        tasks = (cot.Task("cot", args.cot_template, items, args.match),
                 cot.Task("direct", args.direct_template, items, args.match))
    model = _cli.load_model(args)
    facts = model_facts(model)
    if args.items is None:
        chain = zoo_chain(args.model)
        chain.update({k: v for k, v in (("hop_form", args.hop_form), ("roles", args.roles))
                      if v is not None})
        tasks = zoo_tasks(model, ZooTaskSizes(n_multihop=args.n_multihop, seed=args.task_seed,
                                              reserve=args.max_new_tokens, **chain))
    table, scores_path = _cli.load_scores(args)
    ks = args.ks or _cli.feasible_ks(DEFAULT_KS, args.controls, facts, table,
                                     threshold=args.threshold)
    masks = _cli.control_masks(ks, args.controls) + list(args.mask)
    conditions = conditions_from_masks(model, masks, scores=table, threshold=args.threshold,
                                       seed=args.seed, n_draws=args.draws)
    cfg = cot.CotConfig(mode=args.mode, positions=args.positions,
                        max_new_tokens=args.max_new_tokens, stop=args.stop,
                        batch_size=args.batch)
    out = args.out or _cli.run_dir("cot", args.model, args.mode)
    meta = _cli.launch(args, argv, settings, module="analyses.cot", out=out,
                       units=cot.sweep_units(tasks, conditions),
                       meta=_cli.metadata(args, model, argv))
    if meta is None:  # --dry-run
        return 0
    identity = {"model": args.model, "weights": weights_fingerprint(model)}
    result = cot.compute_cot(model, tasks, conditions, cfg, out_dir=out, identity=identity,
                             progress=not args.quiet, shard=args.shard)
    if args.shard != (0, 1):
        print(f"shard {args.shard[0]}/{args.shard[1]} written to {out}; run the command "
              "without --shard once every shard is done to write the result")
        return 0

    config = {"model": args.model, "scores": str(scores_path), "score": args.score,
              "seed": args.seed, "draws": args.draws, "threshold": args.threshold,
              "items": None if args.items is None else str(args.items),
              "templates": {t.name: t.template for t in tasks},
              "match": {t.name: t.match for t in tasks}, "shape": [facts.n_layers, facts.n_heads]}
    result.save(out, meta=meta, config=config, scores=table,
                n_items={t.name: len(t.items) for t in tasks})
    figures = {"cot": plotting.plot_cot(result, title=f"{args.model}: accuracy under "
                                        f"{args.mode} masking")}
    specificity = plotting.plot_specificity(result, title=f"{args.model}: specificity of "
                                            f"{args.mode} masking")
    if specificity is not None:
        figures["specificity"] = specificity
    _cli.save_figures(out, figures, self_contained=args.self_contained_figures)
    mean, std = result.by_group()
    groups = result.group_names()

    print(f"{args.mode} masking at {args.positions} positions; results in {out}")
    print(f"{'condition':<14} " + " ".join(f"{t:>17}" for t in result.tasks))
    for i, g in enumerate(groups):
        cells = [f"{mean[i, t]:.3f}" + (f" +-{std[i, t]:.3f}" if std[i, t] else "")
                 for t in range(len(result.tasks))]
        print(f"{g:<14} " + " ".join(f"{c:>17}" for c in cells))
    spec = result.specificity()
    if spec is not None:
        print(f"\naccuracy drop vs none ({spec['level']:.0%} bootstrap intervals over draws and "
              f"items): retrieval = {', '.join(spec['retrieval_tasks'])}; parametric = "
              f"{', '.join(spec['parametric_tasks'])}")
        fmt = lambda r: f"{r['mean']:.3f} [{r['low']:.3f},{r['high']:.3f}]"  # noqa: E731
        print(f"{'condition':<14} {'retrieval':>21} {'parametric':>21}")
        for g, row in spec["groups"].items():
            print(f"{g:<14} {fmt(row['retrieval']):>21} {fmt(row['parametric']):>21}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return _cli.run_guarded(_run, build_parser().parse_args(argv), argv)


if __name__ == "__main__":
    raise SystemExit(main())
