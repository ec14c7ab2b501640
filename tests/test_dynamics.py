"""Dynamics over checkpoint series: known trajectories (copy heads moved between checkpoints),
a micro zoo recipe end to end against per-checkpoint detection runs, resume, shards, bad input."""

import numpy as np
import pytest

from analyses import dynamics as dynamics_cli
from rh_lens.detect import DetectConfig, DetectResult, compute_detect
from rh_lens.dynamics import (
    DynamicsConfig,
    DynamicsResult,
    checkpoint_dir,
    compute_dynamics,
    first_crossing,
)
from rh_lens.induction import InductionConfig, induction_scores
from rh_lens.models import load_model, save_model_dir
from rh_lens.niah import Needle
from rh_lens.results import load_result
from rh_lens.series import directory_series
from tests.known_answer import build_copy_model
from tests.test_detect import HAYSTACK, single_token_word

CFG = DynamicsConfig(DetectConfig(lengths=(60, 120), depths=(0.0, 100.0), buffer=30,
                                  max_new_tokens=5),
                     InductionConfig(seq_len=20, batch=2))
COPY_HEADS = {0: 1, 5: 2, 9: 2}  # step -> the copy head of that checkpoint
KNOWN = np.zeros((3, 1, 4))  # the retrieval scores by construction
for _i, _head in enumerate(COPY_HEADS.values()):
    KNOWN[_i, 0, _head] = 1.0


@pytest.fixture(scope="module")
def copy_series(tmp_path_factory, tokenizer):
    """Three checkpoints of a known copy model: head 1 copies at step 0, head 2 from step 5."""
    root = tmp_path_factory.mktemp("series")
    word = single_token_word(tokenizer, HAYSTACK.source)
    needle = Needle(f"The magic word is {word}.", "What is the magic word?", word)
    (word_id,) = tokenizer.encode(" " + word, add_special_tokens=False)
    dirs = []
    for step, head in COPY_HEADS.items():
        model = build_copy_model(tokenizer, [word_id], copy_head=head, n_ctx=256)
        dirs.append(save_model_dir(root / f"ckpt-{step}", cfg=model.cfg,
                                   state_dict=model.state_dict(), tokenizer=tokenizer))
    return directory_series(dirs), needle, word_id


def _run(series, needle, out, **kw):
    return compute_dynamics(series, [needle], [HAYSTACK], CFG, out_dir=out, progress=False,
                            **kw)


def test_first_crossing_is_the_first_step_above():
    table = np.array([[[0.0, 0.5]], [[0.2, np.nan]], [[0.05, 0.9]]])
    np.testing.assert_array_equal(first_crossing([10, 20, 30], table, 0.1), [[20, 10]])
    np.testing.assert_array_equal(first_crossing([10, 20, 30], table, 0.95),
                                  [[np.nan, np.nan]])


def test_known_trajectories_and_onsets(copy_series, tmp_path):
    series, needle, _ = copy_series
    result = _run(series, needle, tmp_path / "out")
    assert result.steps == (0, 5, 9) and not result.missing
    expected = KNOWN
    np.testing.assert_array_equal(result.retrieval("step"), expected)
    np.testing.assert_array_equal(result.retrieval("set"), expected)
    np.testing.assert_array_equal(result.niah_accuracy, [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(result.n_retrieval_heads(), [1, 1, 1])
    assert result.final_retrieval_heads() == [(0, 2)]
    (onset,) = result.onsets()
    assert onset["head"] == [0, 2] and onset["retrieval_onset"] == 5
    # Each checkpoint's sub-store is a detection directory of that checkpoint alone.
    for checkpoint, table in zip(series.checkpoints, expected, strict=True):
        stored = DetectResult.load(checkpoint_dir(tmp_path / "out", checkpoint))
        np.testing.assert_array_equal(stored.mean_scores("step"), table)


def test_a_killed_series_resumes_without_recomputing_finished_checkpoints(copy_series,
                                                                          tmp_path):
    series, needle, _ = copy_series
    weights = series.checkpoints[2].spec + "/model.safetensors"
    hidden = tmp_path / "hidden.safetensors"
    import shutil

    shutil.move(weights, hidden)  # the third checkpoint cannot load: the run stops there
    try:
        with pytest.raises(ValueError):
            _run(series, needle, tmp_path / "out")
    finally:
        shutil.move(hidden, weights)
    out = tmp_path / "out"
    cells = sorted((out / "cells").glob("*.json"))
    assert [c.stem for c in cells] == ["step-000000", "step-000005"]
    before = {c: c.stat().st_mtime_ns for c in out.rglob("*.json")}
    loaded = []

    def load(checkpoint):
        loaded.append(checkpoint.step)
        return checkpoint.load()

    result = _run(series, needle, out, load=load)
    assert loaded == [9]
    assert all(path.stat().st_mtime_ns == t for path, t in before.items())
    np.testing.assert_array_equal(result.retrieval_step, KNOWN)


def test_shards_merge_into_the_whole(copy_series, tmp_path):
    series, needle, _ = copy_series
    parts = [tmp_path / "a", tmp_path / "b"]
    for i, out in enumerate(parts):
        part = _run(series, needle, out, shard_of=(i, 2))
        assert len(part.steps) == [2, 1][i] and part.missing
    with pytest.raises(ValueError, match="missing: step-000005"):
        DynamicsResult.from_stores(parts[:1], series=series)
    merged = DynamicsResult.from_stores(parts, series=series)
    assert merged.steps == (0, 5, 9)
    np.testing.assert_array_equal(merged.retrieval_step, KNOWN)
    for i, checkpoint in enumerate(series.checkpoints):
        np.testing.assert_array_equal(merged.induction[i],
                                      induction_scores(checkpoint.load(), CFG.induction))


def test_checkpoints_of_another_shape_are_refused_before_any_work(copy_series, tmp_path,
                                                                   tokenizer):
    series, needle, word_id = copy_series
    other = build_copy_model(tokenizer, [word_id], copy_head=1, n_heads=5, n_ctx=256)
    odd = save_model_dir(tmp_path / "ckpt-20", cfg=other.cfg, state_dict=other.state_dict(),
                         tokenizer=tokenizer)
    mixed = directory_series([c.spec for c in series.checkpoints] + [odd])
    with pytest.raises(ValueError, match=r"step-000020 .* 1 layers x 5 heads .* but "
                                         r"step-000000 has 1 layers x 4 heads"):
        _run(mixed, needle, tmp_path / "out")
    assert not list((tmp_path / "out").glob("**/cells/*.json"))


def test_the_cli_refuses_an_empty_series_in_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert dynamics_cli.main(["--series", str(tmp_path / "empty"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "is empty" in err and "\n" not in err


@pytest.mark.slow
def test_a_micro_recipe_end_to_end_equals_per_checkpoint_detection(tmp_path):
    """Train the micro recipe for 4 steps saving every 2 (3 checkpoints), run the analysis
    script on the series, and compare every trajectory with detection and induction run on
    each checkpoint alone."""
    from rh_lens.zoo.inputs import zoo_inputs
    from rh_lens.zoo.training.recipes import get_recipe
    from rh_lens.zoo.training.train import train

    run = tmp_path / "run"
    train(get_recipe("micro"), run_dir=run, steps=4, progress=False, save_every=2)
    out = tmp_path / "dyn"
    args = ["--series", "zoo:micro", "--run-dir", str(run), "--lengths", "96", "--depths", "0",
            "50", "--n-needles", "1", "--induction-len", "30", "--out", str(out), "--quiet"]
    assert dynamics_cli.main(args) == 0
    stored = load_result(out, kind="dynamics")
    np.testing.assert_array_equal(stored.arrays["steps"], [0, 2, 4])
    assert (out / "retrieval_over_steps.html").is_file() and (out / "onsets.html").is_file()
    needles, haystacks = zoo_inputs(1, seed=0)
    for i, step in enumerate((0, 2, 4)):
        model = load_model(run / "steps" / f"step-{step:06d}")
        cfg = DetectConfig.from_dict(stored.config["detect"])
        alone = compute_detect(model, needles, haystacks, cfg, progress=False)
        np.testing.assert_array_equal(stored.arrays["retrieval_step"][i],
                                      alone.mean_scores("step"))
        assert stored.arrays["niah_accuracy"][i] == alone.n_success / len(alone.records)
        np.testing.assert_array_equal(
            stored.arrays["induction"][i],
            induction_scores(model, InductionConfig(seq_len=30, batch=10, seed=0)))
    # A rerun finds every checkpoint finished.
    before = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    assert dynamics_cli.main(args) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
