"""Benchmark of zoo training: seconds per step of each stage, and each recipe's training time.

    python -m rh_lens.zoo.training.bench                    # every zoo recipe, 2 torch threads
    python -m rh_lens.zoo.training.bench llama-s --threads 1 --steps 8
    python -m rh_lens.zoo.training.bench --live-logits      # each recipe as is and with live logits

Times ``--steps`` optimiser steps (after one untimed step) at the start of every stage of a
recipe (copy warm-up, main, fine-tuning, polish and the stages after it) with the training loop's
own step function (:func:`rh_lens.zoo.training.train.train_step`, batches included), and
multiplies the median by the stage's length: the time the whole recipe takes on the machine it
runs on when nothing else runs, next to the zoo's ~30-minute budget a model.  The cards'
``train_seconds`` are what the shipped runs took, often with other jobs sharing the cores.  Run
it on an idle machine.  ``--live-logits`` times every stage a second time with
``Recipe.live_logits`` on, alternating the two per stage so that the ratio compares like with
like on a machine whose speed drifts.
"""

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

from rh_lens.zoo import PACKAGE_MODELS
from rh_lens.zoo.training.recipes import ZOO_NAMES, get_recipe
from rh_lens.zoo.training.train import (
    build,
    deterministic,
    get_tokenizer,
    load_tokenizer,
    machine,
    train_step,
)

TARGET_MINUTES = 30


def stages(recipe) -> list[tuple[str, int, int]]:
    """(label, first step, number of steps) of every non-empty stage of ``recipe``."""
    out = [("copy warm-up", 0, recipe.copy_warmup),
           ("main", recipe.copy_warmup, recipe.steps - recipe.copy_warmup),
           ("fine-tuning", recipe.steps, recipe.finetune_steps)]
    for i, (start, stage) in enumerate(recipe.late_stages()):
        out.append(("polish" if i == 0 and recipe.polish else f"stage {i}", start, stage.steps))
    return [s for s in out if s[2] > 0]


def _tokenizer(recipe):
    """The tokenizer ``recipe``'s run trains with: a bundled model's own, else the one
    :func:`rh_lens.zoo.training.train.get_tokenizer` gives (the parent's, or built in a scratch
    folder)."""
    if recipe.parent is None and (PACKAGE_MODELS / recipe.name / "tokenizer.json").is_file():
        return load_tokenizer(PACKAGE_MODELS / recipe.name)
    with tempfile.TemporaryDirectory() as tmp:
        return get_tokenizer(recipe, Path(tmp))


def seconds_per_step(recipe, tokenizer, start: int, n: int) -> float:
    """Median wall time of steps ``start+1 .. start+n`` (step ``start`` runs untimed)."""
    twin, opt, params = build(recipe)
    twin.train()
    times = []
    for step in range(start, start + n + 1):
        t0 = time.perf_counter()
        with deterministic():
            train_step(recipe, step, tokenizer, twin, opt, params)
        if step > start:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(recipe, *, n: int, live: bool = False) -> tuple[list[tuple], list[float]]:
    """Per stage (label, steps, seconds a step of ``recipe`` [, with live logits]) and the
    recipe's total seconds in each of those columns."""
    tokenizer = _tokenizer(recipe)
    variants = [recipe] + ([dataclasses.replace(recipe, live_logits=True)] if live else [])
    rows = [(label, length, *[seconds_per_step(v, tokenizer, start, n) for v in variants])
            for label, start, length in stages(recipe)]
    totals = [sum(row[1] * row[2 + i] for row in rows) for i in range(len(variants))]
    return rows, totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", default=list(ZOO_NAMES), help="zoo recipes")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per stage")
    parser.add_argument("--live-logits", action="store_true",
                        help="also time each stage with Recipe.live_logits on")
    args = parser.parse_args(argv)
    import torch

    from rh_lens.models import require_hooked

    require_hooked("timing zoo training (its twin is built from a HookedTransformerConfig)")
    torch.set_num_threads(args.threads)
    recipes = [get_recipe(name) for name in args.names]  # unknown names fail before any timing
    here = machine()  # the figures hold for this machine: they differ by day and CPU
    print(f"torch {here['torch']} on {here['cpu']} ({here['kernels']} kernels), "
          f"{args.threads} thread(s), median of {args.steps} steps per stage")
    for recipe in recipes:
        rows, totals = bench(recipe, n=args.steps, live=args.live_logits)
        print(f"\n{recipe.name} ({recipe.total_steps} steps)"
              + ("; last column: with live logits" if args.live_logits else ""))
        for label, length, *secs in rows:
            cols = " ".join(f"{sec:6.3f} s = {length * sec / 60:6.1f} min" for sec in secs)
            print(f"  {label:<13} {length:>6} steps x {cols}")
        for total, what in zip(totals, ("", " with live logits")[:len(totals)], strict=True):
            verdict = "within" if total / 60 <= TARGET_MINUTES else "over"
            print(f"  total{what} {total / 60:.1f} min "
                  f"({verdict} the ~{TARGET_MINUTES} min target)")
        if len(totals) == 2:
            print(f"  live logits: {totals[0] / totals[1]:.2f}x faster")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
