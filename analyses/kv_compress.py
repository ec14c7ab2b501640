"""Key/value-cache compression by head: NIAH with full caches only for chosen key/value groups.

    python -m analyses.kv_compress --model zoo:llama-s-long --lengths 1024 --ks 1 2 4 8
    python -m analyses.kv_compress --model zoo:llama-m --scores runs/detect/zoo-llama-m

Every key/value group not kept full attends only to the first ``--sink`` tokens and the last
``--window`` (an exact mask on its attention scores, in the prefill and at every step).  For
each K of ``--ks``: ``top-K`` (the K groups whose best query head has the highest retrieval
score), ``random-K`` (``--draws`` seeded draws of K groups), ``uniform-K`` (every group windowed,
the window widened to the same memory at the longest sequence: StreamingLLM), plus ``full`` and
``window`` (K = 0).  Writes into --out: ``conditions/<policy>/cells/`` (resumable),
``summary.json`` (per policy: kept fraction, bf16 cache MiB at ``--memory-context``, ROUGE-1
recall, success rate), ``kv_curve.html`` and ``kv_curve_success.html``, and prints the table.
"""

import argparse

from analyses import _cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    _cli.add_model_args(p)
    _cli.add_run_args(p, out_help="output directory (default runs/kv_compress/<model>)")
    _cli.add_scores_args(p, scores_help="detection directory or head_score.json that ranks the "
                         "groups; default: analyses.detect's default output for --model",
                         threshold=False)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="numbers of key/value groups kept full")
    p.add_argument("--sink", type=int, default=4, help="first tokens every group keeps")
    p.add_argument("--window", type=int, default=64, help="last tokens every group keeps")
    p.add_argument("--draws", type=int, default=3, help="random draws per K")
    p.add_argument("--seed", type=int, default=0, help="seed of the random draws")
    p.add_argument("--memory-context", type=int, default=32768,
                   help="context length of the computed cache memory")
    _cli.add_sweep_args(p, points=5, needle_seed="--needle-seed")
    return p


def _run(args, argv) -> int:
    from rh_lens.kvcache import kv_policies
    from rh_lens.kvcache.sweep import compute_kv_compress, summarize
    from rh_lens.models import model_facts
    from rh_lens.results import write_json_atomic

    model = _cli.load_model(args)
    facts = model_facts(model)
    table, scores_path = _cli.load_scores(args, shape=(facts.n_layers, facts.n_heads))
    needles, haystacks, source = _cli.niah_inputs(args.needles, args.haystack,
                                                  n_needles=args.n_needles, seed=args.needle_seed)
    cfg = _cli.sweep_config(model, args, points=5, needles=needles)
    n_tokens = max(cfg.lengths) + cfg.max_new_tokens
    policies = kv_policies(table, args.ks, n_layers=facts.n_layers, n_kv_heads=facts.n_kv_heads,
                           sink=args.sink, window=args.window, n_tokens=n_tokens,
                           draws=args.draws, seed=args.seed)
    out = args.out or _cli.run_dir("kv_compress", args.model)
    identity = _cli.sweep_identity(model, args.model, needles, source,
                                   scores=str(scores_path), score=args.score)
    records = compute_kv_compress(model, needles, haystacks, policies, cfg, out_dir=out,
                                  identity=identity, progress=not args.quiet)
    rows = summarize(policies, records, n_tokens=n_tokens, n_layers=facts.n_layers,
                     n_kv_heads=facts.n_kv_heads, d_head=facts.d_head,
                     memory_tokens=args.memory_context)
    meta = _cli.metadata(args, model, argv)
    write_json_atomic(out / "summary.json", {"meta": meta.to_dict(), "identity": identity,
                                             "n_tokens": n_tokens, "policies": rows}, indent=2)
    from rh_lens import plotting

    _cli.save_figures(out, {
        "kv_curve": plotting.plot_kv_curve(rows, title=f"{args.model}: NIAH vs KV kept"),
        "kv_curve_success": plotting.plot_kv_curve(rows, metric="success_rate",
                                                   title=f"{args.model}: NIAH success vs KV"),
    })
    print(f"{len(records[policies[0].name])} cells per policy, KV kept at {n_tokens} tokens, "
          f"bf16 cache at {args.memory_context}; results in {out}")
    print(f"{'policy':<16} {'window':>6} {'kept':>6} {'MiB':>8} {'ROUGE':>6} {'success':>7}")
    for r in rows:
        print(f"{r['policy']:<16} {r['window']:>6} {r['kv_fraction']:6.3f} {r['cache_mib']:8.2f} "
              f"{r['rouge1_recall']:6.3f} {r['success_rate']:7.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return _cli.run_guarded(_run, build_parser().parse_args(argv), argv)


if __name__ == "__main__":
    raise SystemExit(main())
