"""Retrieval-head properties (Wu et al.): sparse, universal, intrinsic, dynamically activated.

    python -m analyses.properties --scores ../shared/data/official_head_scores/*.json \\
        --kv-heads Mistral-7B-v0.2-hf=8 Mixtral-8x7B-v0.1=8 Yi-6B-200K=4 --out runs/props
    python -m analyses.properties --scores runs/detect/zoo-llama-s runs/detect/zoo-llama-s-long \\
        --out runs/props-zoo

Each input is an rh_lens detection directory or a reference-format ``head_score.json``.  Writes
into --out: ``summary.json``, ``table.txt`` (the printed table) and HTML figures.  ``summary.json``:

    {"threshold", "always_on_level", "topk", "bin_labels",
     "models": {name: {"n_layers", "n_heads", "n_trials" (successful = scored trials),
                       "retrieval_heads": [[layer, head, mean_score], ...] (highest first),
                       "share_retrieval", "bins": {label: share}, "always_on": [[layer, head]],
                       "always_on_at_level", "context_dependent", "retrieval_per_layer",
                       "n_kv_heads", "n_trials_run", "n_silent_trials" (trials in which
                       no head copied), "source", "score",
                       "groups": {...} or null (GQA models), "switch_on": [...] or null}},
     "pairs": [{"a", "b", "pearson", "spearman", "topk_jaccard": {K: J}, "retrieval_jaccard"}],
     "not_compared": [{"a", "b", "reason"}]}

Only same-shape models are paired.  null stands for an undefined value: a correlation of a
constant score map, a top-K Jaccard with K above the number of heads.
"""

import argparse
import math
import re
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from rh_lens.heads import THRESHOLD
    from rh_lens.properties import ALWAYS_ON_LEVEL, TOPK

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scores", type=Path, nargs="+", required=True,
                   help="rh_lens detection directories or reference-format score files")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--names", nargs="+", help="one display name per input (default: the model "
                   "spec of a directory, the stem of a file)")
    p.add_argument("--score", choices=("step", "set"), default="step",
                   help="which rh_lens score to read from directories")
    p.add_argument("--threshold", type=float, default=THRESHOLD,
                   help="a retrieval head has mean score > this")
    p.add_argument("--level", type=float, default=ALWAYS_ON_LEVEL,
                   help="a looser always-on level (frequency >= level)")
    p.add_argument("--topk", type=int, nargs="+", default=list(TOPK), help="K of top-K Jaccard")
    p.add_argument("--top", type=int, default=5, help="top heads per model in the table")
    p.add_argument("--kv-heads", nargs="+", default=[], metavar="NAME=K",
                   help="KV heads of a model whose input does not say (reference files)")
    p.add_argument("--switch-on-heads", type=int, default=10,
                   help="context-dependent heads per model in the switch-on analysis")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (ValueError, OSError) as err:  # RhLensError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2


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


def _run(args) -> int:
    from dataclasses import replace

    from rh_lens import plotting
    from rh_lens import properties as P
    from rh_lens.heads import labels
    from rh_lens.results import to_jsonable, write_json_atomic

    if any(k < 1 for k in args.topk):
        raise ValueError(f"--topk values must be >= 1, got {args.topk}")
    if args.names is not None and len(args.names) != len(args.scores):
        raise ValueError(f"{len(args.names)} --names for {len(args.scores)} --scores")
    models = [P.load_head_scores(path, name=None if args.names is None else args.names[i],
                                 score=args.score) for i, path in enumerate(args.scores)]
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
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    th, level = args.threshold, args.level
    figures = {}

    uni = P.compute_universality(models, threshold=th, level=level, top=args.top)
    acts = {m.name: P.compute_activation(m, threshold=th, level=level) for m in models}
    summary_models = {}
    lines = [uni.format_table(), ""]
    for m, row in zip(models, uni.models, strict=True):
        act, sp = acts[m.name], row.sparsity
        entry = {
            "n_layers": m.shape[0], "n_heads": m.shape[1], "n_trials": m.n_trials,
            "retrieval_heads": [list(h) for h in P.retrieval_heads(m.mean, threshold=th)],
            "share_retrieval": sp.share_retrieval, "bins": sp.bins,
            "always_on": [list(h) for h in act.always_on],
            "always_on_at_level": [list(h) for h in act.always_on_at_level],
            "context_dependent": [list(h) for h in act.context_dependent],
            "retrieval_per_layer": sp.per_layer.tolist(), "n_kv_heads": m.n_kv_heads,
            "n_trials_run": m.n_trials_run, "n_silent_trials": m.n_silent_trials,
            "source": m.source, "score": m.score,
            "groups": None, "switch_on": None,
        }
        on = " ".join(labels(act.always_on)) or "none"
        lines.append(f"{m.name}: always-on (frequency 1): {on}; >= {level}: "
                     f"{len(act.always_on_at_level)} heads; context-dependent retrieval heads: "
                     f"{len(act.context_dependent)}")
        if m.n_silent_trials:
            lines.append(f"  {m.n_silent_trials} of {m.n_trials} successful trials have no head "
                         "that copied a token, so no head reaches frequency 1")
        if m.n_kv_heads is not None and m.n_kv_heads < m.shape[1]:
            g = P.compute_groups(m.mean, m.n_kv_heads, threshold=th)
            gs = P.compute_sparsity(P.group_scores(m).mean, threshold=th)
            entry["groups"] = {
                "n_kv_heads": g.n_kv_heads, "groups_with_retrieval_heads": g.groups_hit,
                "expected_at_random": g.expected_groups_hit,
                "heads_sharing_a_group": g.shared, "expected_sharing_at_random": g.expected_shared,
                "retrieval_groups_by_mean": _group_sparsity(gs),
            }
            lines.append(f"  {m.n_kv_heads} KV groups/layer: {g.n_retrieval} retrieval heads in "
                         f"{g.groups_hit} groups ({g.expected_groups_hit:.1f} expected at random);"
                         f" {g.shared} share a group with another ({g.expected_shared:.1f} "
                         "expected)")
            figures[f"groups_{_file_name(m.name)}"] = plotting.plot_groups(
                g, title=f"{m.name}: retrieval heads per KV group")
        if m.contexts is not None:
            sw = P.compute_switch_on(m, threshold=th, max_heads=args.switch_on_heads)
            entry["switch_on"] = sw.table()
            lines.extend(_switch_on_lines(sw))
            if sw.heads:
                figures[f"switch_on_{_file_name(m.name)}"] = plotting.plot_switch_on(
                    sw, title=f"{m.name}: activation rate of context-dependent heads")
                figures[f"switch_on_grid_{_file_name(m.name)}"] = plotting.plot_switch_on_grid(
                    sw, sw.heads[0])
        summary_models[m.name] = entry

    pairs, skipped = [], []
    jac_head = " ".join(f"{'J@' + str(k):>6}" for k in args.topk)
    lines += ["", f"{'a':<22} {'b':<22} {'pearson':>7} {'spearman':>8}  {jac_head}  "
              f"{'J(>' + str(th) + ')':>8}"]
    for i, a in enumerate(models):
        for b in models[i + 1:]:
            if a.shape != b.shape:
                skipped.append({"a": a.name, "b": b.name, "reason": f"shapes {a.shape[0]}x"
                                f"{a.shape[1]} and {b.shape[0]}x{b.shape[1]} differ"})
                continue
            r = P.compute_intrinsic(a.mean, b.mean, names=(a.name, b.name), threshold=th,
                                    ks=[k for k in args.topk if k <= a.mean.size])
            jac = {k: r.topk_jaccard.get(k, math.nan) for k in args.topk}  # NaN: K > heads
            pairs.append({"a": a.name, "b": b.name, "pearson": r.pearson, "spearman": r.spearman,
                          "topk_jaccard": {str(k): v for k, v in jac.items()},
                          "retrieval_jaccard": r.retrieval_jaccard})
            lines.append(f"{a.name[:22]:<22} {b.name[:22]:<22} {r.pearson:7.3f} "
                         f"{r.spearman:8.3f}  " + " ".join(f"{v:6.2f}" if v == v else f"{'-':>6}"
                                                   for v in jac.values())
                         + f"  {r.retrieval_jaccard:8.2f}")
            stem = f"intrinsic_{_file_name(a.name)}_vs_{_file_name(b.name)}"
            figures[f"{stem}_scatter"] = plotting.plot_intrinsic(r)
            figures[f"{stem}_heatmaps"] = plotting.plot_intrinsic_heatmaps(r)
    if not pairs:
        lines.append("(no two inputs have the same shape)")
    if skipped:
        lines.append(f"{len(skipped)} pairs of different shapes are only summarised")

    corr = P.compute_correlation_matrix({m.name: m.mean for m in models})
    sparsity = {row.name: row.sparsity for row in uni.models}
    figures.update({
        "heatmaps": plotting.plot_universality(uni),
        "sparsity_bins": plotting.plot_sparsity(sparsity),
        "layer_profile": plotting.plot_layer_profile(sparsity),
        "activation": plotting.plot_activation(acts),
        "correlation_pearson": plotting.plot_correlation_matrix(corr, method="pearson"),
        "correlation_spearman": plotting.plot_correlation_matrix(corr, method="spearman"),
    })
    summary = {"threshold": th, "always_on_level": level, "topk": list(args.topk),
               "bin_labels": list(P.BIN_LABELS), "models": summary_models, "pairs": pairs,
               "not_compared": skipped}
    write_json_atomic(out / "summary.json", to_jsonable(summary, nan_to_none=True), indent=1)
    for name, fig in figures.items():
        plotting.save_figure(fig, out / f"{name}.html")
    text = "\n".join(lines)
    (out / "table.txt").write_text(text + "\n", encoding="utf-8")
    print(text)
    print(f"\nsummary.json, table.txt and {len(figures)} figures in {out}")
    return 0


def _group_sparsity(result) -> dict:
    """Group-level sparsity (a group's score is the mean of its query heads' scores)."""
    return {"n": result.n_retrieval, "share": result.share_retrieval, "bins": result.bins}


def _switch_on_lines(sw) -> list[str]:
    if not sw.heads:
        return ["  no context-dependent retrieval heads"]
    out = [f"  {'head':<8} {'score':>5} {'freq':>5}  factor (eta2)     on when            "
           "off when"]
    for row in sw.table():
        (on_v, on_r), (off_v, off_r) = row["on_when"], row["off_when"]
        eta = row["eta2"][row["factor"]]
        eta_text = "-" if eta is None else f"{eta:.2f}"
        out.append(f"  L{row['layer']}H{row['head']:<5} {row['mean_score']:5.2f} "
                   f"{row['frequency']:5.2f}  {row['factor']:<6} ({eta_text})     "
                   f"{row['factor']} {on_v:g}: {on_r:.2f}   {row['factor']} {off_v:g}: "
                   f"{off_r:.2f}")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
