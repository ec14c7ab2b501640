"""Detection in float32 vs bfloat16 vs float16 on the same sweep (rh_lens.precision).

    python -m analyses.precision --model zoo:llama-s           # float32, bfloat16, float16
    python -m analyses.precision --model zoo:gpt2-s --dtypes float32 bfloat16 \\
        --lengths 128 256 --depths 0 50 100

The sweep options are ``analyses.detect``'s.  The first ``--dtypes`` is the reference; every
dtype is compared with it: agreement of the per-step top-1 key positions (over the steps both
decoded, and over the steps whose inputs are still identical), the largest and mean absolute
difference of the per-head scores, the Jaccard index of the retrieval-head sets (score >
--threshold) and of the top-K sets, and the share of trials generating the same tokens.

Writes into --out: ``sweeps/<dtype>/`` (each dtype's detection cells; a rerun reads them back),
``result.json`` + ``arrays.npz`` (the comparison, per-dtype score tables, provenance) and
``precision.html``; prints the table.
"""

import argparse

from analyses import _cli


def build_parser() -> argparse.ArgumentParser:
    from rh_lens.heads import THRESHOLD
    from rh_lens.models import DTYPES
    from rh_lens.precision import DEFAULT_DTYPES, TOP_K

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    _cli.add_model_args(p, loading=False)
    p.add_argument("--n-ctx", type=int, default=None, help="extend a rotary model's context")
    p.add_argument("--dtypes", nargs="+", default=list(DEFAULT_DTYPES), metavar="DTYPE",
                   help=f"dtypes to run, the first the reference: {', '.join(sorted(DTYPES))} "
                   f"(default {' '.join(DEFAULT_DTYPES)})")
    _cli.add_run_args(p, out_help="output directory (default runs/precision/<model>)")
    _cli.add_sweep_args(p, points=10)
    p.add_argument("--score", choices=("step", "set"), default="step",
                   help="step: the reference code's score; set: the paper's formula")
    p.add_argument("--threshold", type=float, default=THRESHOLD,
                   help="retrieval heads: mean score above this")
    p.add_argument("--top-k", type=_cli.positive_int("--top-k"), default=TOP_K,
                   help="size of the top-K sets compared")
    return p


def _run(args, argv) -> int:
    from rh_lens import models
    from rh_lens.precision import check_dtypes, compute_precision

    dtypes = check_dtypes(args.dtypes)  # refused before anything is loaded
    engine = _cli.backend_kwargs(args)

    def load(dtype: str):
        return models.load_model(args.model, device=args.device, dtype=dtype, n_ctx=args.n_ctx,
                                 **engine)

    first = load(dtypes[0])
    needles, haystacks, source = _cli.niah_inputs(args.needles, args.haystack,
                                                  n_needles=args.n_needles, seed=args.seed)
    cfg = _cli.sweep_config(first, args, points=10, needles=needles)
    out = args.out or _cli.run_dir("precision", args.model)
    meta = _cli.metadata(args, first, argv)
    result = compute_precision(
        lambda dtype: first if dtype == dtypes[0] else load(dtype), needles, haystacks, cfg,
        dtypes=dtypes, score=args.score, threshold=args.threshold, k=args.top_k, out_dir=out,
        identity=lambda model: _cli.sweep_identity(model, args.model, needles, source,
                                                   seed=args.seed),
        progress=not args.quiet)
    write_outputs(out, result, meta, {"model": args.model, "inputs": source, "seed": args.seed},
                  self_contained=args.self_contained_figures)
    return 0


def print_table(result) -> None:
    """One line per dtype: agreement with the reference, score differences, head sets."""
    print(f"{'dtype':<9} {'success':>7} {'positions':>9} {'same-in':>8} {'tokens':>6} "
          f"{'max|d|':>7} {'mean|d|':>8} {'RH J':>5} {f'top{result.k} J':>7} {'RH':>3} "
          f"{'s':>6}")
    fmt = lambda v, w, p: f"{'-':>{w}}" if v != v else f"{v:{w}.{p}f}"  # noqa: E731 (NaN: -)
    for r in result.rows:
        print(f"{r.dtype:<9} {r.n_success:>3}/{r.n_trials:<3} {fmt(r.position_agreement, 9, 4)} "
              f"{fmt(r.same_input_agreement, 8, 4)} {fmt(r.token_agreement, 6, 3)} "
              f"{fmt(r.max_abs_score_diff, 7, 4)} {fmt(r.mean_abs_score_diff, 8, 5)} "
              f"{fmt(r.retrieval_jaccard, 5, 2)} {fmt(r.topk_jaccard, 7, 2)} "
              f"{'-' if r.n_retrieval is None else r.n_retrieval:>3} {r.seconds:6.1f}")


def write_outputs(out, result, meta, config: dict, *, self_contained: bool = False) -> None:
    """Save the result and its figure, and print the table."""
    from rh_lens import plotting

    result.save(out, meta=meta, config=config)
    name = config["model"]
    _cli.save_figures(out, {"precision": plotting.plot_precision(
        result, title=f"{name}: detection in {', '.join(result.dtypes)}")},
        self_contained=self_contained)
    cfg = result.config
    print(f"{name}: {result.rows[0].n_trials} trials ({len(cfg.lengths)} lengths x "
          f"{len(cfg.depths)} depths x needles) per dtype, compared with {result.reference} "
          f"({result.score} score, threshold {result.threshold:g}); results in {out}")
    print_table(result)


def main(argv: list[str] | None = None) -> int:
    return _cli.run_guarded(_run, build_parser().parse_args(argv), argv)


if __name__ == "__main__":
    raise SystemExit(main())
