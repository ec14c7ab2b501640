"""Precision comparison: pure measures on hand-made arrays, and detection run twice end to end."""

import numpy as np
import pytest

from analyses import precision as precision_script
from rh_lens import precision as P
from rh_lens.detect import DetectConfig, compute_detect
from rh_lens.models import load_model
from rh_lens.results import load_result
from tests.conftest import COPY_HAYSTACK as HAYSTACK
from tests.conftest import COPY_NEEDLE as NEEDLE

SWEEP = DetectConfig(lengths=(80, 150), depths=(0.0, 100.0), buffer=30, max_new_tokens=5)

# ------------------------------------------------------------------------------ pure measures


def test_position_tables_differing_in_three_entries():
    rng = np.random.default_rng(0)
    ref = [rng.integers(0, 50, size=(4, 2, 3)), rng.integers(0, 50, size=(2, 2, 3))]
    other = [a.copy() for a in ref]
    other[0][1, 0, 2] += 1
    other[0][3, 1, 0] += 7
    other[1][0, 1, 1] -= 1
    assert P.position_matches(ref, other) == (36 - 3, 36)
    assert P.position_agreement(ref, other) == pytest.approx(33 / 36)
    # only the first two steps of trial 0 and one of trial 1: one differing entry (trial 1)
    assert P.position_matches(ref, other, steps=[1, 1]) == (11, 12)


def test_positions_are_compared_over_the_steps_both_decoded():
    ref = [np.zeros((5, 1, 2), dtype=np.int32)]
    other = [np.zeros((3, 1, 2), dtype=np.int32)]
    other[0][2, 0, 0] = 9
    assert P.position_matches(ref, other) == (5, 6)
    assert np.isnan(P.position_agreement([], []))
    with pytest.raises(ValueError, match="2 reference trials but 1"):
        P.position_matches(ref * 2, other)
    with pytest.raises(ValueError, match="not of one model"):
        P.position_matches(ref, [np.zeros((3, 2, 2))])


def test_same_input_steps_end_at_the_first_differing_token():
    assert P.same_input_steps(np.array([1, 2, 3, 4]), np.array([1, 2, 9, 4])) == 3
    assert P.same_input_steps(np.array([5, 2]), np.array([1, 2])) == 1
    assert P.same_input_steps(np.array([1, 2, 3]), np.array([1, 2, 3])) == 3
    assert P.same_input_steps(np.array([1, 2]), np.array([1, 2, 3])) == 2


def test_token_agreement_counts_trials_with_equal_tokens():
    ref = [np.array([1, 2]), np.array([3]), np.array([4, 5])]
    other = [np.array([1, 2]), np.array([3, 0]), np.array([4, 5])]
    assert P.token_agreement(ref, other) == pytest.approx(2 / 3)
    assert np.isnan(P.token_agreement([], []))


def test_score_difference_of_known_tables():
    ref = np.zeros((2, 4))
    other = ref.copy()
    other[0, 1], other[1, 3] = 0.5, -0.25
    assert P.score_difference(ref, other) == (0.5, pytest.approx(0.75 / 8))
    assert P.score_difference(ref, ref) == (0.0, 0.0)
    assert all(np.isnan(P.score_difference(ref, np.full((2, 4), np.nan))))


def test_head_set_jaccard_of_known_tables():
    ref = np.array([[0.9, 0.5, 0.0], [0.0, 0.05, 0.3]])  # above 0.1: (0,0) (0,1) (1,2)
    other = np.array([[0.9, 0.0, 0.2], [0.0, 0.05, 0.3]])  # above 0.1: (0,0) (0,2) (1,2)
    assert P.retrieval_jaccard(ref, other, threshold=0.1) == pytest.approx(2 / 4)
    assert P.retrieval_jaccard(ref, other, threshold=0.95) == 1.0  # both empty
    assert P.topk_jaccard(ref, other, k=2) == pytest.approx(1 / 3)  # {00, 01} vs {00, 12}
    assert P.topk_jaccard(ref, other, k=100) == 1.0  # capped at all six heads
    assert np.isnan(P.topk_jaccard(ref, np.full((2, 3), np.nan), k=2))


def test_bad_dtype_lists_are_refused_naming_the_problem():
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        P.check_dtypes(["float32", "float8"])
    with pytest.raises(ValueError, match=r"repeat \['float32'\]"):
        P.check_dtypes(["float32", "bfloat16", "float32"])
    with pytest.raises(ValueError, match="at least one dtype"):
        P.check_dtypes([])
    assert P.check_dtypes(["float32", "float16"]) == ("float32", "float16")


# ------------------------------------------------------------------------------ end to end


def test_two_float32_runs_agree_fully(copy_inputs):
    runs = [compute_detect(load_model(copy_inputs / "model", dtype="float32"), [NEEDLE],
                           [HAYSTACK], SWEEP, progress=False) for _ in range(2)]
    row = P.compare_runs(runs[0], runs[1], dtype="float32")
    assert row.n_trials == 4 and row.n_success == 4 and row.compared_steps > 0
    assert row.position_agreement == 1.0 and row.same_input_agreement == 1.0
    assert row.token_agreement == 1.0
    assert (row.max_abs_score_diff, row.mean_abs_score_diff) == (0.0, 0.0)
    assert row.retrieval_jaccard == 1.0 and row.topk_jaccard == 1.0 and row.n_retrieval == 1


def test_compute_precision_compares_each_dtype_with_the_first(copy_inputs, tmp_path):
    loaded = []

    def load(dtype):
        loaded.append(dtype)
        return load_model(copy_inputs / "model", dtype=dtype)

    result = P.compute_precision(load, [NEEDLE], [HAYSTACK], SWEEP,
                                 dtypes=("float32", "bfloat16"), out_dir=tmp_path,
                                 progress=False)
    assert loaded == ["float32", "bfloat16"] and result.reference == "float32"
    ref, bf16 = result.rows
    assert ref.position_agreement == 1.0 and ref.max_abs_score_diff == 0.0
    # the copy head's margin survives bfloat16: the same answer, scores and head set
    assert bf16.token_agreement == 1.0 and bf16.n_success == 4
    expected = np.zeros((1, 4))
    expected[0, 1] = 1.0
    np.testing.assert_array_equal(result.scores, [expected, expected])
    assert bf16.retrieval_jaccard == 1.0
    assert 0.0 <= bf16.position_agreement <= 1.0
    assert sorted(p.name for p in (tmp_path / "sweeps").iterdir()) == ["bfloat16", "float32"]


def test_a_dtype_that_cannot_run_is_named(copy_inputs):
    def load(dtype):
        if dtype == "float16":
            raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'')
        return load_model(copy_inputs / "model", dtype=dtype)

    with pytest.raises(P.PrecisionError, match="detection in float16 failed: .*Half"):
        P.compute_precision(load, [NEEDLE], [HAYSTACK], SWEEP, dtypes=("float32", "float16"),
                            progress=False)
    with pytest.raises(ValueError, match="gave a float32 model when asked for bfloat16"):
        P.compute_precision(lambda d: load_model(copy_inputs / "model"), [NEEDLE], [HAYSTACK],
                            SWEEP, dtypes=("float32", "bfloat16"), progress=False)


def test_precision_script_writes_its_result_and_table(copy_inputs, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--model", str(copy_inputs / "model"), "--out", str(out), "--needles",
            str(copy_inputs / "needles.jsonl"), "--haystack", str(copy_inputs / "hay"),
            "--lengths", "80", "150", "--depths", "0", "100", "--buffer", "30",
            "--max-new-tokens", "5", "--quiet", "--dtypes", "float32", "float16"]
    assert precision_script.main(args) == 0
    printed = capsys.readouterr().out
    rows = [line.split() for line in printed.splitlines() if line.startswith("float")]
    assert [r[0] for r in rows] == ["float32", "float16"]
    assert rows[0][1:4] == ["4/4", "1.0000", "1.0000"]
    saved = load_result(out)
    assert saved.kind == "precision" and saved.config["dtypes"] == ["float32", "float16"]
    assert saved.meta["model_spec"] == str(copy_inputs / "model") and saved.meta["argv"]
    assert saved.summary["rows"][0]["token_agreement"] == 1.0
    assert saved.arrays["scores"].shape == (2, 1, 4)
    assert (out / "precision.html").is_file()


def test_precision_script_refuses_an_unknown_dtype(capsys):
    assert precision_script.main(["--dtypes", "float32", "int8"]) == 2
    assert "unknown dtype 'int8'" in capsys.readouterr().err
