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
  (e) detection of the detect script's default sweep (every ``--hf-every``-th cell) on every
      engine, unbatched and in batches of 8, against the reference's decoding method and plain
      greedy generation run by Hugging Face Transformers on the same weights and prompts: CPU
      time per trial (``--threads 1`` for the one-thread figures).
(a)-(c) run on ``--backend``; ``--skip-speed`` skips (a) and (b), ``--skip-memory`` (c),
``--skip-engines`` (d), ``--skip-hf`` (e).  How each figure is measured: :mod:`rh_lens.benchmark`.

At a real model's shape, with random weights (no download; ``--layers`` truncates the depth):

    python -m analyses.bench_detect --shape llama-3.1-8b --layers 2 --contexts 1024 2048 4096
    python -m analyses.bench_detect --shape llama-3.1-8b --device cuda --dtype bfloat16 \
        --contexts 8192 32768 65536 131072 --memory-budget 80

runs, on the same weights and prompt, rh_lens's engine (HookedTransformer; Bridge with the SDPA
prefill), the reference's method on Hugging Face and plain Hugging Face greedy generation (the
floor): prefill time, time per decode step and peak memory at each context, with the memory
model's prediction beside it; checks that the engines and the reference's method give the same
tokens and argmax positions; with ``--memory-budget GB``, the longest context each method
completes within that memory, by doubling.  Writes ``bench_scale.json`` and
``bench_scale.html`` into ``--out`` (:mod:`rh_lens.scale`).
"""

import argparse

from analyses import _cli
from rh_lens.benchmark import ENGINES
from rh_lens.scale import METHODS
from rh_lens.shapes import SHAPES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    _cli.add_model_args(p, device="cpu", loading=False)
    p.add_argument("--context", type=int, default=None,
                   help="context length of (a) and (b); default the model's native n_ctx")
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--slow-trials", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk", type=int, default=None,
                   help="prefill chunk (default 256; 512 with --shape)")
    p.add_argument("--memory-contexts", type=int, nargs="*", default=None,
                   help="prefill lengths for (c); default 1x, 2x, 4x, 8x the native context")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-memory", action="store_true", help="skip (c)")
    p.add_argument("--skip-engines", action="store_true", help="skip (d)")
    p.add_argument("--engine-contexts", type=int, nargs="*", default=None,
                   help="prefill lengths for (d); default 1x, 4x, 8x the native context")
    p.add_argument("--skip-hf", action="store_true", help="skip (e)")
    p.add_argument("--hf-every", type=int, default=5,
                   help="(e) times every Nth cell of the default detection sweep (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    g = p.add_argument_group("at a real model's shape, random weights")
    g.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="run the side-by-side benchmark on this architecture instead")
    g.add_argument("--layers", type=int, default=None, help="keep the first N layers")
    g.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096],
                   help="prompt lengths (default 1024 2048 4096)")
    g.add_argument("--steps", type=int, default=8, help="decode steps timed per context")
    g.add_argument("--dtype", default=None,
                   help="float32 (default on the CPU), bfloat16 (default on CUDA), float16")
    g.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    g.add_argument("--memory-budget", type=float, default=None, metavar="GB",
                   help="find the longest context each method completes within GB (weights "
                        "included), doubling from the first of --contexts")
    g.add_argument("--max-context", type=int, default=None,
                   help="stop the --memory-budget search here (default the model's context)")
    g.add_argument("--no-check", action="store_true",
                   help="skip checking that the engines and the reference agree")
    g.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompt")
    _cli.add_run_args(g, out_help="output directory (default runs/bench_detect/SHAPE)")
    return p


def _run(args, argv) -> int:
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise ValueError(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.shape:
        return _run_shape(args, argv)
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
    if not args.skip_memory:
        _memory(args, native=native, rotary=rotary, engine=engine)
    if not args.skip_hf:
        _against_hf(args)
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


def _memory(args, *, native: int, rotary: bool, engine: dict) -> None:
    from rh_lens import benchmark

    contexts = args.memory_contexts or [native * k for k in (1, 2, 4, 8)]
    if not rotary and max(contexts) > native:
        print("(c) skipped: only rotary models can be extended beyond their context")
        return
    rows = benchmark.measure_memory(args.model, native=native, contexts=contexts,
                                    chunk=args.chunk or 256, device=args.device, engine=engine)
    print(f"(c) prefill peak memory, chunk {args.chunk or 256} vs unchunked:")
    for r in rows:
        print(f"    {r.context:>7} tokens ({r.x_native:.0f}x): chunked "
              f"{r.chunked_bytes / 2**20:8.1f} MiB   unchunked "
              f"{r.unchunked_bytes / 2**20:8.1f} MiB")


def _against_hf(args) -> None:
    from analyses import detect
    from rh_lens import benchmark
    from rh_lens.detect import cells
    from rh_lens.models import load_model

    if args.hf_every < 1:
        raise ValueError(f"--hf-every must be positive, got {args.hf_every}")
    sweep = detect.build_parser().parse_args(["--model", args.model])
    needles, haystacks, _ = _cli.niah_inputs(None, None, n_needles=sweep.n_needles,
                                             seed=sweep.seed)
    cfg = _cli.sweep_config(load_model(args.model), sweep, points=10, needles=needles)
    todo = cells(len(needles), cfg)[::args.hf_every]
    rows = benchmark.measure_against_hf(args.model, needles, haystacks, todo, cfg,
                                        repeats=args.repeats, device=args.device or "cpu")
    by = {r.label: r.median for r in rows}
    ref, floor = by[benchmark.REFERENCE_METHOD], by[benchmark.HF_FLOOR]
    print(f"(e) {len(todo)} trials of the default sweep, CPU ms per trial (median of "
          f"{args.repeats}); ratios to the reference's method and to the HF floor:")
    for r in rows:
        runs = ", ".join(f"{t * 1e3:.1f}" for t in r.seconds)
        print(f"    {r.label:<24}{r.median * 1e3:>8.1f}   {r.median / ref:>5.2f}x ref   "
              f"{r.median / floor:>5.2f}x floor   ({runs})")
    split = {r.label: r.phases() for r in rows if r.phases() is not None}
    print("    where an rh_lens trial's time goes (ms per trial, one more run each): prefill, "
          "decode steps, the rest")
    for label, parts in split.items():
        print(f"    {label:<24}" + "".join(f"{parts[k] * 1e3:>8.1f}" for k in parts))
    for backend in ("hooked", "bridge"):
        one, eight = by.get(f"{backend}, batch 1"), by.get(f"{backend}, batch 8")
        if one and eight:
            parts = split[f"{backend}, batch 8"]
            print(f"    {backend}: batch 8 is {one / eight:.2f}x faster than batch 1 (at most "
                  f"{one / (parts['prefill'] + parts['rest']):.2f}x if its decode steps took "
                  "no time)")


def _run_shape(args, argv) -> int:
    import dataclasses
    import json
    from pathlib import Path

    import torch

    from rh_lens import scale
    from rh_lens.models import _resolve_device, resolve_dtype
    from rh_lens.plotting import plot_scale
    from rh_lens.results import RunMetadata, write_json_atomic
    from rh_lens.shapes import get_shape

    shape = get_shape(args.shape, layers=args.layers)
    device = _resolve_device(args.device)
    dtype = resolve_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    chunk, steps = args.chunk or 512, args.steps
    if steps < 1 or chunk < 1 or min(args.contexts) < 2:
        raise ValueError(f"--steps and --chunk must be positive and every context at least 2 "
                         f"tokens, got steps {steps}, chunk {chunk}, contexts {args.contexts}")
    contexts = sorted(set(args.contexts))
    longest = contexts[-1]
    if args.memory_budget is not None:
        if args.memory_budget <= 0:
            raise ValueError(f"--memory-budget must be positive, got {args.memory_budget}")
        top = args.max_context or shape.context
        longest = max(longest, top)
    out = args.out or Path("runs/bench_detect") / (
        shape.name + (f"-{shape.n_layers}l" if args.layers else ""))
    print(f"shape {shape.name}: {shape.n_layers} layers, {shape.n_heads} query / "
          f"{shape.n_kv_heads} key-value heads, d_model {shape.d_model}, vocabulary "
          f"{shape.d_vocab}, {shape.n_params() / 1e9:.2f}B parameters; {dtype} on {device}; "
          f"chunk {chunk}, {steps} decode steps")
    engines = scale.build_engines(shape, n_ctx=longest + steps + 1, dtype=dtype, device=device,
                                  seed=args.seed)
    methods = [m for m in args.methods if m in engines.available()]
    agree = {} if args.no_check else scale.same_answers(engines, contexts[0], steps=steps,
                                                         chunk=chunk, seed=args.seed)
    for name, ok in agree.items():
        print(f"same tokens and argmax positions as the reference's method at {contexts[0]} "
              f"tokens, {scale.LABELS[name]}: {'yes' if ok else 'NO'}")
    meta = RunMetadata.collect(model_spec=f"random:{shape.name}", seed=args.seed, argv=argv)
    out.mkdir(parents=True, exist_ok=True)
    rows, limits = [], []

    def save() -> None:  # after every measurement: a run killed later keeps what it measured
        write_json_atomic(out / "bench_scale.json", {
            "meta": meta.to_dict(), "shape": dataclasses.asdict(shape), "dtype": str(dtype),
            "device": str(device), "chunk": chunk, "steps": steps,
            "weights_bytes": scale.weights_bytes(engines, "greedy"),
            "same_answers": agree, "measurements": [dataclasses.asdict(r) for r in rows],
            "limits": [dataclasses.asdict(lim) for lim in limits],
            "threads": torch.get_num_threads(), "complete": False,
        })

    for context in contexts:
        for method in methods:
            rows.append(scale.measure(engines, method, context, steps=steps, chunk=chunk,
                                      seed=args.seed))
            save()
    _print_rows(rows, methods, contexts, steps)
    if args.memory_budget is not None:
        budget = int(args.memory_budget * 2**30)
        print(f"longest context within {args.memory_budget:g} GB (weights included), "
              f"doubling from {contexts[0]}:")
        for m in methods:
            lim = scale.find_limit(engines, m, budget_bytes=budget, start=contexts[0],
                                   steps=steps, chunk=chunk, max_context=top, known=rows)
            limits.append(lim)
            save()
            print(f"    {scale.LABELS[lim.method]:<34}{lim.longest or '-':>8}   ({lim.stopped_by})",
                  flush=True)
    save()
    saved = json.loads((out / "bench_scale.json").read_text())
    write_json_atomic(out / "bench_scale.json", {**saved, "complete": True})
    measured = saved["measurements"]
    _cli.save_figures(out, {"bench_scale": plot_scale(
        measured, labels=scale.LABELS, title=f"{shape.name}, {shape.n_layers} layers, {dtype}")},
        self_contained=args.self_contained_figures)
    print(f"wrote {out / 'bench_scale.json'} and {out / 'bench_scale.html'}")
    return 0 if all(agree.values()) else 1


def _print_rows(rows, methods, contexts, steps) -> None:
    from rh_lens.scale import LABELS

    by = {(r.method, r.context): r for r in rows}
    print(f"{'method':<34}{'context':>8}{'prefill s':>11}{'ms/step':>10}{'peak MiB':>10}"
          f"{'model MiB':>11}")
    for context in contexts:
        for m in methods:
            r = by[(m, context)]
            if r.out_of_memory:
                print(f"{LABELS[m]:<34}{context:>8}   out of memory")
                continue
            print(f"{LABELS[m]:<34}{context:>8}{r.prefill_s:>11.2f}{r.step_s * 1e3:>10.1f}"
                  f"{r.peak_bytes / 2**20:>10.0f}{r.predicted_bytes / 2**20:>11.0f}")
    if "greedy" not in methods:
        return
    print(f"ratios (a)/(c) against greedy generation and (b)/(a) of the reference's method, "
          f"prefill + {steps} steps:")
    for context in contexts:
        floor, ref = by.get(("greedy", context)), by.get(("reference", context))
        for m in ("hooked", "bridge"):
            r = by.get((m, context))
            if r is None or r.out_of_memory or floor.out_of_memory:
                continue
            total = r.prefill_s + steps * r.step_s
            line = (f"    {LABELS[m]:<34}{context:>8}  (a)/(c) "
                    f"{total / (floor.prefill_s + steps * floor.step_s):.2f} "
                    f"(per step {r.step_s / floor.step_s:.2f})")
            if ref is not None and not ref.out_of_memory:
                line += (f"   (b)/(a) {(ref.prefill_s + steps * ref.step_s) / total:.2f} "
                         f"(per step {ref.step_s / r.step_s:.2f})")
            print(line)


def main(argv: list[str] | None = None) -> int:
    return _cli.run_guarded(_run, build_parser().parse_args(argv), argv)


if __name__ == "__main__":
    raise SystemExit(main())
