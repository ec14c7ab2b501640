"""When retrieval heads form: detection, NIAH accuracy and induction scores across checkpoints.

    python -m rh_lens.zoo.training.train llama-s --save-every 250 --no-eval   # the series
    python -m analyses.dynamics --series zoo:llama-s --every 250
    python -m analyses.dynamics --series runs/a/step-1000 runs/a/step-2000 ...   # directories
    python -m analyses.dynamics --series EleutherAI/pythia-160m \\
        --revisions step1000 step2000 step4000 --device auto
    python -m analyses.dynamics ... --shard 0/4 --out runs/a   # split the checkpoints
    python -m analyses.dynamics --series ... --merge runs/a runs/b ... --out runs/all

Writes into --out: one detection directory per checkpoint (``conditions/step-SSSSSS``, cells
written as they finish), one record per finished checkpoint (``cells/``; a rerun skips those),
``result.json`` + ``arrays.npz`` (per-head trajectories, NIAH accuracy, first crossings) and
HTML figures; it prints the trajectory and each final retrieval head's onsets.
"""

import argparse
import sys
from pathlib import Path

from analyses import _cli


def build_parser() -> argparse.ArgumentParser:
    from rh_lens.dynamics import INDUCTION_THRESHOLD
    from rh_lens.heads import THRESHOLD
    from rh_lens.induction import InductionConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--series", nargs="+", required=True, metavar="SPEC",
                   help="zoo:NAME (a training run saved with --save-every), model directories "
                        "(or one folder of them), or a Hugging Face name with --revisions")
    p.add_argument("--revisions", nargs="+", metavar="REV",
                   help="revisions of the Hugging Face name (step1000 ...)")
    p.add_argument("--run-dir", type=Path, help="zoo:NAME's training run directory "
                   "(default runs/zoo/NAME)")
    p.add_argument("--every", type=int, help="keep the checkpoints at multiples of this many "
                   "steps (and the last)")
    _cli.add_backend_args(p)
    p.add_argument("--device", default=None, help='"cpu", "cuda" or "auto" (default cpu)')
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    _cli.add_run_args(p, out_help="output directory (default runs/dynamics/<series>)")
    _cli.add_sweep_args(p, points=10)
    default = InductionConfig()
    p.add_argument("--induction-len", type=int, default=default.seq_len,
                   help="random tokens repeated once for the induction scores")
    p.add_argument("--induction-batch", type=int, default=default.batch)
    p.add_argument("--score", choices=("step", "set"), default="step",
                   help="step: the reference code's score; set: the paper's formula")
    p.add_argument("--threshold", type=float, default=THRESHOLD,
                   help="a retrieval head scores above this")
    p.add_argument("--induction-threshold", type=float, default=INDUCTION_THRESHOLD,
                   help="an induction head scores above this")
    p.add_argument("--shard", type=_cli.parse_shard, default=(0, 1), metavar="I/N",
                   help="run every N-th checkpoint, from the I-th")
    p.add_argument("--merge", type=Path, nargs="+", metavar="DIR",
                   help="combine the checkpoints of shard directories into --out")
    p.add_argument("--allow-partial", action="store_true",
                   help="write the result even if some checkpoints are not finished")
    return p


def _series(args):
    from rh_lens.series import parse_series

    series = parse_series(args.series, revisions=args.revisions, run_dir=args.run_dir)
    return series.every(args.every) if args.every is not None else series


def _run(args, argv) -> int:
    from rh_lens.dynamics import DynamicsConfig, DynamicsResult, compute_dynamics
    from rh_lens.induction import InductionConfig
    from rh_lens.results import RunMetadata

    series = _series(args)
    out = args.out or _cli.run_dir("dynamics", "+".join(args.series))
    load_kwargs = {"device": args.device, "dtype": args.dtype, **_cli.backend_kwargs(args)}
    if args.merge:
        if args.out is None:
            raise ValueError("--merge needs --out")
        result = DynamicsResult.from_stores(args.merge, series=series,
                                            allow_partial=args.allow_partial)
        meta = RunMetadata.collect(model_spec=series.source, seed=args.seed, argv=argv,
                                   extra={"merged_from": [str(d) for d in args.merge]})
        return _write(out, result, meta, args)

    first = series.checkpoints[0]
    loaded = {first.label: first.load(**load_kwargs)}  # the sweep's defaults read its context

    def load(checkpoint):
        if checkpoint.label in loaded:
            return loaded.pop(checkpoint.label)
        return checkpoint.load(**load_kwargs)

    model = loaded[first.label]
    needles, haystacks, source = _cli.niah_inputs(args.needles, args.haystack,
                                                  n_needles=args.n_needles, seed=args.seed)
    cfg = DynamicsConfig(_cli.sweep_config(model, args, points=10, needles=needles),
                         InductionConfig(seq_len=args.induction_len, batch=args.induction_batch,
                                         seed=args.seed))
    meta = RunMetadata.collect(model_spec=series.source, model=model, seed=args.seed,
                               argv=argv, extra={"series": series.to_dict()})
    result = compute_dynamics(series, needles, haystacks, cfg, out_dir=out, inputs=source,
                              load=load, shard_of=args.shard, progress=not args.quiet,
                              recompute_bad_cells=args.recompute_bad_cells)
    loaded.clear()
    if args.shard != (0, 1):
        print(f"shard {args.shard[0]}/{args.shard[1]}: {len(result.steps)} of {len(series)} "
              f"checkpoints in {out}; combine shards with --merge")
        return 0
    return _write(out, result, meta, args)


def _write(out: Path, result, meta, args) -> int:
    """Save the result and its figures, print the trajectory and the onsets."""
    from rh_lens import plotting
    from rh_lens.heads import label

    if result.missing and not args.allow_partial:
        raise ValueError(f"checkpoints not finished: {', '.join(result.missing)}")
    if result.missing:
        print(f"warning: partial result, {len(result.missing)} checkpoints missing (listed in "
              "the summary)", file=sys.stderr)
    summary = result.save(out, meta=meta, score=args.score, threshold=args.threshold,
                          induction_threshold=args.induction_threshold)
    steps = list(result.steps)
    _cli.save_figures(out, {
        "retrieval_over_steps": plotting.plot_score_over_steps(
            steps, result.retrieval(args.score),
            title=f"retrieval score ({args.score}) by training step"),
        "induction_over_steps": plotting.plot_score_over_steps(
            steps, result.induction, zmax=1.0, colorbar_title="induction",
            title="induction score by training step"),
        "niah_over_steps": plotting.plot_niah_over_steps(
            steps, result.niah_accuracy, summary["n_retrieval_heads"],
            title=f"NIAH accuracy and retrieval heads (score > {args.threshold:g})"),
        "onsets": plotting.plot_onsets(
            summary["onsets"], last_step=steps[-1],
            title="first crossing: induction vs retrieval, per final retrieval head"),
    })
    print(f"{len(steps)} checkpoints; results in {out}")
    print(f"{'step':>8}  {'NIAH':>5}  {'heads':>5}")
    for step, acc, n in zip(steps, result.niah_accuracy, summary["n_retrieval_heads"],
                            strict=True):
        print(f"{step:>8}  {acc:5.2f}  {n:>5}")
    print(f"{'head':>8}  {'retrieval onset':>15}  {'induction onset':>15}  {'final':>6}")
    for onset in summary["onsets"]:
        print(f"{label(tuple(onset['head'])):>8}  {onset['retrieval_onset']!s:>15}  "
              f"{onset['induction_onset']!s:>15}  {onset['final_retrieval']:6.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return _cli.run_guarded(_run, build_parser().parse_args(argv), argv)


if __name__ == "__main__":
    raise SystemExit(main())
