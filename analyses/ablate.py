"""Head-level ablation: NIAH with top retrieval heads or random heads masked (Wu et al., Fig. 7).

    python -m analyses.ablate                      # zoo:llama-s, scores of analyses.detect's run
    python -m analyses.ablate --model /ckpt/mistral --scores runs/detect/mistral --ks 10 20 50 \\
        --draws 3 --mode uniform --positions decode --out runs/ablate/mistral --device auto
    python -m analyses.ablate --scores head_score.json --mask heads:16.19,11.15 --mask random:2 \\
        --mode mean --positions all

Masks (repeatable): ``top:K`` (the K highest retrieval scores), ``random:K`` (``--draws`` seeded
draws of K heads that are not retrieval heads, the same draw for every cell), ``heads:L.H,...``,
``groups:L.G,...`` (whole key/value groups); ``--ks K ...`` adds ``top:K`` and ``random:K`` for
each K (the curve).  Without masks the curve runs for K in 1, 2, 4, 8, 16 (as far as the model has
heads).  Modes and positions: see ``rh_lens.ablation``.

Writes into --out: ``conditions/<name>/cells/`` (one record per trial, written atomically; a
rerun skips finished cells; ``condition.json`` holds the masked heads), ``result.json`` +
``arrays.npz`` (mean ROUGE-1 recall and success rate per condition, depth x length grids, the
K-curve, error types, where the top retrieval heads look), ``summary.json``, ``trials.jsonl`` and
HTML figures (``k_curve``, ``k_curve_success``, ``grids``, ``errors``, ``failure_attention``).
"""

import argparse
from pathlib import Path

from analyses import _cli
from rh_lens.heads import SPEC_HELP, THRESHOLD

DEFAULT_MODEL = "zoo:llama-s"
DEFAULT_KS = (1, 2, 4, 8, 16)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="model spec (see rh_lens.models)")
    _cli.add_backend_args(p)
    p.add_argument("--scores", type=Path, help="detection directory (python -m analyses.detect) "
                   "or reference-format head_score.json; default: analyses.detect's default "
                   "output for --model")
    p.add_argument("--score", choices=("step", "set"), default="step",
                   help="which score of a detection directory ranks the heads")
    p.add_argument("--mask", action="append", default=[], metavar="SPEC",
                   help=f"{SPEC_HELP} (repeatable; see rh_lens.heads)")
    p.add_argument("--ks", type=int, nargs="+", help="add top:K and random:K for each K")
    p.add_argument("--mode", choices=("uniform", "zero", "mean", "resample"), default="uniform",
                   help="uniform: the paper's zero query; zero, mean or resample the head output")
    p.add_argument("--positions", choices=("decode", "all"), default="decode",
                   help="decode: only steps that predict a token (the paper); all: prefill too")
    p.add_argument("--out", type=Path, help="output directory (default runs/ablate/<model>-"
                   "<mode>-<positions>)")
    p.add_argument("--lengths", type=int, nargs="+", help="context lengths in tokens "
                   "(default: 5 lengths up to the model's n_ctx)")
    p.add_argument("--depths", type=float, nargs="+", help="needle depths in percent "
                   "(default: 0 25 50 75 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-K draws")
    p.add_argument("--draws", type=int, default=3, help="random draws per K")
    p.add_argument("--threshold", type=float, default=THRESHOLD,
                   help="retrieval heads (score > this) are never drawn for random-K")
    p.add_argument("--exclude", default="", metavar="L.H,...",
                   help="further heads never drawn for random-K")
    p.add_argument("--watch", type=int, default=5,
                   help="top retrieval heads whose attention the error analysis reads")
    p.add_argument("--needles", type=Path, help="needles.jsonl (needle, question, real_needle)")
    p.add_argument("--haystack", type=Path, help="folder of .txt files, or one subfolder per "
                   "needle; default: the zoo prose generator")
    p.add_argument("--n-needles", type=int, default=3, help="zoo needles when --needles is unset")
    p.add_argument("--needle-seed", type=int, default=0, help="seed of the zoo needles")
    p.add_argument("--buffer", type=int, help="tokens kept for question and answer (plus the "
                   "chat template's tokens with --chat) (default min(200, n_ctx/4))")
    p.add_argument("--max-new-tokens", type=int, help="decoding cap (default min(50, n_ctx/8))")
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk size in tokens")
    p.add_argument("--batch", type=int, default=1, help="trials of equal length per batch")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    p.add_argument("--n-reference", type=int, default=8, help="mode mean: reference prompts")
    p.add_argument("--reference-length", type=int, default=128,
                   help="mode mean: tokens per reference prompt")
    p.add_argument("--device", default=None, help='"cpu", "cuda" or "auto"')
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    p.add_argument("--n-ctx", type=int, default=None, help="extend a rotary model's context")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    from analyses._cli import run_guarded

    return run_guarded(_run, build_parser().parse_args(argv), argv)


def _run(args, argv) -> int:
    import numpy as np

    from analyses._cli import detect_dir, slug
    from analyses.detect import _inputs
    from rh_lens.ablation import AblationConfig, compute_ablation, conditions_from_masks
    from rh_lens.detect import DetectConfig
    from rh_lens.heads import parse_heads, select_heads
    from rh_lens.models import load_model, model_facts, weights_fingerprint
    from rh_lens.properties import load_head_scores
    from rh_lens.results import RunMetadata

    model = load_model(args.model, device=args.device, dtype=args.dtype, n_ctx=args.n_ctx,
                       **_cli.backend_kwargs(args))
    facts = model_facts(model)
    n_total = facts.n_layers * facts.n_heads
    exclude = parse_heads(args.exclude) if args.exclude.strip() else ()
    masks = list(args.mask)
    ks = args.ks
    if not masks and not ks:
        ks = [k for k in DEFAULT_KS if k <= n_total]
    needs_scores = bool(ks) or any(m.startswith(("top:", "random:")) for m in masks)
    scores_path = args.scores or detect_dir(args.model)
    table = None
    if args.scores is not None or needs_scores:
        if not scores_path.exists():
            raise ValueError(f"no retrieval scores at {scores_path}: run python -m analyses.detect "
                             f"--model {args.model} first, or pass --scores")
        table = load_head_scores(scores_path, score=args.score).mean
    if ks:
        n_pool = sum(1 for lay in range(facts.n_layers) for h in range(facts.n_heads)
                     if table[lay, h] <= args.threshold and (lay, h) not in exclude)
        if args.ks is None:  # the default curve: only the K this model can give
            ks = [k for k in ks if k <= n_pool]
        masks += [f"top:{k}" for k in ks] + [f"random:{k}" for k in ks]
    conditions = conditions_from_masks(model, masks, scores=table, threshold=args.threshold,
                                       exclude=exclude, seed=args.seed, n_draws=args.draws)
    watch = () if table is None or not args.watch else select_heads(
        f"top:{min(args.watch, n_total)}", n_layers=facts.n_layers, n_heads=facts.n_heads,
        scores=table)[0]

    ns = argparse.Namespace(needles=args.needles, haystack=args.haystack,
                            n_needles=args.n_needles, seed=args.needle_seed)
    needles, haystacks, source = _inputs(ns)
    n_ctx = facts.n_ctx
    buffer, max_new = _cli.sweep_buffer(model, args, n_ctx)
    lengths = args.lengths or sorted({int(x) for x in np.linspace(max(buffer + 48, n_ctx // 8),
                                                                  n_ctx, 5)})
    depths = args.depths or [0.0, 25.0, 50.0, 75.0, 100.0]
    sweep = DetectConfig(lengths=tuple(lengths), depths=tuple(float(d) for d in depths),
                         buffer=buffer, max_new_tokens=max_new, chunk_size=args.chunk,
                         chat=args.chat, batch_size=args.batch)
    cfg = AblationConfig(sweep, mode=args.mode, positions=args.positions,
                         n_reference=args.n_reference, reference_length=args.reference_length)
    out = args.out or Path("runs") / "ablate" / f"{slug(args.model)}-{args.mode}-{args.positions}"
    identity = {
        "model": args.model,
        "shape": {"n_layers": facts.n_layers, "n_heads": facts.n_heads,
                  "n_kv_heads": facts.n_kv_heads},
        "inputs": source,
        "needles": [vars(n) for n in needles],
        "dtype": str(model.cfg.dtype),
        "weights": weights_fingerprint(model),
    }
    meta = RunMetadata.collect(model_spec=args.model, model=model, seed=args.seed, argv=argv)
    result = compute_ablation(model, needles, haystacks, conditions, cfg, watch=watch,
                              out_dir=out, identity=identity, progress=not args.quiet)
    settings = {"scores": None if table is None else str(scores_path), "score": args.score,
                "seed": args.seed, "draws": args.draws, "threshold": args.threshold,
                "exclude": [list(h) for h in exclude]}
    write_outputs(out, result, meta, {**identity, **settings}, table)
    return 0


def write_outputs(out: Path, result, meta, identity: dict, scores) -> None:
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
    for fname, fig in figures.items():
        plotting.save_figure(fig, out / f"{fname}.html")
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


if __name__ == "__main__":
    raise SystemExit(main())
