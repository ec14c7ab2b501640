"""Retrieval-head properties (Wu et al.): sparse, universal, intrinsic, dynamically activated.

    python -m analyses.properties --scores ../shared/data/official_head_scores/*.json \\
        --kv-heads Mistral-7B-v0.2-hf=8 Mixtral-8x7B-v0.1=8 Yi-6B-200K=4 --out runs/props
    python -m analyses.properties --scores runs/detect/zoo-llama-s runs/detect/zoo-llama-s-long \\
        --out runs/props-zoo

Each input is an rh_lens detection directory or a reference-format ``head_score.json``.  Writes
into --out: ``summary.json`` (its fields: :mod:`rh_lens.properties.summary`), ``table.txt`` (the
printed table) and HTML figures.
"""

import argparse
import re
from pathlib import Path

from analyses import _cli


def build_parser() -> argparse.ArgumentParser:
    from rh_lens.properties import ALWAYS_ON_LEVEL, THRESHOLD, TOPK
    from rh_lens.properties.stability import THRESHOLDS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scores", type=Path, nargs="+", required=True,
                   help="rh_lens detection directories or reference-format score files")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    _cli.add_figure_args(p)
    p.add_argument("--names", nargs="+", help="one display name per input (default: the model "
                   "spec of a directory, the stem of a file)")
    p.add_argument("--score", choices=("step", "set", "mass"), default="step",
                   help="which rh_lens score to read from directories (mass: attention on the "
                   "answer span, when detection ran it); a directory's other scores (set, "
                   "mass, qr) are compared with it in a table of the scores of one model")
    p.add_argument("--threshold", type=float, default=THRESHOLD,
                   help="a retrieval head has mean score > this")
    p.add_argument("--level", type=float, default=ALWAYS_ON_LEVEL,
                   help="a looser always-on level (frequency >= level)")
    p.add_argument("--topk", type=int, nargs="+", default=list(TOPK), help="K of top-K Jaccard")
    p.add_argument("--top", type=int, default=5, help="top heads per model in the table")
    p.add_argument("--kv-heads", nargs="+", default=[], metavar="NAME=K",
                   help="KV heads of a model whose input does not say (reference files)")
    p.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS),
                   help="thresholds of the retrieval-head count sweep")
    p.add_argument("--stability-k", type=int, default=10,
                   help="top-K set whose stability over the number of trials is measured")
    p.add_argument("--stability-draws", type=int, default=100,
                   help="bootstrap resamples per trial count in the stability curve")
    p.add_argument("--seed", type=int, default=0, help="seed of the stability resamples")
    p.add_argument("--switch-on-heads", type=int, default=10,
                   help="context-dependent heads per model in the switch-on analysis")
    return p


def main(argv: list[str] | None = None) -> int:
    return _cli.run_guarded(_run, build_parser().parse_args(argv), argv)


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def _kv_heads(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        name, sep, k = item.rpartition("=")
        if not sep or not name or not k.isdigit():
            raise ValueError(f"--kv-heads takes NAME=K, got {item!r}")
        out[name] = int(k)
    return out


def _run(args, argv) -> int:
    from dataclasses import replace

    from rh_lens import plotting
    from rh_lens import properties as P
    from rh_lens.properties import compute_property_summary

    if args.names is not None and len(args.names) != len(args.scores):
        raise ValueError(f"{len(args.names)} --names for {len(args.scores)} --scores")
    if any(k < 1 for k in args.topk):
        raise ValueError(f"--topk values must be >= 1, got {args.topk}")
    def load(i, path, shape=None):
        return P.load_head_scores(path, name=None if args.names is None else args.names[i],
                                  score=args.score, shape=shape)

    # QRHead head sets carry no shape: they take the first score file's
    is_set = [Path(p).suffix in (".yaml", ".yml") for p in args.scores]
    loaded = {i: load(i, p) for i, p in enumerate(args.scores) if not is_set[i]}
    shape = next(iter(loaded.values())).shape if loaded else None
    models = [loaded[i] if i in loaded else load(i, p, shape) for i, p in enumerate(args.scores)]
    seen: dict[str, str] = {}
    for m in models:
        if m.name in seen or _file_name(m.name) in map(_file_name, seen):
            raise ValueError(f"two inputs are named {m.name!r} ({seen.get(m.name)} and "
                             f"{m.source}); give --names")
        seen[m.name] = m.source
    kv = _kv_heads(args.kv_heads)
    unknown = sorted(set(kv) - set(seen))
    if unknown:
        raise ValueError(f"--kv-heads names no input: {unknown}; inputs: {sorted(seen)}")
    models = [replace(m, n_kv_heads=kv[m.name]) if m.name in kv else m for m in models]
    result = compute_property_summary(models, threshold=args.threshold, level=args.level,
                                      topk=args.topk, top=args.top,
                                      switch_on_heads=args.switch_on_heads,
                                      thresholds=args.thresholds, stability_k=args.stability_k,
                                      stability_draws=args.stability_draws, seed=args.seed)
    result.save(args.out)
    figures = plotting.plot_property_summary(result, file_name=_file_name)
    _cli.save_figures(args.out, figures, self_contained=args.self_contained_figures)
    print(result.text)
    print(f"\nsummary.json, table.txt and {len(figures)} figures in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
