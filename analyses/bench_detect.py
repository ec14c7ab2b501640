"""Benchmark of detection: overhead over plain generation, speed-up, prefill memory, engines.

    python -m analyses.bench_detect                       # zoo:llama-s on this machine
    python -m analyses.bench_detect --backend bridge      # (a)-(c) on the TransformerBridge
    python -m analyses.bench_detect --model SPEC --device cuda --memory-contexts 4096 32768

Prints, measured in one run:
  (a) detection time per trial / plain greedy generation of the same tokens (KV cache, no hooks);
  (b) speed-up of detection over the slow obvious implementation (full rerun + Python loops);
  (c) peak memory of prefill at 1x..8x the native context, chunked vs unchunked;
  (d) the engines side by side: HookedTransformer, the Bridge with an eager prefill and the
      Bridge with the SDPA fast prefill: detection time per trial at the native context and peak
      memory of an unchunked prefill at 1x, 4x and 8x it.
(a)-(c) run on ``--backend``.  How each figure is measured: :mod:`rh_lens.benchmark`.
"""

import argparse

from analyses import _cli
from rh_lens.benchmark import ENGINES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    _cli.add_model_args(p, device="cpu", loading=False)
    p.add_argument("--context", type=int, default=None,
                   help="context length of (a) and (b); default the model's native n_ctx")
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--slow-trials", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--memory-contexts", type=int, nargs="*", default=None,
                   help="prefill lengths for (c); default 1x, 2x, 4x, 8x the native context")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-engines", action="store_true", help="skip (d)")
    p.add_argument("--engine-contexts", type=int, nargs="*", default=None,
                   help="prefill lengths for (d); default 1x, 4x, 8x the native context")
    return p


def _run(args, argv) -> int:
    from rh_lens import benchmark
    from rh_lens.zoo.inputs import zoo_inputs

    engine = _cli.backend_kwargs(args)
    model = _cli.load_model(args)
    native = model.cfg.n_ctx
    context = args.context or native
    rotary = model.cfg.positional_embedding_type == "rotary"
    needles, haystacks = zoo_inputs(args.trials, seed=7)
    print(f"model {args.model}: {model.cfg.n_layers} layers x {model.cfg.n_heads} heads, "
          f"native context {native}, device {args.device}, backend {args.backend}")
    if not args.skip_speed:
        s = benchmark.measure_speed(model, needles, haystacks, context=context,
                                    repeats=args.repeats, slow_trials=args.slow_trials)
        print(f"(a) detection {s.detect_s_per_trial * 1e3:.1f} ms/trial vs plain generation "
              f"{s.plain_generation_s_per_trial * 1e3:.1f} ms/trial "
              f"({s.new_tokens_per_trial:.1f} new tokens): ratio {s.overhead_ratio:.3f} "
              "(target <= 1.25)")
        print(f"(b) slow obvious implementation {s.slow_s_per_trial * 1e3:.1f} ms/trial: "
              f"speed-up {s.speedup_vs_slow:.1f}x (target >= 10x)")
    del model
    contexts = args.memory_contexts or [native * k for k in (1, 2, 4, 8)]
    if not rotary and max(contexts) > native:
        print("(c) skipped: only rotary models can be extended beyond their context")
    else:
        rows = benchmark.measure_memory(args.model, native=native, contexts=contexts,
                                        chunk=args.chunk, device=args.device, engine=engine)
        print(f"(c) prefill peak memory, chunk {args.chunk} vs unchunked:")
        for r in rows:
            print(f"    {r.context:>7} tokens ({r.x_native:.0f}x): chunked "
                  f"{r.chunked_bytes / 2**20:8.1f} MiB   unchunked "
                  f"{r.unchunked_bytes / 2**20:8.1f} MiB")
    if args.skip_engines:
        return 0
    contexts = args.engine_contexts or [native * k for k in (1, 4, 8)]
    if not rotary:
        contexts = [c for c in contexts if c <= native]
    rows = benchmark.measure_engines(args.model, needles, haystacks, device=args.device,
                                     native=native, context=context, contexts=contexts,
                                     repeats=args.repeats, engines=ENGINES)
    print(f"(d) engines: detection at {context} tokens; unchunked prefill peak memory")
    print(f"    {'engine':<24}{'ms/trial':>10}" + "".join(f"{c:>9} tok" for c in contexts))
    for r in rows:
        mem = "".join(f"{r.prefill_bytes[c] / 2**20:>9.1f} MiB" for c in contexts)
        print(f"    {r.engine:<24}{r.detect_s_per_trial * 1e3:>10.1f}{mem}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return _cli.run_guarded(_run, build_parser().parse_args(argv), argv)


if __name__ == "__main__":
    raise SystemExit(main())
