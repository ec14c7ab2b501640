"""Detection: a known-answer model, the fast engine against the slow one, resumable sweeps."""

import numpy as np
import pytest
import torch

from rh_lens import detect
from rh_lens.decode import decode_greedy, decode_slow
from rh_lens.detect import DetectConfig, DetectResult, compute_detect
from rh_lens.errors import RhLensError
from rh_lens.models import backend_of
from rh_lens.niah import Needle, TextHaystack, build_trial
from tests.conftest import BACKENDS, CORPUS
from tests.known_answer import build_copy_model

HAYSTACK = TextHaystack(" ".join([CORPUS[0], CORPUS[2]]))  # no "secret" in it


def single_token_word(tokenizer, haystack: str) -> str:
    """A word that is one token after a space and never occurs in the haystack."""
    for idx in sorted(tokenizer.get_vocab().values()):
        word = tokenizer.decode([idx])
        if (word.startswith(" ") and word[1:].isalpha() and len(word) > 4
                and word.strip().lower() not in haystack.lower()
                and tokenizer.encode(word, add_special_tokens=False) == [idx]):
            return word.strip()
    raise AssertionError("no suitable word in the test vocabulary")


@pytest.fixture(scope="module", params=BACKENDS)
def copy_setup(request, tokenizer):
    word = single_token_word(tokenizer, HAYSTACK.source)
    needle = Needle(f"The magic word is {word}.", "What is the magic word?", word)
    (word_id,) = tokenizer.encode(" " + word, add_special_tokens=False)
    model = build_copy_model(tokenizer, [word_id], copy_head=1, backend=request.param)
    return model, needle


def test_known_answer_model_gives_the_copy_head_score_one(copy_setup):
    model, needle = copy_setup
    cfg = DetectConfig(lengths=(60, 150, 300), depths=(0.0, 50.0, 100.0), buffer=30,
                       max_new_tokens=5)
    result = compute_detect(model, [needle], [HAYSTACK], cfg, progress=False)
    assert len(result.records) == 9 and result.n_success == 9
    expected = np.zeros((1, 4))
    expected[0, 1] = 1.0
    for kind in ("step", "set", "active"):
        np.testing.assert_array_equal(result.mean_scores(kind), expected)
    for record in result.records:
        assert record.generated.strip() == needle.answer
        np.testing.assert_array_equal(record.step_score, expected)


def test_known_answer_head_in_another_slot(tokenizer, copy_setup):
    first, needle = copy_setup
    (word_id,) = tokenizer.encode(" " + needle.answer, add_special_tokens=False)
    model = build_copy_model(tokenizer, [word_id], copy_head=3, backend=backend_of(first))
    cfg = DetectConfig(lengths=(100,), depths=(50.0,), buffer=30, max_new_tokens=5)
    result = compute_detect(model, [needle], [HAYSTACK], cfg, progress=False)
    assert result.mean_scores("step")[0].tolist() == [0.0, 0.0, 0.0, 1.0]


def test_failed_trials_are_dropped_not_scored_zero(copy_setup, tokenizer):
    model, needle = copy_setup
    wrong = Needle(f"{needle.needle} Nothing else.", needle.question, "Nothing else.")
    cfg = DetectConfig(lengths=(100,), depths=(50.0,), buffer=30, max_new_tokens=5)
    result = compute_detect(model, [needle, wrong], [HAYSTACK, HAYSTACK], cfg, progress=False)
    assert [r.success for r in result.records] == [True, False]
    assert result.mean_scores("step")[0, 1] == 1.0  # the failed trial does not pull it down
    assert result.trial_scores("step").shape == (1, 1, 4)


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_fast_engine_equals_slow_obvious_one(tiny_gqa, chunk):
    needle = Needle("The secret word is ginger.", "What is the secret word?", "ginger")
    trial = build_trial(tiny_gqa, needle, HAYSTACK, context_length=90, depth=40, buffer=30,
                        max_new_tokens=8)
    (fast,) = decode_greedy(tiny_gqa, trial.tokens[None], max_new_tokens=8, chunk_size=chunk)
    slow = decode_slow(tiny_gqa, trial.tokens, max_new_tokens=8)
    np.testing.assert_array_equal(fast.tokens, slow.tokens)
    np.testing.assert_array_equal(fast.positions, slow.positions)
    assert fast.text == slow.text


def test_batched_trials_equal_single_trials(tiny_gqa):
    prompts = torch.stack([tiny_gqa.to_tokens(t, prepend_bos=True)[0, :20]
                           for t in (CORPUS[0], CORPUS[1], CORPUS[2])])
    batched = decode_greedy(tiny_gqa, prompts, max_new_tokens=6, chunk_size=8)
    for b in range(3):
        (single,) = decode_greedy(tiny_gqa, prompts[b : b + 1], max_new_tokens=6)
        np.testing.assert_array_equal(batched[b].tokens, single.tokens)
        np.testing.assert_array_equal(batched[b].positions, single.positions)


def test_no_hook_left_after_decoding(tiny_gqa):
    decode_greedy(tiny_gqa, tiny_gqa.to_tokens("a b c"), max_new_tokens=2)
    assert sum(len(hp._forward_hooks) for hp in tiny_gqa.hook_dict.values()) == 0


# ------------------------------------------------------------------------ persistence and resume


SWEEP = DetectConfig(lengths=(60, 120), depths=(0.0, 50.0, 100.0), buffer=30, max_new_tokens=5)


def test_interrupted_sweep_loses_no_cell_and_resumes_identically(copy_setup, tmp_path,
                                                                 monkeypatch):
    model, needle = copy_setup
    full = compute_detect(model, [needle], [HAYSTACK], SWEEP, progress=False)

    real = detect.run_trials
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(detect, "run_trials", flaky)
    out = tmp_path / "sweep"
    with pytest.raises(KeyboardInterrupt):
        compute_detect(model, [needle], [HAYSTACK], SWEEP, out_dir=out, progress=False)
    written = sorted(p.name for p in (out / "cells").glob("*.json"))
    assert len(written) == 4  # the first batch of cells (batch_size * 4) survived
    assert not list((out / "cells").glob("*.tmp*"))

    monkeypatch.setattr(detect, "run_trials", real)
    resumed = compute_detect(model, [needle], [HAYSTACK], SWEEP, out_dir=out, progress=False)
    assert len(resumed.records) == 6
    for kind in ("step", "set", "active"):
        np.testing.assert_array_equal(resumed.mean_scores(kind), full.mean_scores(kind))
    assert [r.generated for r in resumed.records] == [r.generated for r in full.records]


@pytest.mark.slow
def test_shards_merge_to_the_full_sweep(copy_setup, tmp_path):
    model, needle = copy_setup
    full = compute_detect(model, [needle], [HAYSTACK], SWEEP, progress=False)
    dirs = []
    for i in range(2):
        out = tmp_path / f"shard{i}"
        compute_detect(model, [needle], [HAYSTACK], SWEEP, out_dir=out, shard=(i, 2),
                       progress=False)
        dirs.append(out)
    merged, identity = DetectResult.merge(dirs)
    assert DetectConfig.from_dict(identity["config"]) == SWEEP
    assert [r.cell.key for r in merged.records] == [r.cell.key for r in full.records]
    for kind in ("step", "set", "active"):
        np.testing.assert_array_equal(merged.trial_scores(kind), full.trial_scores(kind))


def test_result_saves_and_loads_back(copy_setup, tmp_path):
    """A saved result reads back from its cells with every trial, and the head scores built
    in memory equal those read from the saved directory."""
    from rh_lens.properties import HeadScores, load_head_scores
    from rh_lens.results import RunMetadata, import_reference_json, load_result

    model, needle = copy_setup
    out = tmp_path / "sweep"
    result = compute_detect(model, [needle], [HAYSTACK], SWEEP, out_dir=out, progress=False)
    meta = RunMetadata.collect(model_spec="copy", model=model, seed=0, argv=[])
    summary = result.save(out, meta=meta, identity={"model": "copy"})
    assert summary["n_trials"] == len(result.records) == 6
    loaded = DetectResult.load(out)
    assert loaded.config == result.config
    assert (loaded.n_layers, loaded.n_heads, loaded.n_kv_heads) == (
        result.n_layers, result.n_heads, result.n_kv_heads)
    assert [r.generated for r in loaded.records] == [r.generated for r in result.records]
    for kind in ("step", "set", "active"):
        np.testing.assert_array_equal(loaded.trial_scores(kind), result.trial_scores(kind))
    on_disk = load_result(out)
    assert on_disk.kind == "detect" and on_disk.config["model"] == "copy"
    np.testing.assert_array_equal(on_disk.arrays["mean_step"], result.mean_scores("step"))
    np.testing.assert_array_equal(import_reference_json(out / "head_score.json"),
                                  result.trial_scores("step"))
    in_memory = HeadScores.from_detect(result, name="copy")
    from_dir = load_head_scores(out)
    np.testing.assert_array_equal(in_memory.trial_scores, from_dir.trial_scores)
    np.testing.assert_array_equal(in_memory.trial_active, from_dir.trial_active)
    assert in_memory.contexts == from_dir.contexts
    assert (in_memory.n_kv_heads, in_memory.n_trials_run) == (
        from_dir.n_kv_heads, from_dir.n_trials_run)


def test_a_result_computed_in_memory_saves_and_loads_back(copy_setup, tmp_path):
    model, needle = copy_setup
    result = compute_detect(model, [needle], [HAYSTACK], SWEEP, progress=False)
    result.save(tmp_path / "saved")
    loaded = DetectResult.load(tmp_path / "saved")
    assert [r.cell for r in loaded.records] == [r.cell for r in result.records]
    np.testing.assert_array_equal(loaded.trial_scores("set"), result.trial_scores("set"))


def test_load_of_a_directory_without_a_sweep_is_refused(tmp_path):
    with pytest.raises(RhLensError, match="not a sweep directory"):
        DetectResult.load(tmp_path)


def test_directory_of_another_sweep_is_refused(copy_setup, tmp_path):
    model, needle = copy_setup
    out = tmp_path / "sweep"
    compute_detect(model, [needle], [HAYSTACK], SWEEP, out_dir=out, progress=False)
    other = DetectConfig(lengths=(80,), depths=(0.0,), buffer=30, max_new_tokens=5)
    with pytest.raises(RhLensError, match="different sweep.*config"):
        compute_detect(model, [needle], [HAYSTACK], other, out_dir=out, progress=False)


def test_bad_sweep_settings():
    with pytest.raises(ValueError, match="percentages"):
        DetectConfig(lengths=(100,), depths=(120.0,))
    with pytest.raises(ValueError, match="shard 2/2"):
        detect.cells(1, SWEEP, shard=(2, 2))


@pytest.mark.needs_shared
@pytest.mark.slow
def test_fast_engine_equals_slow_on_real_pretrained_weights():
    """stories260K, a real model nobody here trained: same tokens and argmax positions."""
    from rh_lens.models import load_model
    from tests.conftest import shared_path

    path = shared_path("models", "llama2c", "stories260K.bin")
    model = load_model(f"llama2c:{path}")
    needle = Needle("Lily had a red ball.", "What did Lily have?", "a red ball")
    hay = TextHaystack("Once upon a time, there was a little girl named Lily. She loved to play "
                       "outside in the park. One day, she saw a big dog.")
    trial = build_trial(model, needle, hay, context_length=200, depth=50, buffer=40,
                        max_new_tokens=10)
    for chunk in (16, 512):
        (fast,) = decode_greedy(model, trial.tokens[None], max_new_tokens=10, chunk_size=chunk)
        slow = decode_slow(model, trial.tokens, max_new_tokens=10)
        np.testing.assert_array_equal(fast.tokens, slow.tokens)
        np.testing.assert_array_equal(fast.positions, slow.positions)
