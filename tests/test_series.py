"""Checkpoint series as a model source: zoo runs, local directories, Hugging Face revisions
(a local Hugging Face cache holding one tiny model at several revisions)."""

import json
import shutil

import pytest
import torch

from rh_lens.errors import ModelLoadError
from rh_lens.models import load_model
from rh_lens.series import (
    Checkpoint,
    CheckpointSeries,
    directory_series,
    parse_series,
    revision_series,
    zoo_series,
)
from tests.conftest import save_hf_model

REPO = "acme/tiny-llama"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, tokenizer):
    """A Hugging Face cache holding ``REPO`` at revisions ``step100`` and ``step200`` (two
    different weight sets), laid out as huggingface_hub writes it, plus the two directories."""
    root = tmp_path_factory.mktemp("hub")
    repo = root / "cache" / f"models--{REPO.replace('/', '--')}"
    plain = {}
    for i, revision in enumerate(("step100", "step200")):
        commit = f"{i + 1:040x}"
        src = save_hf_model(root / f"tiny-llama-{revision}", "llama", tokenizer)
        with torch.no_grad():  # a second, different weight set
            if i:
                from safetensors.torch import load_file, save_file

                weights = load_file(str(src / "model.safetensors"))
                save_file({k: v * 0.5 for k, v in weights.items()}, str(src / "model.safetensors"),
                          metadata={"format": "pt"})
        shutil.copytree(src, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(commit)
        plain[revision] = src
    return root / "cache", plain


@pytest.fixture
def offline_cache(hub_cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache[0]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub_cache[1]


def _logits(model):
    tokens = torch.tensor([[0, 5, 9, 14, 3, 7]])
    with torch.no_grad():
        return model(tokens)


def test_a_revision_loads_that_revisions_weights(offline_cache):
    for revision, directory in offline_cache.items():
        by_revision = load_model(REPO, revision=revision)
        torch.testing.assert_close(_logits(by_revision), _logits(load_model(directory)),
                                   rtol=0, atol=0)
    a, b = (_logits(load_model(REPO, revision=r)) for r in ("step100", "step200"))
    assert not torch.allclose(a, b)


def test_a_revision_series_is_ordered_by_step_and_loads(offline_cache):
    series = revision_series(REPO, ["step200", "step100"])
    assert series.steps == [100, 200]
    assert [c.revision for c in series.checkpoints] == ["step100", "step200"]
    model = series.checkpoints[1].load()
    torch.testing.assert_close(_logits(model), _logits(load_model(offline_cache["step200"])),
                               rtol=0, atol=0)


def test_a_missing_revision_is_named_with_the_cached_ones(offline_cache):
    with pytest.raises(ModelLoadError, match=r"revision 'step999'.*step100, step200"):
        load_model(REPO, revision="step999")


def test_a_revision_of_a_local_or_zoo_model_is_refused(offline_cache):
    with pytest.raises(ValueError, match="Hugging Face model names only"):
        load_model("zoo:llama-s", revision="step100")
    with pytest.raises(ValueError, match="Hugging Face model names only"):
        load_model(offline_cache["step100"], revision="step100")


def _model_dir(path, step=None):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    if step is not None:
        (path / "card.json").write_text(json.dumps({"steps": step}))
    return path


def test_directories_take_the_cards_step_then_the_names_number(tmp_path):
    a = _model_dir(tmp_path / "late", step=700)
    b = _model_dir(tmp_path / "checkpoint-300")
    series = directory_series([a, b])
    assert series.steps == [300, 700] and series.checkpoints[0].spec == str(b)
    # Without a number in some name the order given is kept, numbered 0, 1, ...
    c = _model_dir(tmp_path / "final")
    assert [c_.spec for c_ in directory_series([b, c]).checkpoints] == [str(b), str(c)]


def test_a_folder_of_steps_is_a_series_and_every_keeps_the_last(tmp_path):
    for step in (0, 250, 500, 600):
        _model_dir(tmp_path / "run" / "steps" / f"step-{step:06d}")
    series = zoo_series("x", run_dir=tmp_path / "run")
    assert series.steps == [0, 250, 500, 600]
    assert series.every(500).steps == [0, 500, 600]
    assert parse_series([str(tmp_path / "run" / "steps")]).steps == series.steps
    with pytest.raises(ValueError, match="positive"):
        series.every(0)


def test_empty_series_are_refused_with_what_to_do(tmp_path):
    with pytest.raises(ValueError, match=r"zoo:nothing is empty.*--save-every"):
        zoo_series("nothing", run_dir=tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is empty: no model directory"):
        directory_series([tmp_path / "empty"])
    with pytest.raises(ValueError, match="is empty"):
        parse_series([])
    with pytest.raises(ValueError, match="is empty"):
        CheckpointSeries("x", ())
    with pytest.raises(ValueError, match="needs its revisions"):
        parse_series(["EleutherAI/pythia-70m"])
    with pytest.raises(ValueError, match="not found"):
        directory_series([tmp_path / "absent"])


def test_steps_must_be_distinct():
    with pytest.raises(ValueError, match="distinct steps"):
        CheckpointSeries("x", (Checkpoint(5, "a"), Checkpoint(5, "b")))
