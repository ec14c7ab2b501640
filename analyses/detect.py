"""Retrieval-score detection by Needle-in-a-Haystack decoding (Wu et al. 2024, section 2).

    python -m analyses.detect                                  # zoo:llama-s, a few minutes on CPU
    python -m analyses.detect --model /ckpt/llama-2-7b-80k --device auto --dtype bfloat16 \\
        --needles ../shared/data/official_niah/needles.jsonl \\
        --haystack ../shared/data/official_niah --lengths 1000 ... 80000 --n-ctx 81920
    python -m analyses.detect ... --shard 0/4 --out runs/a     # split a sweep over machines
    python -m analyses.detect --merge runs/a runs/b ... --out runs/all

Writes into --out: ``cells/`` (one file per trial, written atomically; a rerun skips finished
cells), ``result.json`` + ``arrays.npz`` (config, provenance, per-head aggregates),
``head_score.json`` (the reference's ``{"layer-head": [...]}`` format), ``trials.jsonl`` and HTML
figures; it prints the top heads.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from analyses import _cli

DEFAULT_MODEL = "zoo:llama-s"


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes I/N, got {text!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= I < N")
    return index, count


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="model spec (see rh_lens.models)")
    _cli.add_backend_args(p)
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default runs/detect/<model>)")
    p.add_argument("--lengths", type=int, nargs="+", help="context lengths in tokens "
                   "(default: 10 lengths up to the model's n_ctx)")
    p.add_argument("--depths", type=float, nargs="+", help="needle depths in percent "
                   "(default: 10 depths from 0 to 100)")
    p.add_argument("--needles", type=Path, help="needles.jsonl (needle, question, real_needle)")
    p.add_argument("--haystack", type=Path, help="folder of .txt files, or one subfolder per "
                   "needle (the reference layout); default: the zoo prose generator")
    p.add_argument("--n-needles", type=int, default=3, help="zoo needles when --needles is unset")
    p.add_argument("--score", choices=("step", "set"), default="step",
                   help="step: the reference code's score; set: the paper's formula")
    p.add_argument("--buffer", type=int, help="tokens kept for question and answer (plus the "
                   "chat template's tokens with --chat) "
                   "(default min(200, n_ctx/4))")
    p.add_argument("--max-new-tokens", type=int, help="decoding cap (default min(50, n_ctx/8))")
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk size in tokens")
    p.add_argument("--batch", type=int, default=1, help="trials of equal length per batch")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    p.add_argument("--seed", type=int, default=0, help="seed of the zoo needles and haystacks")
    p.add_argument("--shard", type=parse_shard, default=(0, 1), metavar="I/N")
    p.add_argument("--merge", type=Path, nargs="+", metavar="DIR",
                   help="combine the cells of shard directories into --out")
    p.add_argument("--device", default=None, help='"cpu", "cuda" or "auto"')
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    p.add_argument("--n-ctx", type=int, default=None, help="extend a rotary model's context")
    p.add_argument("--top", type=int, default=15, help="heads to print")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    from analyses._cli import run_guarded

    return run_guarded(_run, build_parser().parse_args(argv), argv)


def _run(args, argv) -> int:
    from rh_lens.detect import DetectConfig, DetectResult, compute_detect
    from rh_lens.models import load_model, weights_fingerprint
    from rh_lens.results import RunMetadata

    if args.merge:
        if args.out is None:
            raise ValueError("--merge needs --out")
        result, identity = DetectResult.merge(args.merge)
        identity = {k: v for k, v in identity.items() if k != "config"}
        meta = RunMetadata.collect(model_spec=identity["model"], seed=identity.get("seed"),
                                   argv=argv, extra={"merged_from": [str(d) for d in args.merge]})
        write_outputs(args.out, result, meta, identity, score=args.score, top=args.top)
        return 0

    model = load_model(args.model, device=args.device, dtype=args.dtype, n_ctx=args.n_ctx,
                       **_cli.backend_kwargs(args))
    needles, haystacks, source = _inputs(args)
    n_ctx = model.cfg.n_ctx
    buffer, max_new = _cli.sweep_buffer(model, args, n_ctx)
    lengths = args.lengths or sorted({int(x) for x in np.linspace(max(buffer + 48, n_ctx // 8),
                                                                  n_ctx, 10)})
    depths = args.depths or [float(d) for d in np.linspace(0, 100, 10)]
    cfg = DetectConfig(lengths=tuple(lengths), depths=tuple(depths), buffer=buffer,
                       max_new_tokens=max_new, chunk_size=args.chunk, chat=args.chat,
                       batch_size=args.batch)
    from analyses._cli import detect_dir

    out = args.out or detect_dir(args.model)
    identity = {
        "model": args.model,
        "shape": {"n_layers": model.cfg.n_layers, "n_heads": model.cfg.n_heads,
                  "n_kv_heads": model.cfg.n_key_value_heads or model.cfg.n_heads},
        "inputs": source,
        "needles": [vars(n) for n in needles],
        "seed": args.seed,
        "dtype": str(model.cfg.dtype),
        "weights": weights_fingerprint(model),
    }
    meta = RunMetadata.collect(model_spec=args.model, model=model, seed=args.seed, argv=argv)
    result = compute_detect(model, needles, haystacks, cfg, out_dir=out, shard=args.shard,
                            identity=identity, progress=not args.quiet)
    if args.shard != (0, 1):
        done = len(list((out / "cells").glob("*.json")))
        print(f"shard {args.shard[0]}/{args.shard[1]}: {done} cells in {out}; combine shards "
              "with --merge")
        return 0
    write_outputs(out, result, meta, identity, score=args.score, top=args.top)
    return 0


def _inputs(args):
    from rh_lens.niah import haystack_from_folder, read_needles
    from rh_lens.zoo.inputs import zoo_inputs

    if args.needles is None:
        if args.haystack is not None:
            raise ValueError("--haystack needs --needles")
        needles, haystacks = zoo_inputs(args.n_needles, seed=args.seed)
        return needles, haystacks, {"needles": "zoo held-out templates", "seed": args.seed}
    if args.haystack is None:
        raise ValueError("--needles needs --haystack (a folder of .txt files)")
    needles = read_needles(args.needles)
    if not args.haystack.is_dir():
        raise ValueError(f"haystack folder {args.haystack} does not exist")
    folders = sorted(p for p in args.haystack.iterdir() if p.is_dir())
    if folders:  # the reference layout: one haystack folder per needle, in name order
        if len(folders) != len(needles):
            raise ValueError(f"{args.haystack}: {len(needles)} needles but {len(folders)} "
                             "haystack folders (the reference layout has one per needle)")
        haystacks = [haystack_from_folder(f) for f in folders]
    else:
        haystacks = [haystack_from_folder(args.haystack)] * len(needles)
    return needles, haystacks, {"needles": str(args.needles), "haystack": str(args.haystack)}


def write_outputs(out: Path, result, meta, identity: dict, *, score: str, top: int) -> None:
    """Save the result, its figures, and print the top heads."""
    from rh_lens import plotting
    from rh_lens.heads import label

    summary = result.save(out, meta=meta, identity=identity, score=score)
    if not result.n_success:
        print("warning: no trial succeeded (ROUGE-1 recall > 0.5), so no head has a score and "
              "head_score.json is not written", file=sys.stderr)
    cfg = result.config
    table = result.mean_scores(score)
    name = identity["model"]
    figures = {
        "heatmap": plotting.plot_head_heatmap(
            np.nan_to_num(table), title=f"{name}: retrieval score ({score})",
            zmax=max(1.0, float(np.nanmax(table))) if result.n_success else 1.0),
        "niah_grid": plotting.plot_niah_grid(
            result.rouge_grid(), depths=list(cfg.depths), lengths=list(cfg.lengths),
            title=f"{name}: NIAH ROUGE-1 recall"),
        "top_heads": plotting.plot_top_heads(table, k=20,
                                             title=f"{name}: top heads ({score} score)"),
    }
    for fname, fig in figures.items():
        plotting.save_figure(fig, out / f"{fname}.html")
    print(f"{len(result.records)} trials, {result.n_success} successful "
          f"(mean ROUGE-1 recall {summary['mean_rouge1_recall'] or 0:.3f}); results in {out}")
    print(f"{'head':>8}  {score:>6}  {'active':>6}")
    freq = result.activation_frequency()
    for lay, h, s in result.ranked(score)[:top]:
        print(f"  {label((lay, h)):<{len(str(lay)) + 5}}  {s:6.3f}  {freq[lay, h]:6.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
