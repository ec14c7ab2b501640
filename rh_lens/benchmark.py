"""What detection costs: time against plain generation and the slow obvious path, prefill memory.

Each measurement is a function that returns a small frozen dataclass:

- :func:`measure_speed`: detection time per trial against plain cached greedy generation of the
  same tokens (no hooks, nothing recorded) and against ``decode_slow`` (a full rerun per step
  with Python loops over heads): :class:`Speed`.
- :func:`measure_memory`: peak memory of a prefill, chunked and unchunked, at several context
  lengths: :class:`PrefillMemory` per length.
- :func:`measure_engines`: the engines of :data:`ENGINES` side by side, detection time and
  unchunked prefill memory: :class:`EngineFigures` per engine.
- :func:`measure_against_hf`: detection on every engine, unbatched and batched, against the
  reference's decoding method and plain greedy generation run by Hugging Face Transformers on
  the same weights and trials (CPU time per trial, interleaved repeats): :class:`TrialTimes`.

Times are medians over repeats after one warm-up (:func:`median_seconds`).  Memory on CUDA is
``torch.cuda.max_memory_allocated``; on the CPU each measurement runs in a fresh process
(``python -m rh_lens.benchmark``, see :func:`probe_memory`) and is the growth of its peak resident
memory over the loaded model.  A new measurement is one more function built from these parts.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ENGINES: dict[str, dict] = {  # label -> load_model keywords
    "hooked": {"backend": "hooked"},
    "bridge, eager prefill": {"backend": "bridge", "fast_prefill": False},
    "bridge, SDPA prefill": {"backend": "bridge", "fast_prefill": True},
}
DEPTH = 50.0  # the needle depth of every timed trial, in percent


@dataclass(frozen=True)
class Speed:
    """Seconds per trial of detection, plain generation and the slow obvious implementation."""

    context: int
    trials: int
    new_tokens_per_trial: float
    detect_s_per_trial: float
    plain_generation_s_per_trial: float
    slow_s_per_trial: float

    @property
    def overhead_ratio(self) -> float:
        """Detection time over plain generation time (1.0: recording costs nothing)."""
        return self.detect_s_per_trial / self.plain_generation_s_per_trial

    @property
    def speedup_vs_slow(self) -> float:
        return self.slow_s_per_trial / self.detect_s_per_trial


@dataclass(frozen=True)
class PrefillMemory:
    """Extra bytes a prefill of ``context`` tokens needs, chunked and in one piece."""

    context: int
    x_native: float
    chunked_bytes: int
    unchunked_bytes: int


@dataclass(frozen=True)
class EngineFigures:
    """One engine: detection seconds per trial and unchunked prefill bytes per context length."""

    engine: str
    detect_s_per_trial: float
    prefill_bytes: Mapping[int, int]


def median_seconds(fn: Callable[[], object], *, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, after one warm-up run."""
    if repeats < 1:
        raise ValueError(f"repeats must be positive, got {repeats}")
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def detection_config(model, *, context: int):
    """The sweep of one timed trial: ``context`` tokens, the needle at :data:`DEPTH`, the
    scripts' default buffer and decoding cap for the model's context."""
    from rh_lens.detect import DetectConfig

    buffer = min(200, model.cfg.n_ctx // 4)
    return DetectConfig(lengths=(context,), depths=(DEPTH,), buffer=buffer,
                        max_new_tokens=max(1, min(50, buffer // 2)))


def _cells(needles: Sequence, haystacks: Sequence, context: int) -> list:
    from rh_lens.detect import Cell

    if not needles or len(needles) != len(haystacks):
        raise ValueError(f"need one haystack per needle and at least one needle, got "
                         f"{len(needles)} needles and {len(haystacks)} haystacks")
    return [Cell(i, context, DEPTH) for i in range(len(needles))]


def detect_seconds(model, needles: Sequence, haystacks: Sequence, *, context: int,
                   repeats: int) -> float:
    """Median detection time per trial (the engine of ``rh_lens.detect``), one trial a needle."""
    import torch

    from rh_lens.detect import run_trials

    cfg = detection_config(model, context=context)
    cells = _cells(needles, haystacks, context)
    with torch.no_grad():
        return median_seconds(lambda: run_trials(model, needles, haystacks, cells, cfg),
                              repeats=repeats) / len(cells)


def measure_speed(model, needles: Sequence, haystacks: Sequence, *, context: int, repeats: int,
                  slow_trials: int) -> Speed:
    """Detection vs plain cached generation of the same prompts (one trial a needle), and vs
    the slow obvious implementation on the first ``slow_trials`` of them (run once)."""
    import torch

    from rh_lens.decode import decode_greedy, decode_slow
    from rh_lens.detect import run_trials
    from rh_lens.niah import build_trial

    if not 1 <= slow_trials <= len(needles):
        raise ValueError(f"slow_trials must be in 1..{len(needles)}, got {slow_trials}")
    cfg = detection_config(model, context=context)
    cells = _cells(needles, haystacks, context)
    n_trials = len(cells)
    trials = [build_trial(model, needle, haystack, context_length=context, depth=DEPTH,
                          buffer=cfg.buffer, max_new_tokens=cfg.max_new_tokens)
              for needle, haystack in zip(needles, haystacks, strict=True)]
    records = run_trials(model, needles, haystacks, cells, cfg)

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
        t_detect = median_seconds(detection, repeats=repeats) / n_trials
        t_plain = median_seconds(plain, repeats=repeats) / n_trials
        t_slow = median_seconds(slow, repeats=1) / slow_trials
    return Speed(context=context, trials=n_trials,
                 new_tokens_per_trial=sum(len(r.tokens) for r in records) / n_trials,
                 detect_s_per_trial=t_detect, plain_generation_s_per_trial=t_plain,
                 slow_s_per_trial=t_slow)


def prefill_memory(spec: str, *, n_ctx: int, context: int, chunk: int, device: str,
                   engine: Mapping) -> int:
    """Extra bytes that prefilling ``context`` random tokens in chunks of ``chunk`` needs,
    measured in this process on the model ``spec`` loaded with ``engine``'s keywords."""
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
                 engine: Mapping) -> int:
    """:func:`prefill_memory` in a fresh process (peak resident memory is per process)."""
    probe = {"spec": spec, "n_ctx": n_ctx, "context": context, "chunk": chunk,
             "device": device, "engine": dict(engine)}
    root = str(Path(__file__).resolve().parents[1])  # this rh_lens, not another installed one
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-m", "rh_lens.benchmark", json.dumps(probe)],
                          capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"memory probe failed:\n{done.stderr[-2000:]}")
    return int(done.stdout.strip().splitlines()[-1])


def measure_memory(spec: str, *, native: int, contexts: Sequence[int], chunk: int, device: str,
                   engine: Mapping) -> list[PrefillMemory]:
    """Prefill memory at each of ``contexts`` tokens, in chunks of ``chunk`` and in one piece,
    with the context window opened to the longest (``native``: the model's own)."""
    n_ctx = max([native, *contexts]) + 1
    return [PrefillMemory(
        context=context, x_native=context / native,
        chunked_bytes=probe_memory(spec, n_ctx=n_ctx, context=context, chunk=chunk,
                                   device=device, engine=engine),
        unchunked_bytes=probe_memory(spec, n_ctx=n_ctx, context=context, chunk=context,
                                     device=device, engine=engine),
    ) for context in contexts]


def measure_engines(spec: str, needles: Sequence, haystacks: Sequence, *, device: str,
                    native: int, context: int, contexts: Sequence[int], repeats: int,
                    engines: Mapping[str, Mapping] = ENGINES) -> list[EngineFigures]:
    """Detection time at ``context`` and unchunked prefill memory at ``contexts`` for each
    engine (the hooked one only where transformer-lens 3.x is installed)."""
    from rh_lens.models import HAS_HOOKED, load_model

    n_ctx = max([native, *contexts]) + 1
    out = []
    for label, engine in engines.items():
        if engine["backend"] == "hooked" and not HAS_HOOKED:
            continue
        model = load_model(spec, device=device, **engine)
        seconds = detect_seconds(model, needles, haystacks, context=context, repeats=repeats)
        del model
        out.append(EngineFigures(label, seconds, {
            c: probe_memory(spec, n_ctx=n_ctx, context=c, chunk=c, device=device, engine=engine)
            for c in contexts}))
    return out


@dataclass(frozen=True)
class TrialTimes:
    """CPU seconds per trial of one way of decoding a sweep's trials, one figure a repeat;
    for rh_lens's own ways also how one further run's trial time divides (:meth:`phases`)."""

    label: str
    seconds: tuple[float, ...]
    split: tuple[float, float, float] | None = None  # prefill, steps, the rest

    def phases(self) -> dict[str, float] | None:
        """Seconds per trial of the prefill, of the decode steps, and of the rest (building
        prompts, choosing tokens, scoring), from one run under
        :func:`rh_lens.decode.phase_times`; None for the Hugging Face ways."""
        return None if self.split is None else dict(zip(("prefill", "steps", "rest"),
                                                        self.split, strict=True))

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


REFERENCE_METHOD = "reference method (HF)"
HF_FLOOR = "HF greedy generation"


def measure_against_hf(spec: str, needles: Sequence, haystacks: Sequence, todo: Sequence,
                       cfg, *, repeats: int, batch_sizes: Sequence[int] = (1, 8),
                       device: str = "cpu") -> list[TrialTimes]:
    """Detection of the cells ``todo`` under ``cfg`` on every engine at every batch size,
    against the reference's decoding method (:func:`rh_lens.reference_method.reference_detect`)
    and plain greedy generation (:func:`~rh_lens.reference_method.hf_greedy`) on the Hugging
    Face model of the same weights, building and decoding the same prompts with the same stop
    rule (the reference's script builds its prompts too; scoring is left out there).  Each
    way runs once to warm up, then ``repeats`` times, the ways taking turns; the figure is
    process CPU time per trial (steady on a shared machine; set the thread count first).  Each
    rh_lens way then runs once more, its prefill and decode steps clocked
    (:meth:`TrialTimes.phases`)."""
    from dataclasses import replace

    import torch

    from rh_lens import protocols
    from rh_lens.decode import is_stop_token, phase_times
    from rh_lens.detect import run_trials
    from rh_lens.hf_export import to_hf
    from rh_lens.models import BACKENDS, HAS_HOOKED, load_model
    from rh_lens.reference_method import hf_greedy, reference_detect

    if repeats < 1 or not todo or min(batch_sizes, default=0) < 1:
        raise ValueError(f"need repeats >= 1, some cells and positive batch sizes; got "
                         f"{repeats}, {len(todo)} cells, {list(batch_sizes)}")
    models = {b: load_model(spec, device=device, backend=b) for b in BACKENDS
              if b != "hooked" or HAS_HOOKED}
    ways = {}
    for backend, model in models.items():
        for size in batch_sizes:
            sized = replace(cfg, batch_size=size)
            ways[f"{backend}, batch {size}"] = (
                lambda m=model, c=sized: run_trials(m, needles, haystacks, todo, c))
    model = models.get("bridge") or models["hooked"]
    hf = to_hf(model)
    rule = protocols.stop_rule(cfg.protocol)

    def stop(token_id: int) -> bool:
        return is_stop_token(model, token_id, stop=rule)

    def on_hf(decode) -> list:  # builds each prompt as run_trials does, then decodes it
        out = []
        for c in todo:
            trial = protocols.build(cfg.protocol, model, needles[c.needle], haystacks[c.needle],
                                    context_length=c.length, depth=c.depth, buffer=cfg.buffer,
                                    max_new_tokens=cfg.max_new_tokens, chat=cfg.chat,
                                    lengths=cfg.lengths)
            out.append(decode(hf, trial.tokens[None], max_new_tokens=cfg.max_new_tokens,
                              stop=stop))
        return out

    for label, method in ((REFERENCE_METHOD, reference_detect), (HF_FLOOR, hf_greedy)):
        ways[label] = lambda f=method: on_hf(f)
    times: dict[str, list[float]] = {label: [] for label in ways}
    with torch.no_grad():
        for fn in ways.values():
            fn()
        for _ in range(repeats):
            for label, fn in ways.items():
                start = time.process_time()
                fn()
                times[label].append((time.process_time() - start) / len(todo))
        splits = {}
        for label, fn in ways.items():
            if label in (REFERENCE_METHOD, HF_FLOOR):
                continue
            with phase_times() as clock:
                start = time.process_time()
                fn()
                total = time.process_time() - start
            parts = (clock["prefill"], clock["steps"])
            splits[label] = tuple(x / len(todo) for x in (*parts, total - sum(parts)))
    return [TrialTimes(label, tuple(t), splits.get(label)) for label, t in times.items()]


if __name__ == "__main__":  # the memory probe: python -m rh_lens.benchmark '{"spec": ...}'
    print(prefill_memory(**json.loads(sys.argv[1])))
