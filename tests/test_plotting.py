"""rh_lens.plotting: figure data, orientation and offline HTML."""

import re

import numpy as np
import plotly.graph_objects as go
import pytest

from rh_lens.plotting import (
    plot_head_heatmap,
    plot_head_heatmaps,
    plot_niah_grid,
    plot_top_heads,
    save_figure,
)

pytestmark = pytest.mark.tl4

# 3 layers x 5 heads: not square, so a transposed table cannot pass.
TABLE = np.arange(15, dtype=np.float64).reshape(3, 5) / 15


def colours(scale) -> list[str]:
    return [c for _, c in scale]


def test_head_heatmap_orientation_and_defaults():
    fig = plot_head_heatmap(TABLE, title="scores")
    assert isinstance(fig, go.Figure) and len(fig.data) == 1
    trace = fig.data[0]
    assert trace.type == "heatmap"
    assert np.array_equal(np.asarray(trace.z), TABLE)
    assert list(trace.y) == [0, 1, 2] and list(trace.x) == [0, 1, 2, 3, 4]
    assert trace.hovertemplate.startswith("L%{y}H%{x}: %{z:.3f}")
    assert (trace.zmin, trace.zmax) == (0.0, 1.0)
    assert fig.layout.yaxis.title.text == "layer" and fig.layout.xaxis.title.text == "head"
    assert fig.layout.yaxis.autorange == "reversed"  # layer 0 at the top
    assert fig.layout.title.text == "scores"
    assert trace.colorbar.title.text == "score"


def test_head_heatmap_zmax_and_diverging():
    assert plot_head_heatmap(TABLE, title="t", zmax=1.5).data[0].zmax == 1.5
    effects = TABLE - 0.5
    trace = plot_head_heatmap(effects, title="e", diverging=True,
                              colorbar_title="Δ logit").data[0]
    assert trace.zmid == 0.0
    assert trace.zmax == pytest.approx(np.abs(effects).max()) and trace.zmin == -trace.zmax
    assert trace.colorbar.title.text == "Δ logit"
    sequential = plot_head_heatmap(TABLE, title="s").data[0]
    assert colours(trace.colorscale) != colours(sequential.colorscale)
    assert plot_head_heatmap(effects, title="e", diverging=True, zmax=2.0).data[0].zmin == -2.0
    with pytest.raises(ValueError, match="symmetric about 0"):
        plot_head_heatmap(effects, title="e", diverging=True, zmin=-1.0)
    with pytest.raises(ValueError, match="must be larger than zmin"):
        plot_head_heatmap(TABLE, title="t", zmin=1.0, zmax=0.5)


def test_head_heatmaps_side_by_side_share_scale():
    tables = {"small": TABLE, "big": np.full((4, 8), 0.25)}
    fig = plot_head_heatmaps(tables, title="two models", zmax=1.2)
    assert len(fig.data) == 2
    assert [a.text for a in fig.layout.annotations] == ["small", "big"]
    for trace, table in zip(fig.data, tables.values(), strict=True):
        assert np.array_equal(np.asarray(trace.z), table)
        assert list(trace.y) == list(range(table.shape[0]))
        assert list(trace.x) == list(range(table.shape[1]))
        assert trace.coloraxis == "coloraxis"
    assert (fig.layout.coloraxis.cmin, fig.layout.coloraxis.cmax) == (0.0, 1.2)
    assert fig.data[0].xaxis != fig.data[1].xaxis  # separate subplots
    assert fig.layout.yaxis.autorange == fig.layout.yaxis2.autorange == "reversed"
    with pytest.raises(ValueError, match="no tables"):
        plot_head_heatmaps({}, title="none")


def test_niah_grid():
    values = np.array([[1.0, 0.5, 0.0, np.nan], [1.0, 1.0, 0.9, 0.2], [0.0, 0.1, 0.2, 0.3]])
    depths = np.linspace(0, 100, 3)
    fig = plot_niah_grid(values, depths=depths, lengths=[1000, 2000, 4000, 8000], title="niah")
    trace = fig.data[0]
    assert np.array_equal(np.asarray(trace.z), values, equal_nan=True)
    assert list(trace.y) == ["0", "50", "100"]
    assert list(trace.x) == ["1000", "2000", "4000", "8000"]
    assert (trace.zmin, trace.zmax) == (0.0, 1.0)
    assert colours(trace.colorscale)[0] == "#F0496E" and colours(trace.colorscale)[-1] == "#0CD79F"
    assert trace.colorbar.title.text == "ROUGE-1 recall"
    assert fig.layout.yaxis.autorange == "reversed"  # depth 0 at the top
    assert "depth" in fig.layout.yaxis.title.text and "length" in fig.layout.xaxis.title.text
    with pytest.raises(ValueError, match="n_depths=2, n_lengths=4"):
        plot_niah_grid(values, depths=[0, 100], lengths=[1, 2, 3, 4], title="bad")


def test_top_heads_known_top3():
    table = np.zeros((4, 5))
    table[2, 3], table[0, 1], table[3, 0], table[1, 4] = 0.9, 0.8, 0.7, np.nan
    fig = plot_top_heads(table, k=3, title="top")
    trace = fig.data[0]
    assert trace.type == "bar" and trace.orientation == "h"
    assert list(trace.y) == ["L2H3", "L0H1", "L3H0"]
    np.testing.assert_array_equal(trace.x, [0.9, 0.8, 0.7])
    assert fig.layout.yaxis.autorange == "reversed"  # first (highest) bar at the top
    everything = plot_top_heads(table, k=100, title="all").data[0]
    assert len(everything.y) == 19 and "L1H4" not in everything.y  # NaN skipped
    assert list(everything.x) == sorted(everything.x, reverse=True)
    assert list(everything.y[3:6]) == ["L0H0", "L0H2", "L0H3"]  # ties in layer-major order
    with pytest.raises(ValueError, match="k must be >= 1"):
        plot_top_heads(table, k=0, title="none")


def test_save_figure_offline_html(tmp_path):
    fig = plot_head_heatmap(TABLE, title="saved")
    path = save_figure(fig, tmp_path / "figs" / "a.html")
    assert path == tmp_path / "figs" / "a.html" and path.is_file()
    html = path.read_text()
    src = re.findall(r'<script[^>]*src="([^"]+)"', html)
    assert src == ["plotly.min.js"]  # local, not a CDN
    js = path.parent / "plotly.min.js"
    assert js.is_file() and js.stat().st_size > 1_000_000
    assert len(html) < 200_000  # the library is not embedded
    assert "saved" in html
    size = js.stat().st_size
    js.write_text("")  # a truncated copy is replaced
    save_figure(plot_top_heads(TABLE, title="b"), path.parent / "b.html")
    assert js.stat().st_size == size
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.html", "b.html", "plotly.min.js"]
    with pytest.raises(ValueError, match=r"\.html"):
        save_figure(fig, tmp_path / "a.png")


def test_a_figure_moved_without_its_script_says_so_and_a_self_contained_one_needs_none(tmp_path):
    fig = plot_head_heatmap(TABLE, title="moved")
    shared = save_figure(fig, tmp_path / "shared" / "a.html").read_text()
    notice = shared[shared.rindex("<script>"):shared.rindex("</body>")]
    assert 'typeof Plotly === "undefined"' in notice and "plotly.min.js in its folder" in notice
    alone = save_figure(fig, tmp_path / "alone" / "a.html", self_contained=True)
    assert sorted(p.name for p in alone.parent.iterdir()) == ["a.html"]
    html = alone.read_text()
    assert not re.findall(r'<script[^>]*src="([^"]+)"', html)  # nothing loaded from elsewhere
    assert len(html) > 1_000_000 and "moved" in html


def test_decode_steps_marks_copies_span_hits_and_elsewhere():
    from rh_lens.plotting import plot_decode_steps

    sequence = np.array([0, 5, 6, 7, 9, 5, 6])  # prompt of 5 (answer span [1, 3)), then 5, 6
    positions = np.zeros((2, 1, 3), dtype=np.int64)
    positions[:, 0, 0] = [1, 2]  # copies both answer tokens
    positions[:, 0, 1] = [2, 1]  # in the span, the other token
    positions[:, 0, 2] = [4, 0]  # elsewhere
    fig = plot_decode_steps(positions, sequence, (1, 3),
                            token_text=[f"t{i}" for i in sequence])
    np.testing.assert_array_equal(np.array(fig.data[0].z), [[2, 1, 0], [2, 1, 0]])
    assert list(fig.data[0].x) == ["L0H0", "L0H1", "L0H2"]
    assert fig.data[0].y[1] == "1: 't6'" and fig.data[0].text[0][2] == "key 4: 't9'"
    only = plot_decode_steps(positions, sequence, (1, 3), token_text=["x"] * 7, heads=[(0, 2)])
    np.testing.assert_array_equal(np.array(only.data[0].z), [[0], [0]])
    with pytest.raises(ValueError, match="token_text"):
        plot_decode_steps(positions, sequence, (1, 3), token_text=["x"])
