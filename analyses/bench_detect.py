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
(a)-(c) run on ``--backend``.  Memory: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU
each measurement runs in a fresh process and reports the growth of its peak resident memory over
the loaded model.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

from analyses import _cli

ENGINES = {  # label -> load_model keywords
    "hooked": {"backend": "hooked"},
    "bridge, eager prefill": {"backend": "bridge", "fast_prefill": False},
    "bridge, SDPA prefill": {"backend": "bridge", "fast_prefill": True},
}


def _timed(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _detection_inputs(model, context: int, n_trials: int):
    from rh_lens.detect import Cell, DetectConfig
    from rh_lens.zoo.inputs import zoo_inputs

    buffer = min(200, model.cfg.n_ctx // 4)
    cfg = DetectConfig(lengths=(context,), depths=(50.0,), buffer=buffer,
                       max_new_tokens=max(1, min(50, buffer // 2)))
    needles, haystacks = zoo_inputs(n_trials, seed=7)
    cells = [Cell(i, context, 50.0) for i in range(n_trials)]
    return cfg, needles, haystacks, cells


def detect_seconds(model, *, context: int, n_trials: int, repeats: int) -> float:
    """Median detection time per trial (the engine of ``rh_lens.detect``)."""
    import torch

    from rh_lens.detect import run_trials

    cfg, needles, haystacks, cells = _detection_inputs(model, context, n_trials)
    with torch.no_grad():
        return _timed(lambda: run_trials(model, needles, haystacks, cells, cfg),
                      repeats) / n_trials


def bench_speed(model, *, context: int, n_trials: int, repeats: int, slow_trials: int) -> dict:
    import torch

    from rh_lens.decode import decode_greedy, decode_slow
    from rh_lens.detect import run_trials
    from rh_lens.niah import build_trial

    n_ctx = context
    cfg, needles, haystacks, cells = _detection_inputs(model, context, n_trials)
    trials = [build_trial(model, needles[i], haystacks[i], context_length=n_ctx, depth=50.0,
                          buffer=cfg.buffer, max_new_tokens=cfg.max_new_tokens)
              for i in range(n_trials)]
    records = run_trials(model, needles, haystacks, cells, cfg)
    new_tokens = sum(len(r.tokens) for r in records)

    def detection():
        run_trials(model, needles, haystacks, cells, cfg)

    def plain():
        for trial in trials:
            decode_greedy(model, trial.tokens[None], max_new_tokens=cfg.max_new_tokens,
                          chunk_size=cfg.chunk_size, record=False)

    def slow():
        for trial in trials[:slow_trials]:
            decode_slow(model, trial.tokens, max_new_tokens=cfg.max_new_tokens)

    with torch.no_grad():
        t_detect = _timed(detection, repeats) / n_trials
        t_plain = _timed(plain, repeats) / n_trials
        t_slow = _timed(slow, 1) / slow_trials
    return {
        "context": n_ctx, "trials": n_trials, "new_tokens_per_trial": new_tokens / n_trials,
        "detect_s_per_trial": t_detect, "plain_generation_s_per_trial": t_plain,
        "slow_s_per_trial": t_slow, "overhead_ratio": t_detect / t_plain,
        "speedup_vs_slow": t_slow / t_detect,
    }


def prefill_memory(spec: str, *, n_ctx: int, context: int, chunk: int, device: str,
                   engine: dict) -> int:
    """Extra bytes that prefilling ``context`` tokens needs (run in this process)."""
    import resource

    import torch

    from rh_lens.decode import decode_greedy
    from rh_lens.models import load_model

    model = load_model(spec, device=device, n_ctx=n_ctx, **engine)
    tokens = torch.randint(10, model.cfg.d_vocab, (1, context))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        decode_greedy(model, tokens, max_new_tokens=1, chunk_size=chunk)
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        decode_greedy(model, tokens, max_new_tokens=1, chunk_size=chunk)
    return int((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)


def probe_memory(spec: str, *, n_ctx: int, context: int, chunk: int, device: str,
                 engine: dict) -> int:
    """:func:`prefill_memory` in a fresh process (peak resident memory is per process)."""
    cmd = [sys.executable, "-m", "analyses.bench_detect", "--memory-probe",
           json.dumps({"spec": spec, "n_ctx": n_ctx, "context": context, "chunk": chunk,
                       "device": device, "engine": engine})]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"memory probe failed:\n{done.stderr[-2000:]}")
    return int(done.stdout.strip().splitlines()[-1])


def bench_memory(spec: str, *, native: int, contexts: list[int], chunk: int, device: str,
                 engine: dict):
    rows = []
    for context in contexts:
        row = {"context": context, "x_native": context / native}
        for label, size in (("chunked", chunk), ("unchunked", context)):
            row[f"{label}_bytes"] = probe_memory(
                spec, n_ctx=max(native, *contexts) + 1, context=context, chunk=size,
                device=device, engine=engine)
        rows.append(row)
    return rows


def bench_engines(spec: str, *, device: str, native: int, context: int, contexts: list[int],
                  n_trials: int, repeats: int) -> dict[str, dict]:
    """Detection time at ``context`` and unchunked prefill memory at ``contexts`` per engine."""
    from rh_lens.models import HAS_HOOKED, load_model

    out = {}
    for label, engine in ENGINES.items():
        if engine["backend"] == "hooked" and not HAS_HOOKED:
            continue
        model = load_model(spec, device=device, **engine)
        row = {"detect_s_per_trial": detect_seconds(model, context=context, n_trials=n_trials,
                                                    repeats=repeats)}
        del model
        row["prefill_bytes"] = {
            c: probe_memory(spec, n_ctx=max(native, *contexts) + 1, context=c, chunk=c,
                            device=device, engine=engine)
            for c in contexts}
        out[label] = row
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="zoo:llama-s")
    p.add_argument("--device", default="cpu")
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
    _cli.add_backend_args(p)
    p.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.memory_probe:
        print(prefill_memory(**json.loads(args.memory_probe)))
        return 0

    from rh_lens.models import load_model

    engine = _cli.backend_kwargs(args)
    model = load_model(args.model, device=args.device, **engine)
    native = model.cfg.n_ctx
    rotary = model.cfg.positional_embedding_type == "rotary"
    print(f"model {args.model}: {model.cfg.n_layers} layers x {model.cfg.n_heads} heads, "
          f"native context {native}, device {args.device}, backend {args.backend}")
    if not args.skip_speed:
        s = bench_speed(model, context=args.context or native, n_trials=args.trials,
                        repeats=args.repeats,
                        slow_trials=args.slow_trials)
        print(f"(a) detection {s['detect_s_per_trial'] * 1e3:.1f} ms/trial vs plain generation "
              f"{s['plain_generation_s_per_trial'] * 1e3:.1f} ms/trial "
              f"({s['new_tokens_per_trial']:.1f} new tokens): ratio {s['overhead_ratio']:.3f} "
              "(target <= 1.25)")
        print(f"(b) slow obvious implementation {s['slow_s_per_trial'] * 1e3:.1f} ms/trial: "
              f"speed-up {s['speedup_vs_slow']:.1f}x (target >= 10x)")
    del model
    contexts = args.memory_contexts or [native * k for k in (1, 2, 4, 8)]
    if not rotary and max(contexts) > native:
        print("(c) skipped: only rotary models can be extended beyond their context")
    else:
        rows = bench_memory(args.model, native=native, contexts=contexts, chunk=args.chunk,
                            device=args.device, engine=engine)
        print(f"(c) prefill peak memory, chunk {args.chunk} vs unchunked:")
        for r in rows:
            print(f"    {r['context']:>7} tokens ({r['x_native']:.0f}x): chunked "
                  f"{r['chunked_bytes'] / 2**20:8.1f} MiB   unchunked "
                  f"{r['unchunked_bytes'] / 2**20:8.1f} MiB")
    if args.skip_engines:
        return 0
    contexts = args.engine_contexts or [native * k for k in (1, 4, 8)]
    if not rotary:
        contexts = [c for c in contexts if c <= native]
    rows = bench_engines(args.model, device=args.device, native=native,
                         context=args.context or native, contexts=contexts,
                         n_trials=args.trials, repeats=args.repeats)
    print(f"(d) engines: detection at {args.context or native} tokens; unchunked prefill peak "
          "memory")
    head = "".join(f"{c:>9} tok" for c in contexts)
    print(f"    {'engine':<24}{'ms/trial':>10}{head}")
    for label, r in rows.items():
        mem = "".join(f"{r['prefill_bytes'][c] / 2**20:>9.1f} MiB" for c in contexts)
        print(f"    {label:<24}{r['detect_s_per_trial'] * 1e3:>10.1f}{mem}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
