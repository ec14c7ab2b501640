"""Head files of other methods: round trips, known contents, and clear errors."""

import numpy as np
import pytest

from rh_lens.headfiles import (
    head_set_table,
    read_duo_tsv,
    read_qrhead_yaml,
    write_duo_tsv,
    write_qrhead_yaml,
)
from rh_lens.properties import load_head_scores
from rh_lens.results import ResultFileError, export_reference_json

pytestmark = pytest.mark.tl4


def test_duo_tsv_reads_rows_per_layer_and_round_trips(tmp_path):
    path = tmp_path / "full_attention_heads.tsv"
    path.write_text("1.0\t0.0\t0.25\n0.5\t1\t0\n")
    want = np.array([[1.0, 0.0, 0.25], [0.5, 1.0, 0.0]])
    np.testing.assert_array_equal(read_duo_tsv(path), want)
    table = np.random.default_rng(0).random((3, 4))
    write_duo_tsv(tmp_path / "out.tsv", table)
    np.testing.assert_array_equal(read_duo_tsv(tmp_path / "out.tsv"), table)


@pytest.mark.parametrize("text, message", [
    ("1\t0\n1\n", "layer 1 has 1 heads, layer 0 has 2"),
    ("1\tx\n", "'x' is not a number"),
    ("1\t1.5\n", "outside \\[0, 1\\]"),
    ("\n", "empty"),
])
def test_malformed_duo_tsv_is_refused(tmp_path, text, message):
    path = tmp_path / "bad.tsv"
    path.write_text(text)
    with pytest.raises(ResultFileError, match=message):
        read_duo_tsv(path)


def test_qrhead_yaml_reads_heads_and_round_trips(tmp_path):
    path = tmp_path / "heads.yaml"
    path.write_text('model: x\nattn_head_set: "16-19,11-15, 8-26"  # top 3\n')
    assert read_qrhead_yaml(path) == ((16, 19), (11, 15), (8, 26))
    write_qrhead_yaml(tmp_path / "out.yaml", [(1, 2), (0, 3)])
    assert read_qrhead_yaml(tmp_path / "out.yaml", n_layers=2, n_heads=4) == ((1, 2), (0, 3))
    table = head_set_table([(1, 2), (0, 3)], n_layers=2, n_heads=4)
    assert table.sum() == 2 and table[1, 2] == 1 and table[0, 3] == 1


@pytest.mark.parametrize("text, message", [
    ('attn_head_set: "1-2,3.4"\n', "bad head '3.4'"),
    ("other: 1\n", "expected one line attn_head_set"),
    ('attn_head_set: "1-2,5-0"\n', "unknown head: layer 5"),
])
def test_malformed_qrhead_yaml_is_refused(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ResultFileError, match=message):
        read_qrhead_yaml(path, n_layers=2, n_heads=4)


def test_properties_compares_a_mix_of_formats(tmp_path, capsys):
    from analyses import properties

    trials = np.zeros((2, 2, 4))
    trials[:, 1, 2], trials[:, 0, 3] = 0.9, 0.5
    export_reference_json(tmp_path / "ref.json", trials)
    write_duo_tsv(tmp_path / "duo.tsv", trials[0] / 0.9 * (trials[0] <= 0.9))
    write_qrhead_yaml(tmp_path / "qr.yaml", [(1, 2), (0, 3)])
    with pytest.raises(ValueError, match="needs the model's shape"):
        load_head_scores(tmp_path / "qr.yaml")
    qr = load_head_scores(tmp_path / "qr.yaml", shape=(2, 4))
    np.testing.assert_array_equal(qr.mean, head_set_table([(1, 2), (0, 3)], n_layers=2,
                                                          n_heads=4))
    out = tmp_path / "props"
    assert properties.main(["--scores", str(tmp_path / "ref.json"), str(tmp_path / "duo.tsv"),
                            str(tmp_path / "qr.yaml"), "--out", str(out)]) == 0
    lines = {tuple(line.split()[:2]): line.split() for line in capsys.readouterr().out
             .splitlines() if line.split()[:1] in (["ref"], ["duo"])}
    # duo is ref scaled (Pearson 1); all three name the same two heads above 0.1 (Jaccard 1)
    assert lines[("ref", "duo")][2] == "1.000"
    assert all(lines[pair][-1] == "1.00" for pair in [("ref", "duo"), ("ref", "qr"),
                                                       ("duo", "qr")])
