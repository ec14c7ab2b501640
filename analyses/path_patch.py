"""Activation patching and path patching of retrieval heads on clean/corrupted NIAH pairs.

    python -m analyses.path_patch --scores runs/detect/zoo-llama-s --out runs/path_patch/llama-s
    python -m analyses.path_patch --model zoo:llama-s --senders heads:2.3,3.1 --receivers all \\
        --components q,k,v,direct --positions needle --out runs/path_patch/llama-s-needle

Pairs: the zoo's held-out needles (``rh_lens.zoo.inputs.zoo_inputs``), each answer swapped for
another answer of the same template with equal token length (``rh_lens.zoo.inputs.zoo_pairs``).
Metric: logit difference of the clean vs corrupted answer token at the last prompt position.
Senders and receivers: head sets of ``rh_lens.heads`` (``top:K``, the K best heads of --scores, a
detection directory or a reference ``head_score.json``; ``heads:L.H,...``, ...); receivers also
``all``; ``random:K`` and ``matched:K`` (``bottom:K`` too) as in ``analyses.ablate``, with
``--draws D`` seeded draws.  Besides each sender alone through each receiver, the senders are
patched as one set into the receivers (``rh_lens.patching.draws``): the set's effect with a
bootstrap interval over draws and pairs, so that ``--senders top:K`` can be set against
``--senders random:K --draws D`` or ``matched:K``.  Writes into --out: ``result.json`` +
``arrays.npz`` (``set_patching`` in the summary, ``set_*`` arrays), ``activation_patching.html``
(layer x head) and ``path_patching.html`` (sender x receiver, the first draw's), and prints the
strongest heads and paths and the set effect.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from analyses import _cli
from rh_lens.heads import SPEC_HELP

COMPONENTS = ("q", "k", "v", "direct")


def parse_components(text: str) -> tuple[str, ...]:
    items = tuple(c.strip() for c in text.split(",") if c.strip())
    bad = [c for c in items if c not in COMPONENTS]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"--components takes a list of {','.join(COMPONENTS)}, "
                                         f"got {text!r}")
    return items


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    _cli.add_model_args(p)
    _cli.add_run_args(p, out_help="output directory (default runs/path_patch/<model>)")
    _cli.add_scores_args(p, threshold=False, scores_help="detection directory or "
                         "head_score.json (default: analyses.detect's default output for "
                         "--model, when present) (needed by top:K, bottom:K and random:K)")
    p.add_argument("--senders", default="top:8",
                   help=f"a head set: {SPEC_HELP} except all (default top:8)")
    p.add_argument("--receivers", default="top:8",
                   help=f"a head set: {SPEC_HELP} (default top:8)")
    p.add_argument("--components", type=parse_components, default=COMPONENTS,
                   help="receiver inputs: q,k,v,direct (default all four)")
    p.add_argument("--n-pairs", type=int, default=8, help="clean/corrupted pairs")
    p.add_argument("--seed", type=int, default=0, help="seed of the needles and alternatives")
    p.add_argument("--context-length", type=int, help="prompt tokens (default 3/4 of n_ctx)")
    p.add_argument("--buffer", type=int, help="tokens kept for the question (default "
                   "min(200, n_ctx/4))")
    p.add_argument("--depths", type=float, nargs="+", help="needle depths in percent, cycled "
                   "over pairs (default: evenly from 10 to 90)")
    p.add_argument("--positions", default="answer", choices=("answer", "needle", "all"),
                   help="where senders are patched: the last position (answer), the answer "
                   "inside the context (needle), or everywhere")
    p.add_argument("--direction", default="denoise", choices=("denoise", "noise"),
                   help="denoise: clean into corrupted; noise: corrupted into clean")
    p.add_argument("--draws", type=_cli.positive_int("--draws"), default=1,
                   help="seeded draws of a random:K or matched:K --senders / --receivers (each "
                   "draw's senders patched as a set; default 1)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--top", type=int, default=10, help="heads and paths to print")
    return p


def _run(args, argv) -> int:
    from rh_lens import patching as P
    from rh_lens.heads import parse_spec
    from rh_lens.models import model_facts
    from rh_lens.zoo.inputs import zoo_pairs

    if args.n_pairs < 1:
        raise ValueError(f"--n-pairs must be positive, got {args.n_pairs}")
    if args.draws > 1 and not any(parse_spec(s).drawn for s in (args.senders, args.receivers)):
        raise ValueError(f"--draws {args.draws}: neither --senders {args.senders} nor "
                         f"--receivers {args.receivers} is drawn (random:K or matched:K)")
    model = _cli.load_model(args)
    facts = model_facts(model)
    scores, scores_path = _cli.load_scores(args, needed=False, default_if_present=True,
                                           shape=(facts.n_layers, facts.n_heads))
    shape = dict(n_layers=facts.n_layers, n_heads=facts.n_heads, n_kv_heads=facts.n_kv_heads)
    sender_sets = _cli.select_head_sets(args.senders, scores=scores, shape=shape,
                                        seed=args.seed, what="--senders", n_draws=args.draws)
    receiver_sets = _cli.select_head_sets(args.receivers, scores=scores, shape=shape,
                                          seed=args.seed, what="--receivers", allow_all=True,
                                          n_draws=args.draws)
    senders = sender_sets[0]
    receiver_sets = [P.head_receivers(heads, args.components) for heads in receiver_sets]
    receivers = receiver_sets[0]
    buffer = args.buffer if args.buffer is not None else min(200, facts.n_ctx // 4)
    context_length = args.context_length or facts.n_ctx * 3 // 4
    pairs = zoo_pairs(model, args.n_pairs, seed=args.seed, context_length=context_length,
                      buffer=buffer, depths=args.depths)
    cfg = P.PatchConfig(positions=args.positions, direction=args.direction,
                        batch_size=args.batch_size)
    act = P.compute_activation_patching(model, pairs, cfg, progress=not args.quiet)
    path = P.compute_path_patching(model, pairs, senders, receivers, cfg,
                                   progress=not args.quiet)
    if len(receiver_sets) != len(sender_sets):
        receiver_sets = receiver_sets[:1] * len(sender_sets)
    # a set's paths start at receivers after its earliest sender; without any there is no path
    reading = [[r for r in into if r.reads_layer(model) > min(layer for layer, _ in heads)]
               for heads, into in zip(sender_sets, receiver_sets, strict=True)]
    sets = (P.compute_set_patching(model, pairs, sender_sets, reading, cfg)
            if all(reading) else None)
    out = args.out or _cli.run_dir("path_patch", args.model)
    config = {
        "model": args.model, "scores": None if scores_path is None else str(scores_path),
        "score": args.score, "senders": args.senders, "receivers": args.receivers,
        "components": list(args.components), "n_pairs": args.n_pairs, "seed": args.seed,
        "draws": args.draws, "context_length": context_length, "buffer": buffer,
        "depths": args.depths,
        **cfg.to_dict(),
        "pairs": [{"n_tokens": p.n_tokens, "clean_answer": model.to_string([p.clean_answer]),
                   "corrupted_answer": model.to_string([p.corrupted_answer])} for p in pairs],
    }
    meta = _cli.metadata(args, model, argv)
    write_outputs(out, act, path, config, meta, name=args.model, top=args.top, sets=sets,
                  self_contained=args.self_contained_figures)
    return 0


def write_outputs(out: Path, act, path, config: dict, meta, *, name: str, top: int, sets=None,
                  self_contained: bool = False) -> None:
    """Save the result and its figures, and print the strongest heads and paths and the set
    effect."""
    from rh_lens import plotting
    from rh_lens.patching import PatchingResult

    result = PatchingResult(act, path, sets)
    summary = result.save(out, meta=meta, config=config, top=top, seed=config.get("seed", 0))
    figures = {
        "activation_patching": plotting.plot_activation_patching(
            act, title=f"{name}: activation patching"),
        "path_patching": plotting.plot_path_patching(path, title=f"{name}: path patching"),
    }
    _cli.save_figures(out, figures, self_contained=self_contained)
    clean, corrupted = act.clean_logit_diff, act.corrupted_logit_diff
    print(f"{clean.size} pairs: clean logit diff {clean.mean():.3f}, corrupted "
          f"{corrupted.mean():.3f} ({summary['pairs_discriminated']:.0%} of pairs "
          f"discriminated); results in {out}")
    if not np.isfinite(act.effect).any():
        print("warning: clean and corrupted runs do not differ; effects are undefined",
              file=sys.stderr)
        return
    print("heads by activation-patching effect:")
    for head, value in result.top_heads()[:top]:
        print(f"  {head:<10} {value:+.3f}")
    print("paths by effect (sender -> receiver):")
    for edge, value in result.top_paths()[:top]:
        print(f"  {edge:<22} {value:+.3f}")
    if sets is not None:
        e = summary["set_patching"]["effect"]
        print(f"senders {config['senders']} as one set into the receivers: effect "
              f"{e['mean']:+.3f} [{e['low']:+.3f}, {e['high']:+.3f}] ({e['level']:.0%} "
              f"bootstrap over {sets.n_draws} draw{'s' * (sets.n_draws > 1)} and "
              f"{clean.size} pairs)")


def main(argv: list[str] | None = None) -> int:
    return _cli.run_guarded(_run, build_parser().parse_args(argv), argv)


if __name__ == "__main__":
    raise SystemExit(main())
