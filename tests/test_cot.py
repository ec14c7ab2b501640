"""Chain of thought vs direct under masking: scoring, items files, the runner on a model whose
copy head is known by construction, caching, and the script."""

import json

import numpy as np
import pytest

from rh_lens import cot
from rh_lens.ablation import Condition, conditions_from_masks
from rh_lens.decode import decode_greedy
from rh_lens.errors import ContextTooLongError
from rh_lens.models import tokenize
from rh_lens.plotting import plot_cot
from tests.conftest import BACKENDS
from tests.known_answer import build_copy_model
from tests.test_detect import HAYSTACK, single_token_word

# ---------------------------------------------------------------- scoring


@pytest.mark.parametrize(("generated", "answer", "match", "right"), [
    (" Mara Stone\n", "Mara Stone", "exact", True),
    (" Let's think step by step. Ada lives in Tolbrook. The mayor of Tolbrook is Mara Stone. "
     "So the answer is Mara Stone.\n", "Mara Stone", "exact", True),
    (" So the answer is Mara Stonewall.", "Mara Stone", "exact", False),
    (" mara   STONE.", "Mara Stone", "exact", True),
    ("Answer: blue<|end|>\n", "blue", "exact", True),
    (" 3 + 4 = 7, then 7 * 2 = 14. The answer is 14.", "14", "numeric", True),
    (" The answer is 1,250 dollars", "1250", "numeric", True),
    (" 3 + 4 = 7 so it is 7 * 2", "14", "numeric", False),
    (" no number here", "14", "numeric", False),
])
def test_is_correct(generated, answer, match, right):
    assert cot.is_correct(generated, answer, match) is right


def test_numeric_match_needs_a_numeric_reference():
    with pytest.raises(ValueError, match="holds no number"):
        cot.is_correct("The answer is 3", "three", "numeric")


def test_templates_fill_by_replacement_not_format():
    task = cot.Task("t", "{context}Q: {question}\nA:", (cot.Item("Is {x} here?", "no", "C. "),))
    assert task.prompt(task.items[0]) == "C. Q: Is {x} here?\nA:"
    with pytest.raises(ValueError, match="question"):
        cot.Task("t", "{context} no slot", task.items)
    with pytest.raises(ValueError, match="no items"):
        cot.Task("t", "{question}", ())


# ---------------------------------------------------------------- items files


def test_read_items_and_its_errors(tmp_path):
    good = tmp_path / "items.jsonl"
    good.write_text('{"question": "Q1?", "answer": "A1"}\n\n'
                    '{"question": "Q2?", "answer": "7", "context": "C."}\n')
    assert cot.read_items(good) == (cot.Item("Q1?", "A1"), cot.Item("Q2?", "7", "C."))
    cases = {
        '{"question": "Q?"}\n': "line 1: 'answer'",
        '{"question": "Q?", "answer": "A"}\n[1, 2]\n': "line 2: expected a JSON object",
        '{"question": "Q?", "answer": "A"\n': "line 1: not JSON",
        '{"question": "Q?", "answer": "A", "context": 3}\n': "'context' must be a string",
        "\n\n": "no items",
    }
    for text, message in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        with pytest.raises(cot.ItemsFileError, match=message):
            cot.read_items(bad)
    with pytest.raises(cot.ItemsFileError, match="no such items file"):
        cot.read_items(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------- the runner, known answer


@pytest.fixture(scope="module", params=BACKENDS)
def copy_task(request, tokenizer):
    """Items whose answer the copy head (L0H1) must copy from the context."""
    word = single_token_word(tokenizer, HAYSTACK.source)
    (word_id,) = tokenizer.encode(" " + word, add_special_tokens=False)
    model = build_copy_model(tokenizer, [word_id], copy_head=1, backend=request.param)
    context = HAYSTACK.source[:120] + f" The magic word is {word}. "
    items = tuple(cot.Item(f"What is the magic word{'?' * (i + 1)}", word, context[i:])
                  for i in range(3))
    return model, cot.Task("copy", "{context}Question: {question}\nAnswer:", items)


@pytest.mark.slow
def test_masking_the_copy_head_breaks_the_task_and_other_heads_do_not(copy_task):
    model, task = copy_task
    conds = (Condition("none", "none"), Condition("heads", "copy", ((0, 1),)),
             Condition("heads", "others", ((0, 0), (0, 2), (0, 3))))
    for mode in cot.COT_MODES:
        cfg = cot.CotConfig(mode=mode, max_new_tokens=4)
        result = cot.compute_cot(model, [task], conds, cfg, progress=False)
        np.testing.assert_array_equal(result.accuracy()[:, 0], [1.0, 0.0, 1.0])
        assert result.records[0][0].outputs == result.records[2][0].outputs


def test_no_masking_equals_plain_generation(tiny_gqa):
    items = tuple(cot.Item(f"What comes after {w}?", "x") for w in ("one", "a longer one", "two"))
    task = cot.Task("plain", "Question: {question}\nAnswer:", items)
    rec = cot.run_task(tiny_gqa, task, Condition("none", "none"),
                       cot.CotConfig(max_new_tokens=6, batch_size=2))
    for item, out in zip(items, rec.outputs, strict=True):
        (ref,) = decode_greedy(tiny_gqa, tokenize(tiny_gqa, task.prompt(item))[None],
                               max_new_tokens=6, record=False)
        assert out == ref.text
    assert rec.correct == (False, False, False)


def test_mode_mean_is_refused_and_long_prompts_named(tiny_gqa):
    with pytest.raises(ValueError, match="mode must be one of uniform, zero"):
        cot.CotConfig(mode="mean")
    task = cot.Task("long", "{context}{question}", (cot.Item("Q?", "A", "word " * 200),))
    with pytest.raises(ContextTooLongError, match="task 'long', item 0"):
        cot.run_task(tiny_gqa, task, Condition("none", "none"), cot.CotConfig())


def test_records_are_reused_and_recomputed_when_items_change(copy_task, tmp_path, monkeypatch):
    model, task = copy_task
    conds = (Condition("none", "none"), Condition("heads", "copy", ((0, 1),)))
    cfg = cot.CotConfig(max_new_tokens=4)
    first = cot.compute_cot(model, [task], conds, cfg, out_dir=tmp_path, progress=False)
    calls = []
    real = cot.run_task
    monkeypatch.setattr(cot, "run_task", lambda *a, **k: calls.append(a[1].name) or real(*a, **k))
    again = cot.compute_cot(model, [task], conds, cfg, out_dir=tmp_path, progress=False)
    assert calls == [] and again.records == first.records
    changed = cot.Task(task.name, task.template, task.items[:2])
    cot.compute_cot(model, [changed], conds, cfg, out_dir=tmp_path, progress=False)
    assert calls == ["copy", "copy"]
    with pytest.raises(ValueError, match="differs in: config"):
        cot.compute_cot(model, [task], conds, cot.CotConfig(max_new_tokens=5), out_dir=tmp_path,
                        progress=False)
    # other weights under the same name: refused, and no record is lost or rewritten
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.json")}
    with pytest.raises(ValueError, match="differs in: weights"):
        cot.compute_cot(model, [task], conds, cfg, out_dir=tmp_path, progress=False,
                        identity={"weights": "other"})
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.json")} == before
    assert calls == ["copy", "copy"]


@pytest.mark.slow
def test_random_draws_are_grouped_with_their_spread(copy_task):
    model, task = copy_task
    scores = np.array([[0.0, 1.0, 0.0, 0.0]])
    conds = conditions_from_masks(model, ["top:1", "random:1"], scores=scores, n_draws=3)
    assert [c.name for c in conds] == ["none", "top-1", "random-1-d0", "random-1-d1",
                                       "random-1-d2"]
    assert all((0, 1) not in c.heads for c in conds if c.kind == "random")
    result = cot.compute_cot(model, [task], conds, cot.CotConfig(max_new_tokens=4),
                             progress=False)
    mean, std = result.by_group()
    assert result.group_names() == ["none", "top-1", "random-1"]
    np.testing.assert_array_equal(mean[:, 0], [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(std[:, 0], [0.0, 0.0, 0.0])
    fig = plot_cot(result)
    assert [tr.name for tr in fig.data] == ["copy"] and list(fig.data[0].x) == result.group_names()


def hand_made_result() -> cot.CotResult:
    """none answers everything; top-1 loses every retrieval item and keeps every fact; of two
    matched draws one loses one fact of four."""
    rows = {"none": ([1, 1, 1, 1], [1, 1, 1, 1]), "top-1": ([0, 0, 0, 0], [1, 1, 1, 1]),
            "matched-1-d0": ([1, 1, 1, 1], [1, 1, 1, 1]),
            "matched-1-d1": ([1, 1, 1, 1], [1, 0, 1, 1])}
    conds = (Condition("none", "none"), Condition("top", "top-1", ((0, 1),), k=1),
             Condition("matched", "matched-1-d0", ((0, 0),), k=1, draw=0),
             Condition("matched", "matched-1-d1", ((0, 2),), k=1, draw=1))
    tasks = ("multihop_cot", "parametric_direct")
    records = tuple(tuple(cot.TaskRecord(c.name, t, "x", ("",) * 4,
                                         tuple(map(bool, rows[c.name][i])))
                          for i, t in enumerate(tasks)) for c in conds)
    return cot.CotResult(tasks, conds, records, cot.CotConfig())


def test_specificity_drops_and_intervals_on_a_hand_made_result():
    from rh_lens.plotting import plot_specificity

    spec = hand_made_result().specificity()
    assert spec["retrieval_tasks"] == ["multihop_cot"]
    assert spec["parametric_tasks"] == ["parametric_direct"]
    assert list(spec["groups"]) == ["top-1", "matched-1"]
    assert spec["groups"]["top-1"]["retrieval"] == {"mean": 1.0, "low": 1.0, "high": 1.0}
    assert spec["groups"]["top-1"]["parametric"] == {"mean": 0.0, "low": 0.0, "high": 0.0}
    matched = spec["groups"]["matched-1"]
    assert matched["retrieval"] == {"mean": 0.0, "low": 0.0, "high": 0.0}
    assert matched["parametric"]["mean"] == 1 / 8 and matched["parametric"]["low"] == 0.0
    fig = plot_specificity(hand_made_result())
    assert list(fig.data[1].x) == [0.0, 1 / 8] and list(fig.data[1].y) == [1.0, 0.0]
    assert list(fig.data[1].text) == ["top-1", "matched-1"]
    assert hand_made_result().specificity(parametric=[]) is None
    assert hand_made_result().summary()["specificity"]["groups"]["top-1"]["retrieval"]["mean"] \
        == 1.0


# ---------------------------------------------------------------- the script


@pytest.mark.slow
def test_script_on_user_items_and_bad_input(copy_task, tmp_path, monkeypatch, capsys):
    from analyses import cot as script
    from rh_lens.results import export_reference_json, load_result

    model, task = copy_task
    monkeypatch.setattr("rh_lens.models.load_model", lambda *a, **k: model)
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"question": i.question, "answer": i.answer,
                                         "context": i.context}) + "\n" for i in task.items))
    scores = tmp_path / "head_score.json"
    trials = np.zeros((2, 1, 4))
    trials[:, 0, 1] = 1.0
    export_reference_json(scores, trials)
    out = tmp_path / "out"
    argv = ["--model", "known", "--scores", str(scores), "--items", str(items), "--ks", "1",
            "--draws", "2", "--max-new-tokens", "4", "--out", str(out), "--quiet",
            "--cot-template", "{context}Question: {question}\nAnswer:"]
    assert script.main(argv) == 0
    res = load_result(out)
    assert res.kind == "cot" and res.summary["tasks"] == ["cot", "direct"]
    np.testing.assert_array_equal(res.arrays["group_mean"], [[1, 1], [0, 0], [1, 1]])
    assert (out / "cot.html").is_file() and "random-1" in capsys.readouterr().out
    records = {p: p.read_bytes() for p in (out / "conditions").rglob("*.json")}
    weight = next(model.parameters())  # the model retrained under the same name: stale records
    saved = weight.data.clone()
    weight.data.add_(1e-3)
    try:
        assert script.main(argv) == 2
    finally:
        weight.data.copy_(saved)
    assert "differs in: weights" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (out / "conditions").rglob("*.json")} == records

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q?"}\n')
    assert script.main([*argv[:4], "--items", str(bad), "--out", str(tmp_path / "o2")]) == 2
    assert "line 1: 'answer'" in capsys.readouterr().err
    assert script.main(["--model", "known", "--scores", str(tmp_path / "none.json"),
                        "--items", str(items), "--out", str(tmp_path / "o3")]) == 2
    assert "no retrieval scores" in capsys.readouterr().err
    assert res.meta["model_spec"] == "known"
