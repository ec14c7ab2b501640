"""The analyses' default inputs for zoo models: detection needles and haystacks, patching pairs
and the CoT tasks, all built from the zoo's generators."""

import json
import re

import pytest

from rh_lens.cot import ZOO_TEMPLATES
from rh_lens.models import tokenize
from rh_lens.niah import Needle
from rh_lens.zoo import tasks
from rh_lens.zoo.inputs import ProseHaystack, ZooTaskSizes, zoo_chain, zoo_inputs, zoo_tasks


def test_zoo_inputs_are_library_needles_of_the_heldout_templates_with_seeded_prose():
    needles, haystacks = zoo_inputs(5, seed=2)
    assert all(isinstance(n, Needle) for n in needles)
    questions = [t.question.split("{")[0] for t in tasks.HELDOUT_TEMPLATES]
    for i, needle in enumerate(needles):
        assert needle.question.startswith(questions[i % len(questions)])
        assert needle.answer in needle.needle
    assert [h.seed for h in haystacks] == [2_500 + i for i in range(5)]
    assert haystacks[0].text(300) == ProseHaystack(2_500).text(300)
    assert zoo_inputs(5, seed=2) == (needles, haystacks)  # a pure function of the seed
    assert zoo_inputs(1, seed=3)[0] != needles[:1]
    with pytest.raises(ValueError, match="n_needles must be positive"):
        zoo_inputs(0)


def test_zoo_tasks_ask_in_the_chain_form_of_the_zoo_models_card(tmp_path, monkeypatch):
    from rh_lens import models
    from rh_lens.models import ModelLoadError, load_model

    for name, recipe in (("a", {"hop_form": "at", "roles": 1}), ("b", {})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "card.json").write_text(json.dumps({"recipe": recipe}))
    monkeypatch.setattr(models, "ZOO_DIR", tmp_path)
    assert zoo_chain("zoo:a") == {"hop_form": "at", "roles": 1}
    assert zoo_chain("zoo:b") == {"hop_form": "lives", "roles": 2}
    assert zoo_chain("gpt2") == {"hop_form": "lives", "roles": 2}  # not a zoo model
    with pytest.raises(ModelLoadError, match="unknown zoo model 'zoo:c'"):
        zoo_chain("zoo:c")
    monkeypatch.undo()
    model = load_model("zoo:llama-s")
    tasks = zoo_tasks(model, ZooTaskSizes(n_multihop=4, hop_form="at", roles=1))
    for item in tasks[0].items:
        person = item.question.split("where ")[1].split(" lives")[0]
        assert f" {person} at " in item.context and " lives in " not in item.context
        assert len(re.findall(r"The \w+ of \w+ is", item.context)) == 3  # one a town


def test_zoo_tasks_fit_the_context_of_the_default_model():
    from rh_lens.models import load_model

    model = load_model("zoo:llama-s")
    tasks = zoo_tasks(model, ZooTaskSizes(n_multihop=12, reserve=48))
    assert [t.name for t in tasks] == list(ZOO_TEMPLATES)
    assert tasks[0].items == tasks[1].items and tasks[2].items == tasks[3].items
    for task in tasks:
        for item in task.items:
            assert len(tokenize(model, task.prompt(item))) + 48 <= model.cfg.n_ctx
    item = tasks[0].items[0]
    assert item.question.startswith("Who is the") and item.answer in item.context
