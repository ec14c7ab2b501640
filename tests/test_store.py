"""The sweep store: identity, atomic records, resume, shards, merge."""

import json

import numpy as np
import pytest

from rh_lens.errors import RhLensError
from rh_lens.store import StoreError, SweepStore, merge, read_record, shard

pytestmark = pytest.mark.tl4

IDENTITY = {"config": {"lengths": [64, 128], "depths": [0.0, 50.0]}, "model": "tiny"}


def test_a_record_reads_back_as_written(tmp_path):
    store = SweepStore.open(tmp_path / "s", IDENTITY)
    arrays = {"scores": np.arange(6.0).reshape(2, 3), "tokens": np.array([5, 7], np.int32)}
    store.write("cell-a", {"answer": "jar", "n": 3}, arrays)
    store.write("cell-b", {"answer": "cart"})
    assert list(store.finished()) == ["cell-a"]  # cell-b has no arrays
    assert list(store.finished(with_arrays=False)) == ["cell-a", "cell-b"]
    record = store.read("cell-a")
    assert record.key == "cell-a" and record.fields == {"answer": "jar", "n": 3}
    for name, value in arrays.items():
        np.testing.assert_array_equal(record.arrays[name], value)
        assert record.arrays[name].dtype == value.dtype
    assert store.read("cell-b", arrays=False).fields == {"answer": "cart"}
    assert not list((tmp_path / "s").rglob("*.tmp"))


def test_reopening_with_the_same_identity_resumes_and_another_is_refused(tmp_path):
    root = tmp_path / "s"
    SweepStore.open(root, IDENTITY).write("c", {"x": 1}, {"a": np.zeros(2)})
    again = SweepStore.open(root, json.loads(json.dumps(IDENTITY)))  # tuples vs lists alike
    assert list(again.finished()) == ["c"]
    other = {**IDENTITY, "model": "other"}
    with pytest.raises(StoreError, match="different sweep.*model"):
        SweepStore.open(root, other)
    assert isinstance(StoreError("x"), RhLensError)
    again.sub("top-2", {"heads": [[1, 2]]}, identity_file="condition.json").write("c", {"x": 2})
    with pytest.raises(StoreError, match="head set named 'top-2'"):
        again.sub("top-2", {"heads": [[1, 3]]}, identity_file="condition.json")


def test_records_of_the_earlier_formats_still_read(tmp_path):
    folder = tmp_path / "cells"
    folder.mkdir()
    for key, marker in (("old-detect", "cell_format"), ("old-cot", "format"),
                        ("old-ablation", "record_format")):
        (folder / f"{key}.json").write_text(json.dumps({marker: 1, "answer": key}))
        assert read_record(folder / f"{key}.json", arrays=False).fields == {"answer": key}
    (folder / "future.json").write_text(json.dumps({"record_format": 2}))
    with pytest.raises(StoreError, match="future.json: unknown record format 2"):
        read_record(folder / "future.json", arrays=False)


def test_a_damaged_record_is_named(tmp_path):
    store = SweepStore.open(tmp_path / "s", IDENTITY)
    store.write("c", {"x": 1}, {"a": np.zeros(4)})
    npz = tmp_path / "s" / "cells" / "c.npz"
    npz.write_bytes(npz.read_bytes()[:20])  # truncated
    with pytest.raises(StoreError, match="c.npz: cannot read"):
        store.read("c")
    (tmp_path / "s" / "cells" / "c.json").write_text("{not json")
    with pytest.raises(RhLensError, match="c.json"):
        store.read("c")


def test_shards_cover_every_item_once():
    items = list(range(11))
    parts = [shard(items, i, 3) for i in range(3)]
    assert sorted(x for part in parts for x in part) == items
    assert parts[1] == [1, 4, 7, 10]
    for index, count in ((3, 3), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match="shard"):
            shard(items, index, count)


def test_merge_joins_shards_of_one_sweep_and_refuses_others(tmp_path):
    a, b = SweepStore.open(tmp_path / "a", IDENTITY), SweepStore.open(tmp_path / "b", IDENTITY)
    a.write("c1", {"x": 1}, {"v": np.ones(1)})
    b.write("c2", {"x": 2}, {"v": np.ones(1)})
    b.write("c1", {"x": 99}, {"v": np.ones(1)})  # in both: the first shard's is taken
    identity, found = merge([tmp_path / "a", tmp_path / "b"])
    assert identity == IDENTITY
    assert sorted(found) == ["c1", "c2"]
    assert read_record(found["c1"]).fields == {"x": 1}
    SweepStore.open(tmp_path / "c", {**IDENTITY, "model": "other"})
    with pytest.raises(StoreError, match="different sweep"):
        merge([tmp_path / "a", tmp_path / "c"])
    with pytest.raises(StoreError, match="not a sweep directory"):
        merge([tmp_path / "a", tmp_path / "nothing"])
    with pytest.raises(StoreError, match="nothing to merge"):
        merge([])


def test_an_identity_without_cells_is_replaced(tmp_path):
    """A sweep refused before its first cell does not block the corrected one."""
    SweepStore.open(tmp_path / "s", IDENTITY)
    other = {**IDENTITY, "model": "other"}
    assert SweepStore.open(tmp_path / "s", other).identity() == other
