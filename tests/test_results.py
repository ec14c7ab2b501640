"""rh_lens.results: provenance, atomic writes, result directories, the reference's score files."""

import datetime
import json
import os
import platform
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rh_lens.results import (
    SCHEMA_VERSION,
    RunMetadata,
    export_reference_json,
    import_reference_json,
    load_result,
    read_json,
    save_result,
    to_jsonable,
    write_json_atomic,
    write_npz_atomic,
)
from tests.conftest import shared_path

# The released score files' figures: (layers, heads, trials, heads with mean > 0.1).
OFFICIAL = {
    "llama-2-7b-80k": (32, 32, 586, 33),
    "llama-2-13b-64k": (40, 40, 367, 33),
    "Mistral-7B-v0.2-hf": (32, 32, 362, 43),
    "Mixtral-8x7B-v0.1": (32, 32, 390, 63),
    "Qwen1.5-14B": (40, 40, 390, 61),
    "Qwen1.5-14B-Chat": (40, 40, 221, 68),
    "Yi-6B-200K": (32, 32, 567, 53),
}


def official(name: str) -> Path:
    return shared_path("data", "official_head_scores") / f"{name}.json"


def files(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


# --------------------------------------------------------------------------------------------
# The released reference score files (known answers)


@pytest.mark.needs_shared
@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_scores_known_answers(name):
    n_layers, n_heads, n_trials, n_retrieval = OFFICIAL[name]
    scores = import_reference_json(official(name))
    assert scores.shape == (n_trials, n_layers, n_heads)
    assert scores.dtype == np.float64
    assert int((scores.mean(axis=0) > 0.1).sum()) == n_retrieval


@pytest.mark.needs_shared
def test_official_llama_top_heads():
    mean = import_reference_json(official("llama-2-7b-80k")).mean(axis=0)
    flat = np.argsort(-mean, axis=None)[:3]
    top = [(int(i) // 32, int(i) % 32) for i in flat]
    assert top == [(16, 19), (11, 15), (8, 26)]
    np.testing.assert_allclose([mean[t] for t in top], [0.94, 0.92, 0.80], atol=0.005)


@pytest.mark.needs_shared
def test_export_reproduces_official_file(tmp_path):
    src = official("Mistral-7B-v0.2-hf")
    out = export_reference_json(tmp_path / "m.json", import_reference_json(src))
    original, exported = json.loads(src.read_text()), json.loads(out.read_text())
    assert list(exported) == list(original)  # same layer-major key order
    assert exported == original


# --------------------------------------------------------------------------------------------
# Export / import


def test_reference_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    scores = rng.random((7, 3, 4)) ** 3
    scores[0, 0, 0], scores[1, 2, 3], scores[2, 1, 1] = -0.0, 1 / 3, 1e-300
    path = export_reference_json(tmp_path / "s.json", scores)
    back = import_reference_json(path)
    assert back.dtype == np.float64 and back.shape == scores.shape
    assert np.array_equal(back, scores)
    data = json.loads(path.read_text())
    assert list(data)[:6] == ["0-0", "0-1", "0-2", "0-3", "1-0", "1-1"]
    assert data["2-3"] == scores[:, 2, 3].tolist()
    assert all(type(v) is float for v in data["1-2"])


@pytest.mark.parametrize("scores, match", [
    (np.zeros((0, 2, 2)), "zero trials"),
    (np.full((2, 2, 2), np.nan), "NaN"),
])
def test_export_rejects_bad_scores(tmp_path, scores, match):
    with pytest.raises(ValueError, match=match):
        export_reference_json(tmp_path / "s.json", scores)
    assert files(tmp_path) == []


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scores.json"
    path.write_text(text)
    return path


GRID = {"0-0": [0.1, 0.2], "0-1": [0, 1], "1-0": [0.5, 0.5], "1-1": [0.0, 0.25]}


@pytest.mark.parametrize("data, match", [
    ({**GRID, "1-1": [0.0]}, r"ragged.*'0-0' has 2 scores, '1-1' has 1"),
    ({}, "non-empty object"),
    ([[0.1]], "non-empty object"),
    ({k: [] for k in GRID}, "zero trials"),
    ({**GRID, "a-1": [0.1, 0.2]}, "bad key 'a-1'"),
    ({**GRID, "1_2": [0.1, 0.2]}, "bad key '1_2'"),
    ({**GRID, "01-1": [0.1, 0.2]}, "bad key '01-1'"),
    ({**GRID, "-1-0": [0.1, 0.2]}, "bad key '-1-0'"),
    ({k: v for k, v in GRID.items() if k != "1-0"}, r"incomplete grid.*'1-0' is missing"),
    ({**GRID, "0-1": [0.1, "0.2"]}, r"'0-1' holds '0.2', not a number"),
    ({**GRID, "0-1": [0.1, True]}, "not a number"),
    ({**GRID, "0-1": [0.1, None]}, "not a number"),
    ({**GRID, "0-1": 0.1}, "not a list"),
])
def test_import_rejects_bad_files(tmp_path, data, match):
    path = write(tmp_path, json.dumps(data))
    with pytest.raises(ValueError, match=match) as info:
        import_reference_json(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text, match", [
    ('{"0-0": [0.1, NaN], "0-1": [0.0, 0.0]}', r"'0-0' trial 1 is nan, not finite"),
    ('{"0-0": [0.1, Infinity], "0-1": [0.0, 0.0]}', "not finite"),
    ('{"0-0": [0.1, 1e999], "0-1": [0.0, 0.0]}', "not finite"),
    ('{"0-0": [0.1, 1' + "0" * 400 + '], "0-1": [0.0, 0.0]}', "beyond float64"),
    ('{"0-0": [0.1], "0-0": [0.2]}', "duplicate key '0-0'"),
    ('{"0-0": [0.1, ', "not valid JSON"),
])
def test_import_rejects_bad_numbers_and_json(tmp_path, text, match):
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match=match) as info:
        import_reference_json(path)
    assert str(path) in str(info.value)


def test_import_infers_grid_from_keys_in_any_order(tmp_path):
    data = {"1-2": [6], "0-0": [1], "0-1": [2], "0-2": [3], "1-0": [4], "1-1": [5]}
    scores = import_reference_json(write(tmp_path, json.dumps(data)))
    assert np.array_equal(scores, [[[1, 2, 3], [4, 5, 6]]])


# --------------------------------------------------------------------------------------------
# Atomic writers and read_json


class Unencodable:
    pass


def test_json_write_failing_midway_keeps_old_file(tmp_path):
    path = write_json_atomic(tmp_path / "x.json", {"old": 1})
    big = {f"k{i}": list(range(100)) for i in range(2000)}  # streamed out before the failure
    with pytest.raises(ValueError, match=r"x\.json: cannot write as JSON"):
        write_json_atomic(path, {**big, "bad": Unencodable()})
    with pytest.raises(ValueError, match="not JSON compliant"):
        write_json_atomic(path, {**big, "nan": float("nan")})
    assert json.loads(path.read_text()) == {"old": 1}
    assert files(tmp_path) == ["x.json"]


def test_json_write_replaces_and_keeps_mode(tmp_path):
    path = write_json_atomic(tmp_path / "x.json", [1, 2])
    assert path.stat().st_mode & 0o777 == 0o644
    write_json_atomic(path, {"a": [1.5, None]}, indent=2)
    assert read_json(path) == {"a": [1.5, None]}
    assert files(tmp_path) == ["x.json"]


def test_npz_write_round_trip_and_failure(tmp_path):
    arrays = dict(path=np.arange(6).reshape(2, 3), file=np.array([True, False]),
                  allow_pickle=np.array(["ab", "c"]), f=np.array(1.5, np.float32))
    path = write_npz_atomic(tmp_path / "a.npz", **arrays)
    with np.load(path, allow_pickle=False) as npz:
        assert sorted(npz.files) == sorted(arrays)
        for name, value in arrays.items():
            assert np.array_equal(npz[name], value) and npz[name].dtype == np.asarray(value).dtype
    before = path.read_bytes()
    with pytest.raises(ValueError, match="'obj' has dtype object, which needs pickle"):
        write_npz_atomic(path, ok=np.zeros(3), obj=np.array([{"a": 1}], dtype=object))
    assert path.read_bytes() == before
    assert files(tmp_path) == ["a.npz"]


def test_read_json_names_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"missing\.json: cannot read"):
        read_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON"):
        read_json(bad)


def test_to_jsonable():
    value = {"a": np.float32(0.5), "b": (np.int64(3), np.array([1.0, 2.0])), "c": [np.nan]}
    with pytest.raises(ValueError, match=r"x\['c'\]\[0\] is nan"):
        to_jsonable(value, where="x")
    assert to_jsonable(value, nan_to_none=True) == {"a": 0.5, "b": [3, [1.0, 2.0]], "c": [None]}
    with pytest.raises(ValueError, match="non-string key 1"):
        to_jsonable({1: 2})
    with pytest.raises(ValueError, match="Path, which JSON cannot hold"):
        to_jsonable({"p": Path("/")})


# --------------------------------------------------------------------------------------------
# Run metadata and result directories


FAKE_MODEL = SimpleNamespace(cfg=SimpleNamespace(
    model_name="tiny", n_layers=2, n_heads=4, n_key_value_heads=None, d_head=16, n_ctx=128,
    dtype=torch.float32, device=torch.device("cpu"),
))


def test_metadata_collect():
    meta = RunMetadata.collect(model_spec="zoo:tiny", model=FAKE_MODEL, seed=3,
                               argv=["--out", "x"], extra={"note": np.int64(1)})
    assert (meta.model_name, meta.n_layers, meta.n_heads, meta.n_key_value_heads) == (
        "tiny", 2, 4, 4)
    assert (meta.d_head, meta.n_ctx, meta.dtype, meta.device) == (16, 128, "torch.float32", "cpu")
    assert meta.seed == 3 and meta.argv == ("--out", "x") and meta.extra == {"note": 1}
    assert meta.numpy_version == np.__version__
    assert meta.python_version == platform.python_version()
    assert meta.torch_version == torch.__version__
    assert meta.rh_lens_version and meta.transformer_lens_version
    started = datetime.datetime.fromisoformat(meta.started_at)
    assert started.utcoffset() == datetime.timedelta(0)
    assert abs(datetime.datetime.now(datetime.timezone.utc) - started).total_seconds() < 60
    assert meta.git_commit is None or re.fullmatch(r"[0-9a-f]{40}", meta.git_commit)
    assert meta.cuda_available == torch.cuda.is_available()
    assert RunMetadata.from_dict(json.loads(json.dumps(meta.to_dict()))) == meta


def test_metadata_from_real_model(tiny_gqa):
    meta = RunMetadata.collect(model_spec="tiny-gqa", model=tiny_gqa, seed=None, argv=None)
    assert (meta.n_layers, meta.n_heads, meta.n_key_value_heads, meta.d_head) == (2, 4, 2, 16)
    assert meta.model_name == "tiny-gqa" and meta.argv is None and meta.seed is None


def test_metadata_from_dict_rejects_unknown_fields():
    data = RunMetadata(model_spec="m").to_dict()
    with pytest.raises(ValueError, match="unknown run metadata fields: colour"):
        RunMetadata.from_dict({**data, "colour": "red"})
    with pytest.raises(ValueError, match="no model_spec"):
        RunMetadata.from_dict({})


def saved(directory: Path, kind: str = "detect", **summary):
    meta = RunMetadata.collect(model_spec="zoo:tiny", model=FAKE_MODEL, seed=0, argv=["a"])
    arrays = {"scores": np.arange(12, dtype=np.float32).reshape(3, 4),
              "mask": np.array([True, False])}
    save_result(directory, kind=kind, config={"lengths": (10, 20), "depth": np.float64(0.5)},
                meta=meta, summary=summary or {"n": np.int64(4), "rate": None}, arrays=arrays)
    return meta, arrays


def test_save_load_round_trip(tmp_path):
    out = tmp_path / "new" / "run"
    meta, arrays = saved(out)
    assert files(out) == ["arrays.npz", "result.json"]
    result = load_result(out)
    assert result.kind == "detect" and result.path == out
    assert result.config == {"lengths": [10, 20], "depth": 0.5}
    assert result.summary == {"n": 4, "rate": None}
    assert result.meta == meta.to_dict() and result.run_metadata() == meta
    assert sorted(result.arrays) == ["mask", "scores"]
    for name, value in arrays.items():
        assert result.arrays[name].dtype == value.dtype
        assert np.array_equal(result.arrays[name], value)
    assert read_json(out / "result.json")["schema_version"] == SCHEMA_VERSION


def test_save_refuses_other_kind_and_replaces_same_kind(tmp_path):
    saved(tmp_path)
    before = {p: (tmp_path / p).read_bytes() for p in files(tmp_path)}
    with pytest.raises(ValueError, match="already holds a result of kind 'detect', not 'ablate'"):
        saved(tmp_path, kind="ablate")
    assert {p: (tmp_path / p).read_bytes() for p in files(tmp_path)} == before
    saved(tmp_path, n=5)
    assert load_result(tmp_path).summary == {"n": 5}


def test_save_refuses_nan_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"summary\['rate'\] is nan"):
        saved(tmp_path, rate=float("nan"))
    assert files(tmp_path) == []


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="no such result directory"):
        load_result(tmp_path / "nope")
    with pytest.raises(ValueError, match="no result.json"):
        load_result(tmp_path)
    saved(tmp_path)
    record = read_json(tmp_path / "result.json")
    write_json_atomic(tmp_path / "result.json", {**record, "schema_version": 2})
    with pytest.raises(ValueError, match="schema_version 2, this rh_lens reads 1"):
        load_result(tmp_path)
    write_json_atomic(tmp_path / "result.json", {**record, "summary": []})
    with pytest.raises(ValueError, match="malformed 'summary'"):
        load_result(tmp_path)
    write_json_atomic(tmp_path / "result.json", record)
    write_npz_atomic(tmp_path / "arrays.npz", scores=np.zeros((3, 5), np.float32),
                     mask=np.array([True, False]))
    with pytest.raises(ValueError, match="do not match the manifest"):
        load_result(tmp_path)
    (tmp_path / "arrays.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match=r"arrays\.npz: cannot load arrays"):
        load_result(tmp_path)
    (tmp_path / "arrays.npz").unlink()
    with pytest.raises(ValueError, match="no arrays.npz"):
        load_result(tmp_path)
