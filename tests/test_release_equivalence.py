"""The analyses give the numbers of rh_lens 0.1.0, and its output directories still load.

``tests/fixtures/release/`` holds small runs of every analysis written by rh_lens 0.1.0 on
``zoo:llama-s`` (figures left out).  Each test reruns the same command into a new directory and
compares what it computes with what 0.1.0 wrote; the commands are the ones below.  Outputs added
since (new arrays, summary fields, printed lines) are allowed; every one that 0.1.0 wrote must
come back unchanged.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from rh_lens.results import load_result

pytestmark = pytest.mark.slow

RELEASE = Path(__file__).parent / "fixtures" / "release"
MODEL = ["--model", "zoo:llama-s"]
DETECT = [*MODEL, "--n-needles", "1", "--lengths", "96", "160", "--depths", "0", "50", "--quiet"]


def _arrays_equal(new: Path, old: Path) -> None:
    a, b = load_result(new).arrays, load_result(old).arrays
    assert set(b) <= set(a), sorted(set(b) - set(a))
    for name in b:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _holds(new, old, where: str = "") -> None:
    """``new`` holds every value of ``old`` unchanged (dictionaries may have gained keys)."""
    if isinstance(old, dict):
        assert isinstance(new, dict), where
        for key, value in old.items():
            assert key in new, f"{where}.{key} is gone"
            _holds(new[key], value, f"{where}.{key}")
    elif isinstance(old, list):
        assert isinstance(new, list) and len(new) == len(old), where
        for i, (a, b) in enumerate(zip(new, old, strict=True)):
            _holds(a, b, f"{where}[{i}]")
    else:
        assert new == old, f"{where}: {new!r} != {old!r}"


def _lines_kept(new: str, old: str) -> None:
    """Every line of ``old`` is in ``new``, in the same order."""
    lines = iter(new.splitlines())
    for line in old.splitlines():
        assert any(candidate == line for candidate in lines), f"line gone: {line!r}"


def test_detect_writes_the_release_head_scores(tmp_path):
    from analyses import detect

    out = tmp_path / "detect"
    assert detect.main([*DETECT, "--out", str(out)]) == 0
    old = RELEASE / "detect"
    assert (out / "head_score.json").read_bytes() == (old / "head_score.json").read_bytes()
    old_trials = [json.loads(line) for line in (old / "trials.jsonl").open()]
    for trial in old_trials:
        del trial["cell_format"]  # the record format key moved to the store's records
    _holds([json.loads(line) for line in (out / "trials.jsonl").open()], old_trials)
    _holds(_json(out / "summary.json"), _json(old / "summary.json"))
    _arrays_equal(out, old)


def test_release_detection_directory_loads(tmp_path):
    """Cells written before the store had one record format still read back, and a rerun into a
    copy of the directory resumes from them without recomputing."""
    from analyses import detect
    from rh_lens.detect import DetectResult
    from rh_lens.properties import HeadScores, load_head_scores

    old = RELEASE / "detect"
    result = DetectResult.load(old)
    arrays = load_result(old).arrays
    np.testing.assert_array_equal(result.trial_scores("step"), arrays["trial_step"])
    np.testing.assert_array_equal(result.activation_frequency(), arrays["activation_frequency"])
    scores = load_head_scores(old)
    np.testing.assert_array_equal(HeadScores.from_detect(result).trial_scores,
                                  scores.trial_scores)
    copy = tmp_path / "detect"
    shutil.copytree(old, copy)
    before = {p.name: p.stat().st_mtime_ns for p in (copy / "cells").iterdir()}
    assert detect.main([*DETECT, "--out", str(copy)]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (copy / "cells").iterdir()} == before
    assert (copy / "head_score.json").read_bytes() == (old / "head_score.json").read_bytes()


def test_ablate_gives_the_release_numbers(tmp_path):
    from analyses import ablate

    out = tmp_path / "ablate"
    assert ablate.main([*MODEL, "--scores", str(RELEASE / "detect"), "--ks", "2", "--draws", "1",
                        "--n-needles", "1", "--lengths", "128", "--depths", "50", "--out",
                        str(out), "--quiet"]) == 0
    old = RELEASE / "ablate"
    _arrays_equal(out, old)
    _holds(_json(out / "summary.json"), _json(old / "summary.json"))
    from rh_lens.ablation import AblationResult

    loaded = AblationResult.load(out)
    assert [c.name for c in loaded.conditions] == ["none", "top-2", "random-2-d0"]
    old_arrays = load_result(old).arrays
    for name, value in loaded.arrays().items():
        if name in old_arrays:
            np.testing.assert_array_equal(value, old_arrays[name], err_msg=name)


def test_cot_gives_the_release_outputs(tmp_path):
    from analyses import cot

    out = tmp_path / "cot"
    assert cot.main([*MODEL, "--scores", str(RELEASE / "detect"), "--ks", "2", "--draws", "1",
                     "--items", str(RELEASE / "cot_items.jsonl"),
                     "--cot-template", "{context}Question: {question}\nAnswer:",
                     "--direct-template", "{context}Question: {question} The answer is",
                     "--out", str(out), "--quiet"]) == 0
    old = RELEASE / "cot"
    _arrays_equal(out, old)
    for name in ("none", "top-2", "random-2-d0"):
        for task in ("cot", "direct"):
            new_record = _json(out / "conditions" / name / "cells" / f"{task}.json")
            old_record = _json(old / "conditions" / name / f"{task}.json")
            assert new_record["outputs"] == old_record["outputs"]
            assert new_record["correct"] == old_record["correct"]
    from rh_lens.cot import CotResult

    loaded = CotResult.load(out)
    np.testing.assert_array_equal(loaded.accuracy(), load_result(old).arrays["accuracy"])
    _holds(loaded.summary(), _json(old / "summary.json"))


def test_release_cot_directory_is_refused_clearly(tmp_path, capsys):
    from analyses import cot

    copy = tmp_path / "cot"
    shutil.copytree(RELEASE / "cot", copy)
    assert cot.main([*MODEL, "--scores", str(RELEASE / "detect"), "--ks", "2",
                     "--items", str(RELEASE / "cot_items.jsonl"),
                     "--cot-template", "{question}", "--direct-template", "{question}",
                     "--out", str(copy), "--quiet"]) == 2
    assert "earlier rh_lens" in capsys.readouterr().err


def test_path_patch_gives_the_release_numbers(tmp_path):
    from analyses import path_patch

    out = tmp_path / "path_patch"
    assert path_patch.main([*MODEL, "--scores", str(RELEASE / "detect"), "--senders", "top:2",
                            "--receivers", "top:2", "--n-pairs", "2", "--out", str(out),
                            "--quiet"]) == 0
    _arrays_equal(out, RELEASE / "path_patch")
    from rh_lens.patching import PatchingResult

    reloaded = PatchingResult.load(out).arrays()
    for name, value in load_result(RELEASE / "path_patch").arrays.items():
        np.testing.assert_array_equal(reloaded[name], value, err_msg=name)


def test_properties_give_the_release_summary(tmp_path):
    from analyses import properties

    out = tmp_path / "props"
    assert properties.main(["--scores", str(RELEASE / "detect"), "--out", str(out)]) == 0
    new, old = _json(out / "summary.json"), _json(RELEASE / "props" / "summary.json")
    for summary in (new, old):
        for entry in summary["models"].values():
            entry.pop("source")
    _holds(new, old)
    _lines_kept((out / "table.txt").read_text(), (RELEASE / "props" / "table.txt").read_text())
