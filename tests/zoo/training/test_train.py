"""The training loop: bit-exact resume, threads and machine records, live logits,
stages appended or branched, restarts from written models, children, the learning-rate schedule."""

import math

import pytest
import torch


def _params(twin):
    return {k: v.clone() for k, v in twin.state_dict().items()}


@pytest.mark.slow
def test_training_smoke_and_bit_exact_resume(tmp_path):
    from rh_lens.zoo.training.recipes import get_recipe
    from rh_lens.zoo.training.train import train

    recipe = get_recipe("micro")
    tok_dir = tmp_path / "a" / "tokenizer"
    twin_a, _, state_a = train(recipe, run_dir=tmp_path / "a", steps=4, progress=False,
                               checkpoint_every=2)
    assert state_a["step"] == 4 and (tmp_path / "a" / "checkpoint" / "state.json").is_file()
    # The same run, interrupted after 2 steps and resumed from its checkpoint.
    (tmp_path / "b").mkdir()
    import shutil

    shutil.copytree(tok_dir, tmp_path / "b" / "tokenizer")
    train(recipe, run_dir=tmp_path / "b", steps=2, progress=False, checkpoint_every=2)
    twin_b, _, state_b = train(recipe, run_dir=tmp_path / "b", steps=4, progress=False,
                               checkpoint_every=2)
    a, b = _params(twin_a), _params(twin_b)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert state_b["losses"] == state_a["losses"]
    n = torch.get_num_threads()
    assert state_a["threads"] == [[0, n]] and state_b["threads"] == [[0, n]]



@pytest.mark.slow
def test_saving_every_n_steps_leaves_the_bits_alone_and_resumes(tmp_path):
    """``save_every`` writes the models of steps 0, 2, 4 and 5 (the last); the run's weights
    equal a run without it, the last saved model is the final one byte for byte, and a resumed
    run writes only the steps it has not written."""
    from rh_lens.zoo import step_dir
    from rh_lens.zoo.training.recipes import get_recipe
    from rh_lens.zoo.training.train import train, write_model

    recipe = get_recipe("micro")
    plain, tok, state = train(recipe, run_dir=tmp_path / "a", steps=5, progress=False)
    final = write_model(plain, tok, recipe, state, tmp_path / "final")
    run = tmp_path / "b"
    train(recipe, run_dir=run, steps=3, progress=False, checkpoint_every=1, save_every=2)
    assert sorted(p.name for p in (run / "steps").iterdir()) == ["step-000000", "step-000002",
                                                                 "step-000003"]
    written = step_dir(run, 2).joinpath("model.safetensors").stat().st_mtime_ns
    saved, _, _ = train(recipe, run_dir=run, steps=5, progress=False, save_every=2)
    assert sorted(p.name for p in (run / "steps").iterdir()) == [
        "step-000000", "step-000002", "step-000003", "step-000004", "step-000005"]
    assert step_dir(run, 2).joinpath("model.safetensors").stat().st_mtime_ns == written
    a, b = _params(plain), _params(saved)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (step_dir(run, 5) / "model.safetensors").read_bytes() == \
        (final / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="positive"):
        train(recipe, run_dir=tmp_path / "c", steps=1, progress=False, save_every=0)

def test_a_run_records_the_thread_count_of_each_of_its_parts(tmp_path):
    from rh_lens.zoo.training.recipes import get_recipe
    from rh_lens.zoo.training.train import train, write_model

    recipe = get_recipe("micro")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        train(recipe, run_dir=tmp_path, steps=2, progress=False, checkpoint_every=2)
        torch.set_num_threads(2)
        train(recipe, run_dir=tmp_path, steps=2, progress=False)  # finished: nothing to add
        twin, tok, state = train(recipe, run_dir=tmp_path, steps=4, progress=False)
    finally:
        torch.set_num_threads(before)
    assert state["threads"] == [[0, 1], [2, 2]]
    import json

    out = write_model(twin, tok, recipe, state, tmp_path / "final")
    card = json.loads((out / "card.json").read_text())
    assert card["threads"] == [[0, 1], [2, 2]]
    from rh_lens.zoo.training.evaluate import card_markdown

    assert "Torch threads: 1 from step 0, 2 from step 2." in card_markdown(card)


@pytest.mark.slow
def test_a_run_records_the_machine_of_each_of_its_parts(tmp_path, monkeypatch):
    import json

    from rh_lens.zoo.training import train as zoo_train
    from rh_lens.zoo.training.evaluate import card_markdown
    from rh_lens.zoo.training.recipes import get_recipe

    recipe = get_recipe("micro")
    here = zoo_train.machine()
    assert here["torch"] == torch.__version__ and here["cpu"] and here["kernels"]
    zoo_train.train(recipe, run_dir=tmp_path, steps=2, progress=False, checkpoint_every=2)
    other = {"torch": "0.0", "cpu": "Elsewhere CPU", "kernels": "NONE"}
    monkeypatch.setattr(zoo_train, "machine", lambda: other)
    twin, tok, state = zoo_train.train(recipe, run_dir=tmp_path, steps=4, progress=False)
    assert state["machine"] == [[0, here], [2, other]]
    out = zoo_train.write_model(twin, tok, recipe, state, tmp_path / "final")
    card = json.loads((out / "card.json").read_text())
    assert card["machine"] == [[0, here], [2, other]]
    assert "Elsewhere CPU (NONE kernels), torch 0.0 from step 2." in card_markdown(card)


def _llama_s_shape(vocab: int, **changes):
    import dataclasses

    from rh_lens.zoo.training.recipes import get_recipe

    return dataclasses.replace(get_recipe("llama-s"), name="t", vocab_size=vocab, **changes)


@pytest.mark.slow
def test_a_run_at_two_threads_gives_the_same_bits_every_time(tmp_path, zoo_tok):
    import shutil

    from rh_lens.zoo.training.train import train

    # llama-s's shape and main mix from the first step; one step is enough: without torch's
    # deterministic kernels the embedding's gradient sums in a varying order at two threads.
    recipe = _llama_s_shape(len(zoo_tok), copy_warmup=0, warmup=1)
    zoo_tok.save_pretrained(str(tmp_path / "r0" / "tokenizer"))
    for i in (1, 2, 3):
        shutil.copytree(tmp_path / "r0" / "tokenizer", tmp_path / f"r{i}" / "tokenizer")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        runs = [_params(train(recipe, run_dir=tmp_path / f"r{i}", steps=1, progress=False)[0])
                for i in range(4)]
    finally:
        torch.set_num_threads(before)
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run
    for other in runs[1:]:
        assert all(torch.equal(runs[0][k], other[k]) for k in runs[0])


@pytest.mark.slow
@pytest.mark.parametrize("step", [10, 500])  # prose and task rows, then a padded polish batch
def test_live_logits_give_the_full_loss_and_its_gradients(zoo_tok, step):
    import dataclasses

    from rh_lens.zoo.training.data import make_batches
    from rh_lens.zoo.training.train import batch_loss, build

    full = _llama_s_shape(len(zoo_tok), n_layers=2, copy_warmup=5, steps=400, finetune_steps=0)
    live = dataclasses.replace(full, live_logits=True)
    main, param = make_batches(full, step, zoo_tok)
    dead = ~(main.lm_mask | main.answer_mask)
    assert dead.any()  # the live path has positions to leave out
    out = []
    for recipe in (full, live):
        twin = build(recipe)[0]
        loss, ans = batch_loss(recipe, twin, main, 2.0)
        loss = loss + batch_loss(recipe, twin, param, 1.0)[0]
        loss.backward()
        out.append((loss.detach(), ans.detach(), {k: p.grad for k, p in twin.trainable()}))
    (loss_f, ans_f, grads_f), (loss_l, ans_l, grads_l) = out
    torch.testing.assert_close(loss_l, loss_f, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ans_l, ans_f, rtol=1e-6, atol=1e-6)
    assert grads_f.keys() == grads_l.keys()
    for k in grads_f:
        torch.testing.assert_close(grads_l[k], grads_f[k], rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_a_finished_run_extended_by_a_stage_equals_the_longer_recipe_from_scratch(tmp_path):
    import dataclasses
    import shutil

    from rh_lens.zoo.training.recipes import Mix, Polish, get_recipe
    from rh_lens.zoo.training.train import lr_at, train

    base = dataclasses.replace(get_recipe("micro"), polish=Polish(steps=1))
    stage = Polish(steps=2, lr=1e-4, procedural=0.0, mix=Mix(0.0, 1.0, 0.0, 0.0))
    longer = dataclasses.replace(base, stages=(stage,))
    assert longer.total_steps == base.total_steps + 2 == 7
    assert longer.stage_at(base.total_steps) is stage and lr_at(longer, 6) == 1e-4
    assert "stages" not in base.to_json() and longer.to_json()["stages"][0]["steps"] == 2

    twin_a, _, state_a = train(longer, run_dir=tmp_path / "a", progress=False)
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "tokenizer", tmp_path / "b" / "tokenizer")
    train(base, run_dir=tmp_path / "b", progress=False)  # finished under the shorter recipe
    twin_b, _, state_b = train(longer, run_dir=tmp_path / "b", progress=False)
    a, b = _params(twin_a), _params(twin_b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert state_b["step"] == 7 and state_b["recipe"] == longer.to_json()
    assert state_b["losses"] == state_a["losses"]
    # Anything but appended stages still refuses the checkpoint.
    changed = dataclasses.replace(longer, lr=1e-2, stages=(stage, stage))
    with pytest.raises(ValueError, match="different recipe"):
        train(changed, run_dir=tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="different recipe"):  # a stage dropped
        train(base, run_dir=tmp_path / "b", progress=False)


@pytest.mark.slow
def test_a_checkpoint_branches_into_any_stage_that_starts_after_it(tmp_path):
    import dataclasses
    import shutil

    from rh_lens.zoo.training.recipes import Mix, Polish, get_recipe
    from rh_lens.zoo.training.train import train

    base = dataclasses.replace(get_recipe("micro"), polish=Polish(steps=1))
    first = Polish(steps=2, lr=1e-4, procedural=0.0, mix=Mix(0.0, 1.0, 0.0, 0.0))
    last_a = Polish(steps=2, lr=1e-4, mix=Mix(1.0, 0.0, 0.0, 0.0))
    last_b = Polish(steps=2, lr=2e-4, mix=Mix(1.0, 0.0, 0.0, 0.0), late=1.0)
    a = dataclasses.replace(base, stages=(first, last_a))
    b = dataclasses.replace(base, stages=(first, last_b))
    assert a.late_stages()[-1][0] == 7 and a.total_steps == 9

    twin_b, _, state_b = train(b, run_dir=tmp_path / "b", progress=False)
    (tmp_path / "a").mkdir()
    shutil.copytree(tmp_path / "b" / "tokenizer", tmp_path / "a" / "tokenizer")
    train(a, run_dir=tmp_path / "a", steps=7, progress=False)  # stopped where last_a starts
    branch = tmp_path / "branch"
    shutil.copytree(tmp_path / "a", branch)
    twin_a2b, _, state_a2b = train(b, run_dir=branch, progress=False)
    x, y = _params(twin_b), _params(twin_a2b)
    assert all(torch.equal(x[k], y[k]) for k in x)
    assert state_a2b["recipe"] == b.to_json() and state_a2b["losses"] == state_b["losses"]
    # One step later, last_a has begun: a checkpoint there no longer branches into b.
    train(a, run_dir=tmp_path / "a", steps=8, progress=False)
    with pytest.raises(ValueError, match="different recipe"):
        train(b, run_dir=tmp_path / "a", progress=False)


@pytest.mark.slow
def test_a_restart_stage_continues_a_written_model_as_the_recipe_does_from_scratch(tmp_path):
    """A ``restart`` stage begins from the weights as stored (float16 here) with a fresh AdamW,
    so the model a finished run wrote (a shipped one, whose checkpoint is gone) starts it:
    the same bits and losses as the longer recipe run from scratch."""
    import dataclasses
    import hashlib
    import json
    import shutil

    from rh_lens.zoo.training.evaluate import card_markdown
    from rh_lens.zoo.training.recipes import Mix, Polish, get_recipe
    from rh_lens.zoo.training.train import train, write_model

    base = dataclasses.replace(get_recipe("micro"), polish=Polish(steps=1), store_dtype="float16")
    stage = Polish(steps=2, lr=1e-3, mix=Mix(1.0, 0.0, 0.0, 0.0), late=1.0, restart=True)
    longer = dataclasses.replace(base, stages=(stage,))
    assert longer.restarts() == [5] and longer.to_json()["stages"][0]["restart"] is True
    assert "restart" not in dataclasses.replace(longer, stages=(
        dataclasses.replace(stage, restart=False),)).to_json()["stages"][0]

    twin_a, _, state_a = train(longer, run_dir=tmp_path / "a", progress=False)
    twin_b, tok_b, state_b = train(base, run_dir=tmp_path / "b", progress=False)
    shipped = write_model(twin_b, tok_b, base, state_b, tmp_path / "shipped")
    shutil.rmtree(tmp_path / "b")  # the run's checkpoint and tokenizer are gone
    twin_c, _, state_c = train(longer, run_dir=tmp_path / "c", start_from=shipped,
                               progress=False)
    a, c = _params(twin_a), _params(twin_c)
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert state_c["losses"] == state_a["losses"] and state_c["step"] == 7
    digest = hashlib.sha256((shipped / "model.safetensors").read_bytes()).hexdigest()
    assert state_c["started_from"] == {"step": 5, "sha256": digest}
    assert state_c["recipe"] == longer.to_json()
    card = json.loads((write_model(twin_c, tok_b, longer, state_c, tmp_path / "out")
                       / "card.json").read_text())
    assert card["started_from"] == state_c["started_from"]
    assert f"at step 5 from the written model with SHA-256 {digest[:12]}" in card_markdown(card)
    # Without the restart the stage keeps AdamW's moments and the float32 weights.
    plain = dataclasses.replace(longer, stages=(dataclasses.replace(stage, restart=False),))
    twin_p, _, _ = train(plain, run_dir=tmp_path / "p", progress=False)
    p = _params(twin_p)
    assert any(not torch.equal(a[k], p[k]) for k in a)


@pytest.mark.slow
def test_start_from_refuses_a_model_it_cannot_continue(tmp_path):
    import dataclasses
    import json

    from rh_lens.zoo.training.recipes import Polish, get_recipe
    from rh_lens.zoo.training.train import train, write_model

    base = dataclasses.replace(get_recipe("micro"), polish=Polish(steps=1))
    longer = dataclasses.replace(base, stages=(Polish(steps=1, restart=True),))
    twin, tok, state = train(base, run_dir=tmp_path / "b", progress=False)
    shipped = write_model(twin, tok, base, state, tmp_path / "shipped")

    twin_e, tok_e, state_e = train(base, run_dir=tmp_path / "e", steps=4, progress=False)
    early = write_model(twin_e, tok_e, base, state_e, tmp_path / "early")
    with pytest.raises(ValueError, match="written at step 4.*only at step \\[5\\]"):
        train(longer, run_dir=tmp_path / "x1", start_from=early, progress=False)
    other = dataclasses.replace(longer, lr=1e-2)
    with pytest.raises(ValueError, match="different recipe"):
        train(other, run_dir=tmp_path / "x2", start_from=shipped, progress=False)
    with pytest.raises(ValueError, match="has a checkpoint"):
        train(longer, run_dir=tmp_path / "b", start_from=shipped, progress=False)
    no_card = tmp_path / "no_card"
    no_card.mkdir()
    with pytest.raises(ValueError, match="no card.json"):
        train(longer, run_dir=tmp_path / "x3", start_from=no_card, progress=False)
    card = json.loads((shipped / "card.json").read_text())
    assert card["steps"] == 5
    (no_card / "card.json").write_text(json.dumps({"steps": 5}))
    with pytest.raises(ValueError, match="not a zoo model's card: it lacks \\['recipe', "):
        train(longer, run_dir=tmp_path / "x3", start_from=no_card, progress=False)
    (shipped / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        train(longer, run_dir=tmp_path / "x4", start_from=shipped, progress=False)


def test_learned_positions_can_stay_fixed_through_the_warm_up(tmp_path):
    import dataclasses

    from rh_lens.zoo.training.recipes import get_recipe
    from rh_lens.zoo.training.train import train
    from rh_lens.zoo.training.twin import Twin

    recipe = dataclasses.replace(get_recipe("micro"), family="gpt2", n_kv_heads=4, steps=3,
                                 copy_warmup=2, copy_freeze_pos=True, aligned_unembed=True)
    fresh = Twin(recipe.hooked_config(), seed=recipe.seed)
    twin, _, _ = train(recipe, run_dir=tmp_path, steps=0, progress=False)
    assert torch.equal(twin.unembed.W_U, twin.embed.W_E.T)
    assert not torch.equal(twin.unembed.W_U, fresh.unembed.W_U)
    twin, _, _ = train(recipe, run_dir=tmp_path, steps=2, progress=False, checkpoint_every=1)
    assert torch.equal(twin.pos_embed.W_pos, fresh.pos_embed.W_pos)  # the warm-up's two steps
    assert not torch.equal(twin.embed.W_E, fresh.embed.W_E)
    twin, _, _ = train(recipe, run_dir=tmp_path, steps=3, progress=False, checkpoint_every=1)
    assert not torch.equal(twin.pos_embed.W_pos, fresh.pos_embed.W_pos)  # the main stage


def test_a_child_starts_from_its_parents_weights_and_its_card_names_that_file(tmp_path,
                                                                              monkeypatch):
    import dataclasses
    import hashlib
    import json

    from safetensors.torch import load_file

    from rh_lens.zoo.training import train as train_mod
    from rh_lens.zoo.training.recipes import get_recipe

    parent = get_recipe("micro")
    twin, tok, state = train_mod.train(parent, run_dir=tmp_path / "p", steps=2, progress=False)
    models = tmp_path / "models"
    train_mod.write_model(twin, tok, parent, state, models / "micro")
    monkeypatch.setattr(train_mod, "PACKAGE_MODELS", models)
    child = dataclasses.replace(parent, name="micro-child", parent="micro", copy_warmup=0)

    start, _, state0 = train_mod.train(child, run_dir=tmp_path / "c0", steps=0, progress=False)
    shipped = load_file(str(models / "micro" / "model.safetensors"))
    assert all(torch.equal(v, shipped[k]) for k, v in start.state_dict().items() if k in shipped)
    digest = hashlib.sha256((models / "micro" / "model.safetensors").read_bytes()).hexdigest()
    assert state0["parent_sha256"] == digest

    # Interrupted and resumed, the run keeps the digest of the file it started from.
    train_mod.train(child, run_dir=tmp_path / "c", steps=1, progress=False, checkpoint_every=1)
    (models / "micro" / "model.safetensors").write_bytes(b"retrained")
    kid, ktok, kstate = train_mod.train(child, run_dir=tmp_path / "c", steps=2, progress=False)
    out = train_mod.write_model(kid, ktok, child, kstate, tmp_path / "child")
    assert json.loads((out / "card.json").read_text())["parent_sha256"] == digest


def test_lr_schedule_warms_up_and_decays():
    from rh_lens.zoo.training.recipes import get_recipe
    from rh_lens.zoo.training.train import lr_at

    r = get_recipe("llama-s")
    assert lr_at(r, 0) < lr_at(r, r.warmup) == pytest.approx(r.lr)
    assert lr_at(r, r.steps - 1) == pytest.approx(r.lr * r.min_lr_frac, rel=1e-4)
    assert r.finetune_steps > 0 and r.polish_start == r.steps + r.finetune_steps
    assert lr_at(r, r.steps) == lr_at(r, r.polish_start - 1) == r.finetune_lr


def test_a_constant_copy_lr_holds_through_the_warm_up_and_the_cosine_starts_after_it():
    import dataclasses

    from rh_lens.zoo.training.recipes import get_recipe
    from rh_lens.zoo.training.train import lr_at

    r = dataclasses.replace(get_recipe("gpt2-s"), lr=2e-3)  # a main rate apart from copy_lr's
    assert r.copy_lr is not None and r.copy_lr != r.lr
    assert lr_at(r, 0) == pytest.approx(r.copy_lr / r.warmup)
    assert lr_at(r, r.warmup) == lr_at(r, r.copy_warmup - 1) == r.copy_lr
    assert r.main_warmup > 0  # the main mix's rate ramps up from the warm-up's end ...
    assert lr_at(r, r.copy_warmup) == pytest.approx(r.lr / r.main_warmup)
    assert lr_at(r, r.copy_warmup + r.main_warmup - 1) == pytest.approx(r.lr)
    # ... while the cosine runs from the main stage's start on
    cos = 0.5 * (1 + math.cos(math.pi * (r.main_warmup + 10) / (r.steps - r.copy_warmup)))
    want = r.lr * (r.min_lr_frac + (1 - r.min_lr_frac) * cos)
    assert lr_at(r, r.copy_warmup + r.main_warmup + 10) == pytest.approx(want)
    assert lr_at(r, r.steps - 1) == pytest.approx(r.lr * r.min_lr_frac, rel=1e-3)
    # recipes without copy_lr keep their old serialisation (old checkpoints still resume)
    assert "copy_lr" not in get_recipe("llama-s").to_json() and "copy_lr" in r.to_json()
