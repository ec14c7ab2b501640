"""Train a zoo model: ``python -m rh_lens.zoo.training.train NAME [--steps N] [--out DIR]``.

Training runs on the plain-PyTorch twin (:mod:`rh_lens.zoo.training.twin`); batches are a pure
function of (recipe, step) and checkpoints (weights, AdamW state, step, elapsed time; safetensors
+ JSON, no pickle) are written every ``--checkpoint-every`` steps under ``runs/zoo/NAME/``, so an
interrupted run continues bit for bit where it stopped.  Training runs with torch's deterministic
kernels (:func:`deterministic`), so that a rerun at the same thread count gives the same bits.
At the end the weights are written with :func:`rh_lens.models.save_model_dir` to ``--out``
(default ``runs/zoo/NAME/final``), evaluated, and with ``--install`` copied into the package
(``rh_lens/zoo/models/NAME``) if they meet the targets.  A stage marked ``restart`` begins from
the weights as written, with a fresh AdamW, so a model directory written at its first step (a
shipped model, say) starts it as a checkpoint would: ``--start-from DIR``.  ``--save-every N``
also writes the model every N steps (and at the first and last step) to
``runs/zoo/NAME/steps/step-SSSSSS``, a checkpoint series for :mod:`rh_lens.series`; writing
them leaves the training's bits alone.
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

from rh_lens.zoo import PACKAGE_MODELS, RUNS, step_dir


@contextlib.contextmanager
def deterministic():
    """torch's deterministic kernels while the block runs.  Without them the embedding's backward
    (an indexed accumulate) adds a token's gradients in an order that varies from run to run at
    two threads or more: two runs of the same five ``llama-s`` steps gave different weights."""
    import torch

    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def lr_at(recipe, step: int) -> float:
    """Linear warmup, then cosine decay to ``min_lr_frac`` of the peak over ``recipe.steps``;
    the fine-tuning stage after it runs at the constant ``recipe.finetune_lr``, the polish stage
    (if any) and the stages after it at their own ``lr``.

    With ``recipe.copy_lr`` set, the copy warm-up runs at that constant rate (after the linear
    warmup) and the cosine starts when the main stage does, after a linear ramp of
    ``recipe.main_warmup`` steps."""
    stage = recipe.stage_at(step)
    if stage is not None:
        return stage.lr
    if step >= recipe.steps:
        return recipe.finetune_lr
    if step < recipe.warmup:
        peak = recipe.lr if recipe.copy_lr is None else recipe.copy_lr
        return peak * (step + 1) / recipe.warmup
    start = recipe.warmup
    if recipe.copy_lr is not None:
        if step < recipe.copy_warmup:
            return recipe.copy_lr
        start = recipe.copy_warmup
        if step < start + recipe.main_warmup:  # the main mix's first, large gradients
            return recipe.lr * (step - start + 1) / recipe.main_warmup
    t = (step - start) / max(1, recipe.steps - start)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return recipe.lr * (recipe.min_lr_frac + (1 - recipe.min_lr_frac) * cos)


def load_tokenizer(path: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)


def get_tokenizer(recipe, run_dir: Path):
    """The parent's tokenizer, or the one this run built (built once, then reused)."""
    if recipe.parent is not None:
        return load_tokenizer(PACKAGE_MODELS / recipe.parent)
    tok_dir = run_dir / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file():
        return load_tokenizer(tok_dir)
    from rh_lens.zoo.training.tokenizer import build_tokenizer

    n_chars = 400_000 if recipe.vocab_size >= 1024 else 20_000
    tok = build_tokenizer(seed=recipe.tokenizer_seed, vocab_size=recipe.vocab_size,
                          n_chars=n_chars)
    tok.save_pretrained(str(tok_dir))
    return load_tokenizer(tok_dir)


def _save_checkpoint(ckpt: Path, twin, opt, state: dict) -> None:
    from safetensors.torch import save_file

    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in twin.state_dict().items()},
              str(tmp / "model.safetensors"))
    opt_tensors = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            opt_tensors[f"{i}.{k}"] = torch_tensor(v)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    shutil.rmtree(ckpt, ignore_errors=True)
    os.replace(tmp, ckpt)


def torch_tensor(v):
    import torch

    return v.detach().clone().contiguous() if isinstance(v, torch.Tensor) else torch.tensor(v)


def _load_checkpoint(ckpt: Path, twin, opt) -> dict:
    from safetensors.torch import load_file

    twin.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    flat = load_file(str(ckpt / "optimizer.safetensors"))
    state: dict[int, dict] = {}
    for key, v in flat.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    return json.loads((ckpt / "state.json").read_text())


def extends(recipe, old: dict, step: int) -> bool:
    """Whether a checkpoint that ``old`` (a serialised recipe) wrote at ``step`` continues as a
    run of ``recipe`` from scratch would: the two may differ only in the stages after the polish
    that start at ``step`` or later (appended, dropped or changed), so every step before has the
    same batch and rate."""
    import dataclasses

    start = old["steps"] + old["finetune_steps"] + (old.get("polish") or {}).get("steps", 0)
    k = 0  # old's stages that began before the checkpoint
    for stage in old.get("stages", []):
        if start >= step:
            break
        start, k = start + stage["steps"], k + 1
    if len(recipe.stages) < k:
        return False
    head = dict(old, stages=old.get("stages", [])[:k])
    if not head["stages"]:
        del head["stages"]  # as to_json leaves it out
    return dataclasses.replace(recipe, stages=recipe.stages[:k]).to_json() == head


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _load_weights(twin, path: Path) -> str:
    """Load a written model's weights into ``twin``; returns the file's SHA-256."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    data = path.read_bytes()  # one read: load + hash
    try:
        weights = load(data)
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from None
    missing, unexpected = twin.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the recipe's model: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    return hashlib.sha256(data).hexdigest()


def _init_from_parent(twin, parent: str) -> str:
    """Load the packaged ``parent``'s weights into ``twin``; returns the file's SHA-256, which
    the child's card keeps (a retrained parent leaves its children's cards pointing elsewhere)."""
    return _load_weights(twin, PACKAGE_MODELS / parent / "model.safetensors")


# What a run's state and its model's card share: [first step, value] of each part of the run
# (threads, machine), the parent's model.safetensors the run started from, and the written model
# a restart stage continued (train --start-from).
_CARRIED = ("threads", "machine", "parent_sha256", "started_from")


def _start_card(recipe, model_dir: Path) -> dict:
    """The card of a model that a run of ``recipe`` wrote at the first step of a ``restart``
    stage (``train --start-from``); anything else is refused."""
    card_path = model_dir / "card.json"
    if not card_path.is_file():
        raise ValueError(f"{model_dir} has no card.json: not a model written by a zoo run")
    try:
        card = json.loads(card_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{card_path} is not JSON: {err}") from None
    missing = [k for k in ("steps", "recipe", "train_seconds", "loss_curve") if k not in card]
    if missing:
        raise ValueError(f"{card_path} is not a zoo model's card: it lacks {missing}")
    step = card["steps"]
    if step not in recipe.restarts():
        raise ValueError(f"{model_dir} was written at step {step}, but {recipe.name} starts "
                         f"afresh from written weights only at step {recipe.restarts() or 'none'}")
    if not extends(recipe, card["recipe"], step):
        raise ValueError(f"{model_dir} was written by a different recipe than the first {step} "
                         f"steps of {recipe.name}")
    return card


def _start_from_model(twin, model_dir: Path, card: dict, recipe) -> dict:
    """Load the model of :func:`_start_card` into ``twin``; returns the run's state at the
    step it was written, from its card."""
    step = card["steps"]
    state = {"step": step, "train_seconds": card["train_seconds"], "recipe": recipe.to_json(),
             "losses": card["loss_curve"]}
    state.update({k: card[k] for k in _CARRIED if k in card})
    digest = _load_weights(twin, model_dir / "model.safetensors")
    state["started_from"] = {"step": step, "sha256": digest}
    return state


def machine() -> dict:
    """What a run's float results depend on besides the thread count: torch's build and the CPU
    and kernel set it runs on (the same recipe on another CPU, with other kernels, gives other
    weights, even where one and two threads give the same bits)."""
    import platform

    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"torch": torch.__version__, "cpu": cpu or "unknown",
            "kernels": torch.backends.cpu.get_cpu_capability()}


def _record_segment(state: dict, key: str, step: int, value) -> None:
    """Append [step, value] to ``state[key]`` when ``value`` differs from the last segment's."""
    segments = state.setdefault(key, [])
    if not segments or segments[-1][1] != value:
        segments.append([step, value])


def build(recipe):
    """The twin of ``recipe`` at its initialisation, its AdamW and the parameters it trains."""
    import torch

    from rh_lens.zoo.training.twin import Twin

    twin = Twin(recipe.hooked_config(), seed=recipe.seed)
    if recipe.aligned_unembed:
        with torch.no_grad():
            twin.unembed.W_U.copy_(twin.embed.W_E.T)
    return (twin, *_optimizer(recipe, twin))


def restart(recipe, twin):
    """Load ``twin``'s weights as :func:`write_model` stores them (``recipe.store_dtype``) and
    return a fresh AdamW and the parameters it trains (the first step of a ``restart`` stage)."""
    twin.load_state_dict(_stored_weights(recipe, twin))
    return _optimizer(recipe, twin)


def _stored_weights(recipe, twin) -> dict:
    """``twin``'s state dict in ``recipe.store_dtype``, as a written model holds it."""
    import torch

    dtype = getattr(torch, recipe.store_dtype)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in twin.state_dict().items()}


def _optimizer(recipe, twin):
    import torch

    params = [p for _, p in twin.trainable()]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    return opt, params


def batch_loss(recipe, twin, batch, weight: float):
    """(LM loss + ``weight`` x answer loss, answer loss) of ``batch``: mean next-token
    cross-entropies over the positions each mask selects."""
    import torch.nn.functional as F

    target = batch.tokens[:, 1:]
    lm_mask, answer_mask = batch.lm_mask, batch.answer_mask
    if recipe.live_logits:
        live = lm_mask | answer_mask
        logits = twin.unembed_resid(twin.resid_final(batch.tokens[:, :-1])[live])
        ce = F.cross_entropy(logits, target[live], reduction="none")
        lm_mask, answer_mask = lm_mask[live], answer_mask[live]
    else:
        logits = twin(batch.tokens[:, :-1])
        ce = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    lm = (ce * lm_mask).sum() / lm_mask.sum().clamp(min=1)
    ans = (ce * answer_mask).sum() / answer_mask.sum().clamp(min=1)
    return lm + weight * ans, ans


def train_step(recipe, step: int, tokenizer, twin, opt, params):
    """One optimiser step on ``step``'s batches; returns (loss, answer loss) as tensors."""
    import torch

    from rh_lens.zoo.training.data import make_batches

    main, param = make_batches(recipe, step, tokenizer)
    for group in opt.param_groups:
        group["lr"] = lr_at(recipe, step)
    if recipe.copy_freeze_pos:  # AdamW leaves a parameter without a gradient untouched
        twin.pos_embed.W_pos.requires_grad_(step >= recipe.copy_warmup)
    loss, ans = batch_loss(recipe, twin, main, recipe.answer_weight)
    if param is not None:
        loss = loss + batch_loss(recipe, twin, param, 1.0)[0]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss, ans


def train(recipe, *, run_dir: Path, steps: int | None = None, checkpoint_every: int = 250,
          progress: bool = True, start_from: Path | None = None, save_every: int | None = None):
    """Train (or resume) ``recipe`` up to ``steps``; returns (twin, tokenizer, state).

    ``start_from``: a model directory that a run of ``recipe`` wrote at the first step of a
    ``restart`` stage, to continue from where ``run_dir`` has no checkpoint.
    ``save_every``: also write the model (:func:`write_model`) at every multiple of it, at the
    step the run starts from and at ``steps``, to :func:`step_dir` ``(run_dir, step)``."""
    import torch
    from tqdm.auto import tqdm

    steps = recipe.total_steps if steps is None else steps
    if save_every is not None and save_every < 1:
        raise ValueError(f"--save-every must be a positive number of steps, not {save_every}")
    ckpt = run_dir / "checkpoint"
    if start_from is not None and (ckpt / "state.json").is_file():
        raise ValueError(f"{run_dir} has a checkpoint: resume it, or start from {start_from} "
                         "in another run directory")
    start_card = None if start_from is None else _start_card(recipe, start_from)
    run_dir.mkdir(parents=True, exist_ok=True)
    tok_dir = run_dir / "tokenizer"
    if start_from is not None and recipe.parent is None and not tok_dir.is_dir():
        load_tokenizer(start_from).save_pretrained(str(tok_dir))  # the weights' own
    tokenizer = get_tokenizer(recipe, run_dir)
    if len(tokenizer) != recipe.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, recipe wants {recipe.vocab_size}")
    twin, opt, params = build(recipe)
    state = {"step": 0, "train_seconds": 0.0, "recipe": recipe.to_json(), "losses": []}
    if (ckpt / "state.json").is_file():
        state = _load_checkpoint(ckpt, twin, opt)
        if state["recipe"] != recipe.to_json():
            if not extends(recipe, state["recipe"], state["step"]):
                raise ValueError(f"{ckpt} was written by a different recipe; delete it to restart")
            state["recipe"] = recipe.to_json()  # the same run, its later stages changed
    elif start_from is not None:
        state = _start_from_model(twin, start_from, start_card, recipe)
    elif recipe.parent is not None:
        state["parent_sha256"] = _init_from_parent(twin, recipe.parent)

    # Float results depend on the thread count (reductions split differently) and on the machine
    # (the CPU kernels torch dispatches to): the run records both from each step on, so that it
    # can be repeated bit for bit where both are the same.
    if state["step"] < steps:
        _record_segment(state, "threads", state["step"], torch.get_num_threads())
        _record_segment(state, "machine", state["step"], machine())
    def save_step() -> None:
        if save_every is not None:
            out = step_dir(run_dir, state["step"])
            if not (out / "model.safetensors").is_file():
                _write_atomic(twin, tokenizer, recipe, state, out)

    save_step()
    twin.train()
    bar = tqdm(total=steps, initial=state["step"], desc=recipe.name, disable=not progress)
    t0, done0 = time.perf_counter(), state["train_seconds"]
    restarts = set(recipe.restarts())
    while state["step"] < steps:
        step = state["step"]
        if step in restarts:
            opt, params = restart(recipe, twin)
        with deterministic():
            loss, ans = train_step(recipe, step, tokenizer, twin, opt, params)
        state["step"] = step + 1
        state["train_seconds"] = done0 + time.perf_counter() - t0
        if step % 10 == 0:
            state["losses"].append([step, round(loss.item(), 4), round(ans.item(), 4)])
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", answer=f"{ans.item():.3f}")
        if state["step"] % checkpoint_every == 0 or state["step"] == steps:
            _save_checkpoint(ckpt, twin, opt, state)
        if save_every is not None and (state["step"] % save_every == 0 or state["step"] == steps):
            save_step()
    bar.close()
    twin.eval()
    return twin, tokenizer, state


def _write_atomic(twin, tokenizer, recipe, state: dict, out: Path) -> None:
    """:func:`write_model` into a temporary sibling, renamed into place once complete."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    write_model(twin, tokenizer, recipe, state, tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def write_model(twin, tokenizer, recipe, state: dict, out: Path) -> Path:
    """Write the trained weights (in ``recipe.store_dtype``) in rh_lens's directory format, with
    a first model card."""
    from rh_lens.models import save_model_dir
    from rh_lens.zoo.tasks import CHAT_TEMPLATE

    if recipe.chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    card = {
        "name": recipe.name, "recipe": recipe.to_json(), "steps": state["step"],
        "train_seconds": round(state["train_seconds"], 1),
        "n_params": sum(p.numel() for p in twin.parameters()),
        "loss_curve": state["losses"],
    }
    card.update({k: state[k] for k in _CARRIED if k in state})
    out = save_model_dir(out, cfg=recipe.hooked_config(), state_dict=_stored_weights(recipe, twin),
                         tokenizer=tokenizer, card=card)
    _inline_chat_template(out)
    return out


def _inline_chat_template(path: Path) -> None:
    """Keep the chat template inside tokenizer_config.json (package data holds only .json)."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        cfg_path = path / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["chat_template"] = jinja.read_text()
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
        jinja.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="zoo recipe name (see rh_lens.zoo.training.recipes)")
    parser.add_argument("--steps", type=int, default=None, help="train up to this step")
    parser.add_argument("--out", type=Path, default=None, help="final model directory")
    parser.add_argument("--run-dir", type=Path, default=None, help="checkpoint directory")
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--save-every", type=int, default=None, metavar="N",
                        help="also write the model every N steps to RUN_DIR/steps/step-SSSSSS "
                             "(a checkpoint series for analyses.dynamics)")
    parser.add_argument("--start-from", type=Path, default=None,
                        help="a model directory written at the first step of a restart stage "
                             "(e.g. the packaged model): continue from it")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation")
    parser.add_argument("--install", action="store_true",
                        help="copy into rh_lens/zoo/models/NAME if the targets are met")
    parser.add_argument("--install-anyway", action="store_true",
                        help="copy into the package even below the targets (the card says so)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    from rh_lens.models import require_hooked

    require_hooked("training the zoo (its training twin is built from a HookedTransformerConfig)")
    import torch

    from rh_lens.zoo.training.recipes import get_recipe

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = get_recipe(args.name)
    run_dir = args.run_dir or RUNS / recipe.name
    twin, tok, state = train(recipe, run_dir=run_dir, steps=args.steps,
                             checkpoint_every=args.checkpoint_every, progress=not args.quiet,
                             start_from=args.start_from, save_every=args.save_every)
    out = write_model(twin, tok, recipe, state, args.out or run_dir / "final")
    print(f"wrote {out} after {state['step']} steps, {state['train_seconds']:.0f} s of training")
    if args.no_eval:
        return 0
    from rh_lens.zoo.training import evaluate

    report = evaluate.evaluate_dir(out, progress=not args.quiet)
    evaluate.write_card(out, report)
    print(evaluate.format_report(report))
    if args.install or args.install_anyway:
        if not report["meets_targets"] and not args.install_anyway:
            print("targets not met: not installed (--install-anyway installs all the same)")
            return 1
        dest = PACKAGE_MODELS / recipe.name
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(out, dest)
        print(f"installed {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
