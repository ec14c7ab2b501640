"""Benchmark of zoo training: seconds per step of each stage, and each recipe's training time.

    python -m analyses.bench_train                      # every zoo recipe, 2 torch threads
    python -m analyses.bench_train llama-s --threads 1 --steps 8

Times ``--steps`` optimiser steps (after one untimed step) at the start of every stage of a
recipe (copy warm-up, main, fine-tuning, polish and the stages after it) with the training loop's
own step function (:func:`rh_lens.zoo.train.train_step`, batches included), and multiplies the
median by the stage's length: the time the whole recipe takes on this machine when nothing else
runs, next to the zoo issue's ~30 minutes.  The cards' ``train_seconds`` are what the shipped runs
took, often with other jobs sharing the cores.  Run it on an idle machine.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

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
    :func:`rh_lens.zoo.train.get_tokenizer` gives (the parent's, or built in a scratch folder)."""
    from rh_lens.zoo.train import PACKAGE_MODELS, get_tokenizer, load_tokenizer

    if recipe.parent is None and (PACKAGE_MODELS / recipe.name / "tokenizer.json").is_file():
        return load_tokenizer(PACKAGE_MODELS / recipe.name)
    with tempfile.TemporaryDirectory() as tmp:
        return get_tokenizer(recipe, Path(tmp))


def seconds_per_step(recipe, tokenizer, start: int, n: int) -> float:
    """Median wall time of steps ``start+1 .. start+n`` (step ``start`` runs untimed)."""
    from rh_lens.zoo.train import build, train_step

    twin, opt, params = build(recipe)
    twin.train()
    times = []
    for step in range(start, start + n + 1):
        t0 = time.perf_counter()
        train_step(recipe, step, tokenizer, twin, opt, params)
        if step > start:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(recipe, *, n: int) -> tuple[list[tuple[str, int, float]], float]:
    tokenizer = _tokenizer(recipe)
    rows = [(label, length, seconds_per_step(recipe, tokenizer, start, n))
            for label, start, length in stages(recipe)]
    return rows, sum(length * sec for _, length, sec in rows)


def main(argv: list[str] | None = None) -> int:
    from rh_lens.zoo.recipes import ZOO_NAMES, get_recipe

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", default=list(ZOO_NAMES), help="zoo recipes")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per stage")
    args = parser.parse_args(argv)
    import torch

    from rh_lens.models import require_hooked

    require_hooked("timing zoo training (its twin is built from a HookedTransformerConfig)")
    torch.set_num_threads(args.threads)
    recipes = [get_recipe(name) for name in args.names]  # unknown names fail before any timing
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.steps} steps "
          f"per stage")
    for recipe in recipes:
        rows, total = bench(recipe, n=args.steps)
        print(f"\n{recipe.name} ({recipe.total_steps} steps)")
        for label, length, sec in rows:
            print(f"  {label:<13} {length:>6} steps x {sec:6.3f} s = {length * sec / 60:6.1f} min")
        verdict = "within" if total / 60 <= TARGET_MINUTES else "over"
        print(f"  total {total / 60:.1f} min ({verdict} the ~{TARGET_MINUTES} min target)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
