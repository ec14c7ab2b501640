"""The evaluation of a zoo model: loading, generation, NIAH and multi-hop counts."""

import pytest
import torch

from rh_lens.zoo import tasks
from tests.zoo.test_tasks import _LIVES


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


def _snapshot(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def test_evaluation_writes_its_own_directory_and_compares_with_the_card(tmp_path, capsys):
    import json

    from rh_lens.zoo.training import evaluate
    from rh_lens.zoo.training.recipes import get_recipe
    from rh_lens.zoo.training.train import train, write_model

    recipe = get_recipe("micro")
    twin, tok, state = train(recipe, run_dir=tmp_path / "run", steps=1, progress=False)
    model = write_model(twin, tok, recipe, state, tmp_path / "model")
    before = _snapshot(model)
    args = [str(model), "--per-cell", "1", "--quiet", "--out"]
    evaluate.main(args + [str(tmp_path / "first")])
    assert _snapshot(model) == before  # the model directory is never written
    first = json.loads((tmp_path / "first" / "evaluation.json").read_text())
    assert first["differences_from_card"] is None and first["meta"]["argv"] == args + [
        str(tmp_path / "first")]
    assert "holds no evaluation" in capsys.readouterr().out

    evaluate.write_card(model, first["report"])  # what a training run does
    card = json.loads((model / "card.json").read_text())
    card["evaluation"]["lm"]["loss"] += 3 * evaluate.TOLERANCE["loss"]
    card["evaluation"]["parametric"]["direct"] += evaluate.TOLERANCE["accuracy"] / 2
    (model / "card.json").write_text(json.dumps(card))
    before = _snapshot(model)
    assert evaluate.main(args + [str(tmp_path / "second")]) == 1
    assert _snapshot(model) == before
    second = json.loads((tmp_path / "second" / "evaluation.json").read_text())
    assert [d.split(":")[0] for d in second["differences_from_card"]] == ["lm.loss"]
    assert "1 figure(s) differ from the card" in capsys.readouterr().out


def test_figures_are_compared_with_the_card_within_the_stated_tolerance():
    from rh_lens.zoo.training.evaluate import TOLERANCE, compare_with_card

    card = {"n_ctx": 256, "lm": {"loss": 1.7, "unigram_loss": 5.7},
            "niah": {"min": 0.9, "per_depth": {"0": 1.0}}, "meets_targets": True}
    near = {"n_ctx": 256, "lm": {"loss": 1.7 + TOLERANCE["loss"] / 2, "unigram_loss": 5.7},
            "niah": {"min": 0.9 - TOLERANCE["accuracy"] / 2, "per_depth": {"0": 1.0}},
            "meets_targets": True, "new_figure": 3.0}
    assert compare_with_card(near, card) == []
    far = {"n_ctx": 512, "lm": {"loss": 1.7 + 2 * TOLERANCE["loss"], "unigram_loss": 5.7},
           "niah": {"min": 0.9, "per_depth": {"0": 1.0 - 2 * TOLERANCE["accuracy"]}},
           "meets_targets": False}
    assert [line.split(":")[0] for line in compare_with_card(far, card)] == [
        "lm.loss", "meets_targets", "n_ctx", "niah.per_depth.0"]
