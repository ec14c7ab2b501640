"""Bad input a new user hits first: a device this machine lacks, retrieval scores of another
model.  Each gets one ``error:`` line naming the problem, and nothing is written."""

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

from analyses import _cli, ablate, detect, path_patch
from rh_lens.errors import ModelLoadError
from rh_lens.models import load_model

RELEASE_DETECT = Path(__file__).parent / "fixtures" / "release" / "detect"  # zoo:llama-s's


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_an_unknown_device_is_named_with_the_available_ones(tmp_path, capsys):
    with pytest.raises(ModelLoadError, match="'tpu9'.*available: cpu"):
        load_model("zoo:llama-s", device="tpu9")
    out = tmp_path / "out"
    assert detect.main(["--device", "tpu9", "--out", str(out), "--quiet"]) == 2
    err = one_error_line(capsys)
    assert "tpu9" in err and "available: cpu" in err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(ModelLoadError, match="'cuda:1': no CUDA device"):
        load_model("zoo:llama-s", device="cuda:1")
    assert detect.main(["--device", "cuda", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = one_error_line(capsys)
    assert "'cuda': no CUDA device is available" in err and "available: cpu" in err


@pytest.fixture
def other_models_scores(tmp_path) -> Path:
    """zoo:llama-s's detection directory as if run on zoo:gpt2-s (the same 4 x 8 heads)."""
    scores = tmp_path / "gpt2-scores"
    shutil.copytree(RELEASE_DETECT, scores)
    result = json.loads((scores / "result.json").read_text())
    result["config"]["model"] = "zoo:gpt2-s"
    (scores / "result.json").write_text(json.dumps(result))
    return scores


def test_scores_of_another_model_are_refused(other_models_scores, tmp_path, capsys):
    out = tmp_path / "ablate"
    assert ablate.main(["--model", "zoo:llama-s", "--scores", str(other_models_scores),
                        "--ks", "1", "--out", str(out), "--quiet"]) == 2
    err = one_error_line(capsys)
    assert "computed on model 'zoo:gpt2-s', not 'zoo:llama-s'" in err
    assert "--scores-from-other-model" in err
    assert not out.exists()
    assert path_patch.main(["--model", "zoo:llama-s", "--scores", str(other_models_scores),
                            "--senders", "top:1", "--out", str(tmp_path / "pp"),
                            "--quiet"]) == 2
    assert "computed on model 'zoo:gpt2-s'" in one_error_line(capsys)


def test_scores_of_another_model_are_used_when_asked(other_models_scores):
    def args(*extra):
        p = argparse.ArgumentParser()
        p.add_argument("--model")
        _cli.add_scores_args(p, scores_help="")
        return p.parse_args(["--model", "zoo:llama-s", "--scores", str(other_models_scores),
                             *extra])

    table, path = _cli.load_scores(args("--scores-from-other-model"), shape=(4, 8))
    assert path == other_models_scores and table.shape == (4, 8)
    with pytest.raises(ValueError, match="computed on model 'zoo:gpt2-s'"):
        _cli.load_scores(args(), shape=(4, 8))
    same = argparse.Namespace(**{**vars(args()), "scores": RELEASE_DETECT})
    assert _cli.load_scores(same, shape=(4, 8))[0].shape == (4, 8)  # its own model's
