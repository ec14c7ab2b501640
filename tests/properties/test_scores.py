"""HeadScores and its loading: both file formats, bad input."""

import numpy as np
import pytest

from analyses import properties as script
from rh_lens import properties as P
from rh_lens.results import RunMetadata, export_reference_json, save_result
from tests.properties.conftest import detect_dir, switch_setup

pytestmark = pytest.mark.tl4


def test_rh_lens_activity_is_used_not_the_score():
    trials = np.ones((2, 1, 2))
    active = np.array([[[True, False]], [[True, True]]])
    scores = P.HeadScores("m", trials, trial_active=active)
    assert scores.frequency.tolist() == [[1.0, 0.5]]
    assert P.HeadScores("m", trials).n_silent_trials == 0
    assert P.HeadScores("m", np.zeros((3, 1, 2))).n_silent_trials == 3


def test_reference_file_round_trip(tmp_path):
    trials = np.random.default_rng(1).random((3, 2, 4)) * (np.arange(4) % 2)
    path = export_reference_json(tmp_path / "Some-Model.json", trials)
    scores = P.load_head_scores(path)
    assert scores.name == "Some-Model" and scores.contexts is None
    np.testing.assert_array_equal(scores.trial_scores, trials)
    np.testing.assert_array_equal(scores.trial_active, trials > 0)
    (tmp_path / "run").mkdir()
    named = P.load_head_scores(export_reference_json(tmp_path / "run" / "head_score.json", trials))
    assert named.name == "run"


def test_detection_directory_round_trip(tmp_path):
    cells, trials = switch_setup()
    success = np.ones(len(cells), dtype=bool)
    success[[0, 5]] = False
    d = detect_dir(tmp_path / "run", trials[success], success, cells, n_kv_heads=1)
    scores = P.load_head_scores(d)
    assert scores.name == "hand-made" and scores.n_kv_heads == 1
    assert scores.n_trials == 10 and scores.n_trials_run == 12
    assert scores.contexts == tuple(P.TrialContext(*c) for c, ok in zip(cells, success, strict=True)
                                    if ok)
    np.testing.assert_array_equal(scores.trial_scores, trials[success])
    assert P.load_head_scores(d, score="set").trial_scores.max() == 1.0
    # the exported reference file of the same run gives the same scores, without contexts
    ref = P.load_head_scores(export_reference_json(tmp_path / "x.json", trials[success]))
    np.testing.assert_array_equal(ref.mean, scores.mean)


@pytest.mark.parametrize(("content", "message"), [
    ("{}", "non-empty object"),
    ('{"0-0": [], "0-1": []}', "zero trials"),
    ('{"0-0": [0.1, 0.2], "0-1": [0.3]}', "ragged trials"),
])
def test_bad_reference_files(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        P.load_head_scores(path)
    assert script.main(["--scores", str(path), "--out", str(tmp_path / "out")]) == 2


def test_bad_detection_directories(tmp_path, capsys):
    cells = [(0, 100, 0.0), (0, 100, 50.0)]
    none_ok = detect_dir(tmp_path / "none", np.zeros((0, 1, 2)), [False, False], cells)
    with pytest.raises(ValueError, match="zero successful trials"):
        P.load_head_scores(none_ok)
    assert script.main(["--scores", str(none_ok), "--out", str(tmp_path / "o")]) == 2
    assert "zero successful trials (of 2)" in capsys.readouterr().err
    short = detect_dir(tmp_path / "short", np.ones((2, 1, 2)), [True, True], cells)
    (short / "trials.jsonl").write_text(
        (short / "trials.jsonl").read_text().splitlines()[0] + "\n")
    with pytest.raises(ValueError, match="1 trials, arrays.npz has 2"):
        P.load_head_scores(short)
    other = tmp_path / "other"
    save_result(other, kind="ablate", config={}, meta=RunMetadata(model_spec="m"), summary={},
                arrays={"x": np.zeros(1)})
    with pytest.raises(ValueError, match="not .detect."):
        P.load_head_scores(other)
    with pytest.raises(ValueError, match="zero successful trials"):
        P.HeadScores("m", np.zeros((0, 2, 2)))
    with pytest.raises(ValueError, match="finite and >= 0"):
        P.HeadScores("m", -np.ones((1, 2, 2)))
