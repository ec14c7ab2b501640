"""The zoo's task formats: NIAH, multi-hop CoT, lookup, parametric facts, chat, templates."""

import random

import pytest

from rh_lens.zoo import tasks


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
