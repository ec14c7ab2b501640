"""The zoo's data generators, tokenizer, training twin and training loop (no trained weights)."""

import math
import random

import pytest
import torch

from rh_lens.zoo import tasks
from rh_lens.zoo.prose import Prose, corpus


@pytest.fixture(scope="session")
def zoo_tok():
    from rh_lens.zoo.training.tokenizer import build_tokenizer

    return build_tokenizer(vocab_size=512, n_chars=20_000)


# ---------------------------------------------------------------- generators


def test_prose_is_deterministic_per_seed():
    assert corpus(seed=3, n_chars=3000) == corpus(seed=3, n_chars=3000)
    assert corpus(seed=3, n_chars=3000) != corpus(seed=4, n_chars=3000)
    text = Prose(7).text(n_chars=500)
    assert len(text) >= 500 and text.rstrip()[-1] in '.!?"'


def test_insert_at_depth_moves_back_to_a_sentence_end():
    ctx = "One two. Three four! Five six"
    assert tasks.insert_at_depth(ctx, "N.", 0.0) == ("N. " + ctx, 0)
    text, at = tasks.insert_at_depth(ctx, "N.", 0.5)  # inside "Three four!"
    assert text == "One two. N. Three four! Five six" and text[at:].startswith("N.")
    text, _ = tasks.insert_at_depth(ctx, "N.", 1.0)  # after the last complete sentence
    assert text == "One two. Three four! N. Five six"
    with pytest.raises(ValueError, match="depth"):
        tasks.insert_at_depth(ctx, "N.", 1.5)


def test_niah_example_has_the_papers_format(zoo_tok):
    make = lambda seed, depth: tasks.niah_example(  # noqa: E731
        random.Random(seed), tokenizer=zoo_tok.backend_tokenizer, n_haystack_tokens=80,
        depth=depth, templates=tasks.HELDOUT_TEMPLATES)
    ex = make(1, 0.5)
    assert ex == make(1, 0.5) and ex != make(2, 0.5)
    assert ex.prompt.endswith("?\nAnswer:")
    assert tasks.QUESTION_PREFIX in ex.prompt
    assert ex.target == f" {ex.answer}\n"
    needle = ex.meta["needle"]
    assert ex.prompt[ex.meta["needle_char"]:].startswith(needle)
    assert f"is {ex.answer}." in needle or f"was {ex.answer}." in needle
    assert make(1, 0.0).prompt.startswith(make(1, 0.0).meta["needle"])


def test_heldout_templates_are_disjoint_from_training():
    train = {t.needle for t in tasks.TRAIN_TEMPLATES} | {t.question for t in tasks.TRAIN_TEMPLATES}
    for t in tasks.HELDOUT_TEMPLATES:
        assert t.needle not in train and t.question not in train


def test_multihop_target_rereads_both_facts(zoo_tok):
    ex = tasks.multihop_example(random.Random(0), tokenizer=zoo_tok.backend_tokenizer,
                                n_haystack_tokens=60)
    assert ex.target.startswith(tasks.COT_START)
    steps = ex.target[len(tasks.COT_START):].split(". ")
    assert steps[0].strip() in ex.prompt and steps[1].strip() + "." in ex.prompt
    assert tasks.final_answer(ex.target) == ex.answer


def test_one_official_a_town_keys_the_second_hop_on_the_town_alone(zoo_tok):
    import re

    backend = zoo_tok.backend_tokenizer
    for seed in range(8):
        kw = dict(tokenizer=backend, n_haystack_tokens=80, n_people=2 + seed % 3)
        two = tasks.multihop_example(random.Random(seed), **kw)
        assert two == tasks.multihop_example(random.Random(seed), roles=2, **kw)  # the default
        one = tasks.multihop_example(random.Random(seed), roles=1, **kw)
        context = one.prompt.split(tasks.QUESTION_PREFIX)[0]
        officials = re.findall(r"The (\w+) of (\w+) is (\w+ \w+)\.", context)
        assert len(officials) == kw["n_people"] and len({r for r, _, _ in officials}) == 1
        role, person = re.search(r"Who is the (\w+) of the town where (\w+) lives",
                                 one.prompt).groups()
        town = dict(re.findall(r"(\w+) lives in (\w+)\.", context))[person]
        assert {(r, t): o for r, t, o in officials}[role, town] == one.answer
        assert len(re.findall(r"The \w+ of \w+ is", two.prompt.split(tasks.QUESTION_PREFIX)[0])) \
            == 2 * kw["n_people"]
    with pytest.raises(ValueError, match="1 or 2 officials"):
        tasks.multihop_example(random.Random(0), roles=3, **kw)


# How each hop form says where a person lives, written out independently of tasks.HOP_FORMS.
_LIVES = {"lives": (r"(\w+) lives in (\w+)\.", "{} lives in {}."),
          "at": (r"(\w+) at ([A-Z]\w+)\.", "{} at {}.")}


@pytest.mark.parametrize("form", ["lives", "at"])
def test_lookup_target_gives_every_asked_persons_own_town(zoo_tok, form):
    import re

    for seed in range(6):
        ex = tasks.lookup_example(random.Random(seed), tokenizer=zoo_tok.backend_tokenizer,
                                  n_haystack_tokens=60, n_people=3 + seed % 4, hop_form=form)
        context, question = ex.prompt.split(tasks.QUESTION_PREFIX)
        lives = dict(re.findall(_LIVES[form][0], context))
        asked = re.findall(r"[A-Z]\w+", question.split("Where do ")[1].split("?")[0])
        written = re.findall(" " + _LIVES[form][0], ex.target)
        assert len(lives) == len(asked) == 3 + seed % 4 and ex.target.endswith(".\n")
        assert [p for p, _ in written] == asked  # in the question's order
        assert all(lives[p] == t for p, t in written)
        assert ex.answer == " ".join(t for _, t in written)
    again = tasks.lookup_example(random.Random(5), tokenizer=zoo_tok.backend_tokenizer,
                                 n_haystack_tokens=60, n_people=4)
    assert again == tasks.lookup_example(random.Random(5), tokenizer=zoo_tok.backend_tokenizer,
                                         n_haystack_tokens=60, n_people=4)


@pytest.mark.parametrize("form", ["lives", "at"])
def test_multihop_step_names_the_hop_that_went_wrong(zoo_tok, form):
    import re

    lives_re, fact = _LIVES[form]
    ex = tasks.multihop_example(random.Random(3), tokenizer=zoo_tok.backend_tokenizer,
                                n_haystack_tokens=60, n_people=3, hop_form=form)
    chain = re.search(r"step\. " + lives_re + r" The (\w+) of \w+ is (\w+ \w+)\.", ex.target)
    person, town, role, official = chain.groups()
    context = ex.prompt.split(tasks.QUESTION_PREFIX)[0]
    lives = dict(re.findall(lives_re, context))
    other = next(t for p, t in lives.items() if p != person)
    nowhere = next(t for t in tasks.PLACES if t not in context)
    other_official = next(o for r, o in re.findall(r"The (\w+) of \w+ is (\w+ \w+)\.", context)
                          if o != official)

    def said(t, o, final=None):
        return (f"{tasks.COT_START} {fact.format(person, t)} The {role} of {t} is {o}. "
                f"So the answer is {final or o}.\n")

    def step(prompt, generated):
        return tasks.multihop_step(prompt, generated, form)

    assert len(lives) == 3 and lives[person] == town and other != town
    assert step(ex.prompt, ex.target) == "right"
    assert step(ex.prompt, said(other, other_official)) == "first hop: another person's town"
    assert step(ex.prompt, said(nowhere, other_official)) == "first hop: another town"
    assert step(ex.prompt, said(town, other_official)) == "second hop"
    assert step(ex.prompt, said(town, official, "Nobody Here")) == "final answer"
    assert step(ex.prompt, " " + other_official + "\n") == "form"
    chat = tasks.to_chat(ex)  # the chat reply starts with "Answer:"
    assert step(chat.prompt, "Answer:" + said(other, other_official)) == \
        "first hop: another person's town"
    other_form = "lives" if form == "at" else "at"  # read in the other form, there is no chain
    assert tasks.multihop_step(ex.prompt, said(other, other_official), other_form) == "form"
    with pytest.raises(ValueError, match="unknown hop form 'where'"):
        tasks.multihop_step(ex.prompt, ex.target, "where")
    with pytest.raises(ValueError, match="multi-hop"):
        step("Question: what?\nAnswer:", ex.target)


def test_the_at_form_keys_each_town_two_tokens_after_its_person_and_changes_no_draw(zoo_tok):
    import re

    backend = zoo_tok.backend_tokenizer
    for seed in range(8):
        kw = dict(tokenizer=backend, n_haystack_tokens=80, n_people=2 + seed % 3)
        lives = tasks.multihop_example(random.Random(seed), **kw)
        at = tasks.multihop_example(random.Random(seed), hop_form="at", **kw)
        assert at.answer == lives.answer
        question = lives.prompt.split(tasks.QUESTION_PREFIX)[1]
        assert at.prompt.split(tasks.QUESTION_PREFIX)[1] == question
        where = dict(re.findall(_LIVES["lives"][0], lives.prompt))
        context = at.prompt.split(tasks.QUESTION_PREFIX)[0]
        assert " lives in " not in context and dict(re.findall(_LIVES["at"][0], context)) == where
        officials = r"The \w+ of \w+ is \w+ \w+\."  # the same, placed by token depth
        assert sorted(re.findall(officials, context)) == sorted(re.findall(officials, lives.prompt))
        person, town = re.search(r"step\. (\w+) at (\w+)\.", at.target).groups()
        assert where[person] == town
        assert at.target.replace(f" {person} at {town}.", f" {person} lives in {town}.") == \
            lives.target
    from rh_lens.zoo.training.train import PACKAGE_MODELS, load_tokenizer

    shipped = load_tokenizer(PACKAGE_MODELS / "llama-s")  # what the zoo models read
    pieces = shipped.tokenize(" Noor at Tolbrook.")
    assert pieces == ["\u0120Noor", "\u0120at", "\u0120Tolbrook", "."]
    with pytest.raises(ValueError, match="unknown hop form"):
        tasks.multihop_example(random.Random(0), hop_form="home", **kw)


def test_parametric_facts_are_fixed_and_cot_ends_with_the_answer():
    facts = tasks.parametric_facts()
    assert facts == tasks.parametric_facts() and len(set(facts)) == len(facts)
    s, a = facts[0]
    assert tasks.final_answer(tasks.parametric_example(s, a, cot=True).target) == a
    assert tasks.parametric_example(s, a, cot=False).target == f" {a}\n"


def test_chat_template_renders_like_the_training_format(zoo_tok, tmp_path):
    from transformers import PreTrainedTokenizerFast

    from rh_lens.zoo.training.train import _inline_chat_template

    zoo_tok.save_pretrained(str(tmp_path))
    tok = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))  # a copy we may change
    tok.chat_template = tasks.CHAT_TEMPLATE
    tok.save_pretrained(str(tmp_path))
    _inline_chat_template(tmp_path)  # package data ships only .json files
    assert not (tmp_path / "chat_template.jinja").exists()
    tok = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    user = tasks.chat_user_text("Some book. ", "What is it?")
    rendered = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                       add_generation_prompt=True)
    assert rendered == tasks.chat_render(user)
    ex = tasks.Example(tasks.niah_prompt("Book. ", "Q?"), " A\n", "niah", "A")
    chat = tasks.to_chat(ex)
    assert chat.prompt == tasks.chat_render(tasks.chat_user_text("Book. ", "Q?"))
    assert chat.target == "Answer: A\n<|end|>\n"


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_any_text_and_works_in_transformer_lens(zoo_tok):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    text = "Zürich — naïve café! Based on the content of the book, Question: x?\nAnswer: 42"
    ids = zoo_tok(text)["input_ids"]
    assert ids[0] == zoo_tok.bos_token_id and zoo_tok.unk_token_id is None
    assert zoo_tok.decode(ids, skip_special_tokens=True) == text
    offsets = zoo_tok(text, return_offsets_mapping=True)["offset_mapping"]
    assert offsets[0] == (0, 0) and offsets[-1][1] == len(text)
    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, n_ctx=64,
                                  d_vocab=len(zoo_tok), act_fn="gelu", normalization_type="LN",
                                  d_mlp=32)
    model = HookedTransformer(cfg, tokenizer=zoo_tok)
    assert model.tokenizer is zoo_tok
    tokens = model.to_tokens(text, truncate=False)
    assert tokens[0, 0].item() == zoo_tok.bos_token_id
    assert model.to_string(tokens[0, 1:]) == text
    assert zoo_tok.pad_token_id not in (zoo_tok.eos_token_id, zoo_tok.bos_token_id)


def test_tokenizer_is_deterministic(zoo_tok):
    from rh_lens.zoo.training.tokenizer import build_tokenizer

    assert build_tokenizer(vocab_size=512, n_chars=20_000).get_vocab() == zoo_tok.get_vocab()


# ---------------------------------------------------------------- twin


def _cfg(family: str, vocab: int):
    from rh_lens.zoo.training.recipes import Recipe

    r = Recipe(name="t", family=family, n_layers=2, d_model=32, n_heads=4,
               n_kv_heads=2 if family == "llama" else 4, d_head=8, d_mlp=64, n_ctx=64, steps=1,
               vocab_size=vocab)
    return r.hooked_config()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_twin_logits_equal_hooked_transformer(family):
    from transformer_lens import HookedTransformer

    from rh_lens.zoo.training.twin import Twin

    cfg = _cfg(family, 97)
    twin = Twin(cfg, seed=0)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        # Random, non-trivial weights, and biases where the family has them (the llama
        # twin's stay at zero: it never adds them).
        for _, p in twin.trainable():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    model = HookedTransformer(cfg)
    missing, unexpected = model.load_state_dict(twin.state_dict(), strict=False)
    assert not unexpected
    assert all(k.rsplit(".", 1)[-1] in {"mask", "IGNORE", "rotary_sin", "rotary_cos"}
               for k in missing)
    tokens = torch.randint(0, 97, (2, 50), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(twin(tokens), model(tokens), atol=1e-4, rtol=1e-4)
    if family == "llama":
        assert "blocks.0.attn._W_K" in twin.state_dict()



def test_the_llama_twin_skips_its_zero_biases_without_changing_a_bit():
    from rh_lens.zoo.training.twin import Twin

    cfg = _cfg("llama", 97)
    twin = Twin(cfg, seed=0)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in twin.trainable():
            p[1].add_(torch.randn(p[1].shape, generator=gen) * 0.3)
    tokens = torch.randint(0, 97, (2, 50), generator=torch.Generator().manual_seed(1))

    def logits_and_grads():
        twin.zero_grad(set_to_none=True)
        out = twin(tokens)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for _, p in twin.trainable()]

    fast, fast_grads = logits_and_grads()
    twin._bias = lambda x, b: x + b  # the obvious forward: every bias added
    slow, slow_grads = logits_and_grads()
    assert torch.equal(fast, slow)
    assert all(torch.equal(a, b) for a, b in zip(fast_grads, slow_grads, strict=True))


def test_the_llama_twin_refuses_weights_with_nonzero_biases():
    from rh_lens.zoo.training.twin import Twin

    twin = Twin(_cfg("llama", 97), seed=0)
    weights = twin.state_dict()
    weights["blocks.1.mlp.b_out"] = torch.full_like(weights["blocks.1.mlp.b_out"], 0.5)
    with pytest.raises(ValueError, match="blocks.1.mlp.b_out"):
        twin.load_state_dict(weights)


# ---------------------------------------------------------------- training


def _params(twin):
    return {k: v.clone() for k, v in twin.state_dict().items()}


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

def test_written_model_loads_with_rh_lens_and_matches_the_twin(tmp_path):
    from rh_lens.models import load_model
    from rh_lens.zoo.training import evaluate
    from rh_lens.zoo.training.recipes import get_recipe
    from rh_lens.zoo.training.train import train, write_model

    recipe = get_recipe("micro")
    twin, tok, state = train(recipe, run_dir=tmp_path / "run", steps=1, progress=False)
    out = write_model(twin, tok, recipe, state, tmp_path / "model")
    model = load_model(str(out))
    text = "Mara found the old lamp. Based on the content of the book, Question: What?\nAnswer:"
    tokens = model.to_tokens(text, truncate=False)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), twin(tokens), atol=1e-4, rtol=1e-4)
    twin2, _, card = evaluate.load_dir(out)
    assert card["steps"] == 1 and card["recipe"]["name"] == "micro"
    outs = evaluate.generate(twin2, tok, [text, "Mara"], max_new_tokens=3)
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)


def test_niah_evaluation_counts_every_trial_of_every_depth(zoo_tok, monkeypatch):
    """A stand-in generator that answers every needle but those at depth 1.0: the report must
    give that depth 0, every other 1, and ``per_cell`` x 4 lengths trials a depth."""
    from rh_lens.zoo.training import evaluate

    depth_of: dict[str, tuple[float, str]] = {}  # prompt -> (depth, answer)
    make = tasks.niah_example

    def recording(rng, **kw):
        ex = make(rng, **kw)
        depth_of[ex.prompt] = (kw["depth"], ex.answer)
        return ex

    def oracle(twin, tok, prompts, **kw):
        return [f" {'wrong' if depth_of[p][0] == 1.0 else depth_of[p][1]}\n" for p in prompts]

    monkeypatch.setattr(tasks, "niah_example", recording)
    monkeypatch.setattr(evaluate, "generate", oracle)
    report = evaluate.eval_niah(None, zoo_tok, n_ctx=128, seed=3, per_cell=3)
    assert report["n_trials"] == evaluate.N_DEPTHS * 4 * 3 and report["per_depth_trials"] == 12
    assert report["per_depth"] == {f"{i / 10:.1f}": float(i < 10) for i in range(11)}
    assert report["min"] == 0.0 and report["mean"] == pytest.approx(10 / 11)
    assert "(12 a depth)" in evaluate.format_report({"niah_heldout": report})
    with pytest.raises(ValueError, match="per_cell must be at least 1"):
        evaluate.eval_niah(None, zoo_tok, n_ctx=128, seed=3, per_cell=0)


@pytest.mark.parametrize(("form", "roles"), [("lives", 2), ("at", 2), ("at", 1)])
def test_multihop_evaluation_asks_and_reads_in_the_models_chain_form(zoo_tok, monkeypatch, form,
                                                                     roles):
    """A stand-in generator that reads the facts in ``form`` and restates the chain, with
    another person's town on every other prompt: accuracy one half, the misses named."""
    import re

    from rh_lens.zoo.training import evaluate

    lives_re, fact = _LIVES[form]
    seen = []

    def oracle(twin, tok, prompts, **kw):
        outs = []
        for i, prompt in enumerate(prompts):
            asked = re.search(r"Who is the (\w+) of the town where (\w+) lives", prompt)
            role, person = asked.groups()
            context = prompt.split(tasks.QUESTION_PREFIX)[0]
            lives = dict(re.findall(lives_re, context))
            town = lives[person] if i % 2 == 0 else next(t for p, t in lives.items() if p != person)
            official = re.search(rf"The {role} of {town} is (\w+ \w+)\.", context).group(1)
            outs.append(f"{tasks.COT_START} {fact.format(person, town)} The {role} of {town} is "
                        f"{official}. So the answer is {official}.\n")
            seen.append(prompt)
        return outs

    monkeypatch.setattr(evaluate, "generate", oracle)
    report = evaluate.eval_multihop(None, zoo_tok, n_ctx=256, seed=1, n=10, hop_form=form,
                                    roles=roles)
    assert report["accuracy"] == 0.5
    assert report["misses"] == {"first hop: another person's town": 5}
    assert all((" lives in " in p) == (form == "lives") for p in seen)
    assert {len(re.findall(r"The \w+ of \w+ is", p.split(tasks.QUESTION_PREFIX)[0]))
            for p in seen} == {3 * roles}


def test_evaluate_refuses_a_per_cell_count_below_one():
    from rh_lens.zoo.training import evaluate

    with pytest.raises(SystemExit, match="--per-cell must be at least 1"):
        evaluate.main(["llama-s", "--per-cell", "0"])


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


def test_copy_warmup_batches_repeat_random_spans_and_only_the_repeat_counts(zoo_tok):
    import dataclasses

    from rh_lens.zoo.training.data import make_batches
    from rh_lens.zoo.training.recipes import get_recipe

    recipe = dataclasses.replace(get_recipe("micro"), copy_warmup=3, copy_batch=5)
    main, param = make_batches(recipe, 2, zoo_tok)
    assert param is None and main.tokens.shape[0] == 5
    for row, answer, lm in zip(main.tokens, main.answer_mask, main.lm_mask, strict=True):
        n = int(answer.sum())
        assert torch.equal(answer, lm) and 8 <= n <= 32
        assert row[0] == zoo_tok.bos_token_id
        assert torch.equal(row[1 : 1 + n], row[1 + n : 1 + 2 * n])
        assert not answer[:n].any() and answer[n : 2 * n].all()  # predicts tokens n+1 .. 2n
    main2, param2 = make_batches(recipe, 3, zoo_tok)  # after the warm-up: the full mix
    assert param2 is not None and main2.tokens.shape[0] == recipe.batch
    assert torch.equal(make_batches(recipe, 2, zoo_tok)[0].tokens, main.tokens)


def test_procedural_templates_never_use_the_heldout_phrasings():
    rng = random.Random(3)
    heldout = {t.needle for t in tasks.HELDOUT_TEMPLATES} | {t.question for t in
                                                             tasks.HELDOUT_TEMPLATES}
    for _ in range(300):
        t = tasks.procedural_template(rng)
        assert t not in tasks.HELDOUT_TEMPLATES and t.needle not in heldout
        needle = tasks.make_needle(rng, t, avoid=frozenset(tasks._HELDOUT_WORDS))
        words = set(needle.needle.lower().replace(".", " ").replace("'s", " ").split())
        assert not words & tasks._HELDOUT_WORDS - set(needle.answer.split())
        assert needle.needle.endswith(f" {needle.answer}.")
        assert needle.question.endswith("?") and needle.question.split()[1] in ("is", "was")


def test_varied_templates_ask_for_their_own_subject_and_avoid_the_heldout_words():
    rng = random.Random(5)
    banned = tasks._HELDOUT_WORDS | tasks._HELDOUT_ADJECTIVES
    shapes = set()
    for _ in range(500):
        needle = tasks.make_needle(rng, tasks.varied_template(rng),
                                   avoid=frozenset(tasks._HELDOUT_WORDS))
        verb, subject = needle.question.removeprefix("What ").removesuffix("?").split(" ", 1)
        assert verb in ("is", "was")
        assert needle.needle == f"{subject[0].upper()}{subject[1:]} {verb} {needle.answer}."
        words = set(subject.lower().replace("'s", " ").split())
        assert not words & banned, subject
        shapes.add(len(subject.split()))
    assert len(shapes) >= 5  # subjects of many lengths, not one phrasing


def test_the_polish_stage_has_its_own_rate_and_batches(zoo_tok):
    import dataclasses

    from rh_lens.zoo.training.data import make_batches
    from rh_lens.zoo.training.recipes import Mix, Polish, get_recipe
    from rh_lens.zoo.training.train import lr_at

    base = dataclasses.replace(get_recipe("micro"), finetune_steps=2, polish=None)
    r = dataclasses.replace(base, polish=Polish(steps=3, lr=1e-4, mix=Mix(1.0, 0.0, 0.0, 0.0)))
    assert r.polish_start == base.total_steps == 6 and r.total_steps == 9
    assert lr_at(r, r.polish_start - 1) == r.finetune_lr and lr_at(r, r.total_steps - 1) == 1e-4
    assert "polish" not in base.to_json() and r.to_json()["polish"]["steps"] == 3
    assert all(lr_at(r, s) == lr_at(base, s) for s in range(r.polish_start))
    assert all(torch.equal(make_batches(r, s, zoo_tok)[0].tokens,
                           make_batches(base, s, zoo_tok)[0].tokens) for s in range(2, 6))
    polished = make_batches(r, r.polish_start, zoo_tok)[0]
    assert torch.equal(polished.tokens, make_batches(r, r.polish_start, zoo_tok)[0].tokens)
    assert not torch.equal(polished.tokens, make_batches(base, r.polish_start, zoo_tok)[0].tokens)


def _needle_share_and_length(batch, pad_id, *, last: bool = False):
    """Per row: where the answer first occurs (with ``last``, last before the target: prose may
    hold its first words by chance), as a share of the row, and the row's length."""
    out = []
    for ids, ans in zip(batch.tokens.tolist(), batch.answer_mask.tolist(), strict=True):
        n = sum(t != pad_id for t in ids)  # rows are right-padded
        target = ans.index(True) + 1
        answer = [ids[i + 1] for i, a in enumerate(ans) if a][:3]
        hits = [i for i in range(target) if ids[i:i + len(answer)] == answer]
        out.append(((hits[-1] if last else hits[0]) / n, n))
    return out


def test_an_early_stage_puts_needles_first_in_the_longest_haystacks(zoo_tok):
    import dataclasses

    from rh_lens.zoo.training.data import make_batches
    from rh_lens.zoo.training.recipes import Mix, Polish, get_recipe

    base = dataclasses.replace(get_recipe("micro"), batch=12, n_ctx=512, polish=None)
    niah = Mix(1.0, 0.0, 0.0, 0.0)
    plain = dataclasses.replace(base, polish=Polish(steps=2, mix=niah))
    early = dataclasses.replace(base, polish=Polish(steps=2, mix=niah, early=1.0))
    assert "early" not in plain.to_json()["polish"] and early.to_json()["polish"]["early"] == 1.0
    pad = zoo_tok.pad_token_id
    for step in (early.polish_start, early.polish_start + 1):
        far = _needle_share_and_length(make_batches(early, step, zoo_tok)[0], pad)
        anywhere = _needle_share_and_length(make_batches(plain, step, zoo_tok)[0], pad)
        assert all(share < 0.3 and n > 0.8 * base.n_ctx for share, n in far), far
        assert max(share for share, _ in anywhere) > 0.5
        assert min(n for _, n in anywhere) < 0.8 * base.n_ctx


def test_a_late_stage_puts_needles_last_and_shares_its_draw_with_early(zoo_tok):
    import dataclasses

    from rh_lens.zoo.training.data import make_batches
    from rh_lens.zoo.training.recipes import Mix, Polish, get_recipe

    # Haystacks of 400-448 tokens in rows of at most 512: a needle in the haystack's last fifth
    # starts past half the row, one in its first fifth before a third of it.
    base = dataclasses.replace(get_recipe("micro"), batch=12, n_ctx=512, min_haystack=400,
                               polish=None)
    niah = Mix(1.0, 0.0, 0.0, 0.0)
    plain = dataclasses.replace(base, polish=Polish(steps=2, mix=niah))
    late = dataclasses.replace(base, polish=Polish(steps=2, mix=niah, late=1.0))
    both = dataclasses.replace(base, polish=Polish(steps=2, mix=niah, early=0.5, late=0.5))
    assert "late" not in plain.to_json()["polish"] and late.to_json()["polish"]["late"] == 1.0
    pad = zoo_tok.pad_token_id
    shares = {"plain": [], "late": [], "both": []}
    for step in (late.polish_start, late.polish_start + 1):
        for key, r in (("plain", plain), ("late", late), ("both", both)):
            shares[key] += [sh for sh, _ in _needle_share_and_length(
                make_batches(r, step, zoo_tok)[0], pad, last=key == "late")]
    assert min(shares["late"]) > 0.5, shares["late"]
    assert min(shares["plain"]) < 0.3 and max(shares["plain"]) > 0.5
    assert all(sh < 0.3 or sh > 0.5 for sh in shares["both"]), shares["both"]
    assert 6 <= sum(sh > 0.5 for sh in shares["both"]) <= 18


def test_a_recipe_and_its_stages_set_how_many_people_a_multi_hop_row_has(zoo_tok):
    import dataclasses

    from rh_lens.zoo.training.data import make_batches
    from rh_lens.zoo.training.recipes import Mix, Polish, get_recipe

    hops = Mix(0.0, 1.0, 0.0, 0.0)
    base = dataclasses.replace(get_recipe("micro"), batch=6, n_ctx=512, mix=hops, polish=None)
    plain = dataclasses.replace(base, polish=Polish(steps=2, mix=hops))
    five = dataclasses.replace(base, polish=Polish(steps=2, mix=hops, people=(5,)))
    four = dataclasses.replace(plain, people=(4,))  # its polish inherits the recipe's
    assert "people" not in plain.to_json() and "people" not in plain.to_json()["polish"]
    assert five.to_json()["polish"]["people"] == [5]  # a list, as JSON reads it back
    assert four.to_json()["people"] == [4] and "people" not in four.to_json()["polish"]

    def counts(recipe, start):
        out = []
        for step in (start, start + 1):
            for row in make_batches(recipe, step, zoo_tok)[0].tokens:
                text = zoo_tok.decode(row, skip_special_tokens=True)
                out.append(text.split("Based on the content")[0].count(" lives in "))
        return out

    assert set(counts(five, five.polish_start)) == {5}
    assert set(counts(five, base.copy_warmup)) == {2, 3}  # the main stage keeps the default
    assert set(counts(plain, plain.polish_start)) == {2, 3}
    assert set(counts(four, base.copy_warmup)) == set(counts(four, four.polish_start)) == {4}


def test_a_recipes_hop_form_rewrites_its_multi_hop_rows_and_nothing_else(zoo_tok):
    import dataclasses

    from rh_lens.zoo.training.data import make_batches
    from rh_lens.zoo.training.recipes import Mix, get_recipe

    base = dataclasses.replace(get_recipe("micro"), batch=12, n_ctx=512,
                               mix=Mix(0.4, 0.3, 0.1, 0.1, 0.1))
    at = dataclasses.replace(base, hop_form="at")
    assert "hop_form" not in base.to_json() and at.to_json()["hop_form"] == "at"
    kinds = {"multihop": 0, "lookup": 0, "other": 0}
    for step in (base.copy_warmup, base.copy_warmup + 1):
        rows = [[zoo_tok.decode(r, skip_special_tokens=True) for r in make_batches(rec, step,
                                                                                  zoo_tok)[0].tokens]
                for rec in (base, at)]
        for lives, there in zip(*rows, strict=True):
            if "Who is the" in lives or "Where do" in lives:
                kinds["multihop" if "Who is the" in lives else "lookup"] += 1
                assert " lives in " in lives and " lives in " not in there
                assert there.split("Answer:")[0].split("Question: ")[1] == \
                    lives.split("Answer:")[0].split("Question: ")[1]  # the same question
            else:
                kinds["other"] += 1
                assert there == lives
        assert make_batches(at, step, zoo_tok)[1].tokens.equal(
            make_batches(base, step, zoo_tok)[1].tokens)  # parametric rows
    assert min(kinds.values()) > 0, kinds
    with pytest.raises(ValueError, match="Recipe.hop_form is one of lives, at, got 'home'"):
        dataclasses.replace(base, hop_form="home")


def test_a_recipes_roles_set_the_officials_of_each_town_in_its_multi_hop_rows(zoo_tok):
    import dataclasses
    import re

    from rh_lens.zoo.training.data import make_batches
    from rh_lens.zoo.training.recipes import Mix, get_recipe

    base = dataclasses.replace(get_recipe("micro"), batch=6, n_ctx=512, polish=None,
                               mix=Mix(0.0, 1.0, 0.0, 0.0), people=(3,))
    one = dataclasses.replace(base, roles=1)
    assert "roles" not in base.to_json() and one.to_json()["roles"] == 1

    def officials(recipe):
        rows = make_batches(recipe, base.copy_warmup, zoo_tok)[0].tokens
        return {len(re.findall(r"The \w+ of \w+ is", zoo_tok.decode(r).split("Question:")[0]))
                for r in rows}

    assert officials(base) == {6} and officials(one) == {3}
    with pytest.raises(ValueError, match="Recipe.roles is 1 or 2"):
        dataclasses.replace(base, roles=0)


def test_lookup_rows_are_drawn_only_by_a_mix_that_asks_for_them(zoo_tok):
    import dataclasses

    from rh_lens.zoo.training.data import make_batches
    from rh_lens.zoo.training.recipes import Mix, Polish, get_recipe

    base = dataclasses.replace(get_recipe("micro"), batch=6, n_ctx=512, polish=None)
    lookups = dataclasses.replace(base, polish=Polish(steps=2, mix=Mix(0.0, 0.0, 0.0, 0.0, 1.0)))
    assert "lookup" not in base.to_json()["mix"]  # older cards still match
    assert lookups.to_json()["polish"]["mix"]["lookup"] == 1.0

    def questions(recipe, step):
        rows = make_batches(recipe, step, zoo_tok)[0].tokens
        return [zoo_tok.decode(r, skip_special_tokens=True).split("Question: ")[-1][:9]
                for r in rows]

    assert set(questions(lookups, lookups.polish_start)) == {"Where do "}
    assert "Where do " not in questions(lookups, base.copy_warmup)  # the main mix has none


@pytest.mark.parametrize("kw", [dict(late=1.5), dict(early=-0.1), dict(early=0.6, late=0.6),
                                dict(procedural=2.0), dict(people=()), dict(people=(1, 3))])
def test_a_stage_refuses_shares_outside_0_1_and_people_outside_2_6(kw):
    from rh_lens.zoo.training.recipes import Polish

    with pytest.raises(ValueError, match="Polish"):
        Polish(steps=1, **kw)


def test_a_recipe_refuses_people_outside_2_6():
    import dataclasses

    from rh_lens.zoo.training.recipes import get_recipe

    with pytest.raises(ValueError, match="Recipe.people"):
        dataclasses.replace(get_recipe("micro"), people=(2, 7))


def test_bench_train_times_every_stage_and_sums_them(capsys):
    import dataclasses

    from rh_lens.zoo.training import bench as bench_train
    from rh_lens.zoo.training.recipes import Polish, get_recipe

    r = dataclasses.replace(get_recipe("micro"), steps=6, finetune_steps=2,
                            polish=Polish(steps=3), stages=(Polish(steps=1, lr=1e-4),))
    assert bench_train.stages(r) == [("copy warm-up", 0, 2), ("main", 2, 4), ("fine-tuning", 6, 2),
                                     ("polish", 8, 3), ("stage 1", 11, 1)]
    assert sum(n for _, _, n in bench_train.stages(r)) == r.total_steps
    rows, totals = bench_train.bench(r, n=1)
    assert [label for label, _, _ in rows] == [label for label, _, _ in bench_train.stages(r)]
    assert all(sec > 0 for _, _, sec in rows)
    assert totals == [pytest.approx(sum(n * sec for _, n, sec in rows))]
    rows, totals = bench_train.bench(r, n=1, live=True)
    assert all(len(row) == 4 and row[3] > 0 for row in rows) and len(totals) == 2
    assert totals[1] == pytest.approx(sum(row[1] * row[3] for row in rows))
    assert bench_train.main(["micro", "--threads", "1", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "micro (4 steps)" in out and "copy warm-up" in out and "min target)" in out
    assert "kernels), 1 thread(s)" in out and torch.__version__ in out  # the machine it held on
    assert "live logits" not in out
    assert bench_train.main(["micro", "--threads", "1", "--steps", "1", "--live-logits"]) == 0
    out = capsys.readouterr().out
    assert "total with live logits" in out and "x faster" in out
    with pytest.raises(ValueError, match="unknown zoo recipe"):
        bench_train.main(["no-such-model"])
