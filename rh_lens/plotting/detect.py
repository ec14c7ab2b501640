"""Figures of a detection run: per-head score heatmaps, the NIAH grid, the top heads, and where
each head looks while an answer is decoded."""

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from jaxtyping import Float, Int, Real
from plotly.subplots import make_subplots

from rh_lens.heads import HeadLike, label
from rh_lens.plotting._style import HEAD_HOVER, NIAH_SCALE, _as_table, _colour_range, _head_axes
from rh_lens.types import HeadTable


def plot_head_heatmap(
    table: HeadTable,
    *,
    title: str,
    zmin: float = 0.0,
    zmax: float | None = None,
    diverging: bool = False,
    colorbar_title: str = "score",
) -> go.Figure:
    """One per-head table as a heatmap (layers on y, heads on x).

    Sequential scale ``zmin..zmax`` (``zmax`` defaults to 1) for scores; ``diverging=True`` for
    signed effects: symmetric about 0, ``±zmax`` (default the largest absolute value).
    """
    table = _as_table(table)
    n_layers, n_heads = table.shape
    colours = _colour_range([table], zmin=zmin, zmax=zmax, diverging=diverging)
    fig = go.Figure(go.Heatmap(
        z=table, x=np.arange(n_heads), y=np.arange(n_layers), hovertemplate=HEAD_HOVER,
        colorbar=dict(title=dict(text=colorbar_title)), **colours,
    ))
    _head_axes(fig)
    fig.update_layout(title=dict(text=title), width=max(420, 16 * n_heads + 220),
                      height=max(360, 14 * n_layers + 160))
    return fig


def plot_head_heatmaps(
    tables: dict[str, Float[np.ndarray, "_n_layers _n_heads"]],
    *,
    title: str,
    zmin: float = 0.0,
    zmax: float | None = None,
    diverging: bool = False,
    colorbar_title: str = "score",
) -> go.Figure:
    """Several per-head tables side by side, one shared colour scale; shapes may differ."""
    if not tables:
        raise ValueError("no tables to plot")
    named = {name: _as_table(t, name=f"table {name!r}") for name, t in tables.items()}
    colours = _colour_range(list(named.values()), zmin=zmin, zmax=zmax, diverging=diverging)
    colorscale = colours.pop("colorscale")  # a diverging range is already symmetric about 0
    fig = make_subplots(rows=1, cols=len(named), subplot_titles=list(named),
                        horizontal_spacing=0.06)
    for col, table in enumerate(named.values(), start=1):
        n_layers, n_heads = table.shape
        fig.add_trace(go.Heatmap(
            z=table, x=np.arange(n_heads), y=np.arange(n_layers), coloraxis="coloraxis",
            hovertemplate=HEAD_HOVER,
        ), row=1, col=col)
        _head_axes(fig, row=1, col=col)
    fig.update_layout(
        title=dict(text=title), width=max(480, 380 * len(named) + 120), height=460,
        coloraxis=dict(colorscale=colorscale, cmin=colours["zmin"], cmax=colours["zmax"],
                       colorbar=dict(title=dict(text=colorbar_title))),
    )
    return fig


def _labels(values: Sequence[int | float] | Real[np.ndarray, " n"]) -> list[str]:
    """Category labels for axis values: short when that keeps them distinct."""
    short = [f"{float(v):.4g}" for v in values]
    return short if len(set(short)) == len(short) else [repr(float(v)) for v in values]


def plot_niah_grid(
    values: Float[np.ndarray, "n_depths n_lengths"],
    *,
    depths: Sequence[int | float] | Real[np.ndarray, " n_depths"],
    lengths: Sequence[int] | Int[np.ndarray, " n_lengths"],
    title: str,
    colorbar_title: str = "ROUGE-1 recall",
) -> go.Figure:
    """A Needle-in-a-Haystack grid: needle depth (%) on y, 0 at the top; context length on x.

    Red (0) to green (1); cells without a trial (NaN) stay blank.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape != (len(depths), len(lengths)):
        raise ValueError(
            f"values must be [n_depths={len(depths)}, n_lengths={len(lengths)}], "
            f"got {values.shape}"
        )
    fig = go.Figure(go.Heatmap(
        z=values, x=[str(int(n)) for n in lengths], y=_labels(depths),
        colorscale=NIAH_SCALE, zmin=0.0, zmax=1.0,
        colorbar=dict(title=dict(text=colorbar_title)),
        hovertemplate="depth %{y}%, length %{x}: %{z:.2f}<extra></extra>",
    ))
    fig.update_xaxes(title_text="context length (tokens)", type="category")
    fig.update_yaxes(title_text="needle depth (%)", type="category", autorange="reversed")
    fig.update_layout(title=dict(text=title), width=max(480, 36 * len(lengths) + 240),
                      height=max(360, 30 * len(depths) + 160))
    return fig


STEP_SCALE = [[0.0, "#eeeeee"], [0.33, "#eeeeee"], [0.34, "#9ecae1"], [0.66, "#9ecae1"],
              [0.67, "#08519c"], [1.0, "#08519c"]]


def plot_decode_steps(
    positions: Int[np.ndarray, "step n_layers n_heads"],
    sequence: Int[np.ndarray, " pos"],
    span: tuple[int, int],
    *,
    token_text: Sequence[str],
    heads: Sequence[HeadLike] | None = None,
    title: str = "Where each head looks while the answer is generated",
) -> go.Figure:
    """Per decode step (y, labelled with the emitted token) and head (x): dark where the head's
    top-1 key is in the answer span and holds the emitted token (it copies), light where it is in
    the answer span but holds another token, grey elsewhere; hover gives the key position and
    its token.  ``sequence`` is prompt + generated tokens, ``token_text[i]`` the text of
    ``sequence[i]``; ``heads`` limits the columns (default: every head)."""
    positions = np.asarray(positions)
    sequence = np.asarray(sequence)
    if positions.ndim != 3:
        raise ValueError(f"positions must be [step, n_layers, n_heads], got {positions.shape}")
    n_steps, n_layers, n_heads = positions.shape
    n_prompt = len(sequence) - n_steps
    if n_prompt < 1 or len(token_text) != len(sequence):
        raise ValueError("sequence must hold the prompt and every generated token, and "
                         "token_text one string per token of it")
    heads = [(lay, h) for lay in range(n_layers) for h in range(n_heads)] if heads is None \
        else list(heads)
    cols = np.array([positions[:, lay, h] for lay, h in heads]).T  # [step, n_cols]
    emitted = sequence[n_prompt:]
    in_span = (cols >= span[0]) & (cols < span[1])
    copies = in_span & (sequence[cols] == emitted[:, None])
    z = np.where(copies, 2, np.where(in_span, 1, 0))
    text = [[f"key {p}: {token_text[p]!r}" for p in row] for row in cols]
    steps = [f"{t}: {token_text[n_prompt + t]!r}" for t in range(n_steps)]
    fig = go.Figure(go.Heatmap(
        z=z, x=[label(h) for h in heads], y=steps, text=text, zmin=0, zmax=2,
        colorscale=STEP_SCALE, colorbar=dict(tickvals=[0, 1, 2], ticktext=[
            "elsewhere", "answer span", "copies"]),
        hovertemplate="%{x}, step %{y}<br>%{text}<extra></extra>",
    ))
    fig.update_xaxes(title_text="head", type="category")
    fig.update_yaxes(title_text="decode step: emitted token", type="category",
                     autorange="reversed")
    fig.update_layout(title=dict(text=title), width=max(520, 14 * len(heads) + 260),
                      height=max(320, 24 * n_steps + 160))
    return fig


def plot_top_heads(
    table: HeadTable,
    *,
    k: int = 20,
    title: str,
    xaxis_title: str = "score",
) -> go.Figure:
    """Horizontal bars of the ``k`` highest heads (NaN skipped), highest at the top.

    Ties keep layer-major order; fewer than ``k`` bars when fewer heads have a value.
    """
    table = _as_table(table)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    flat = table.ravel()
    order = [i for i in np.argsort(-flat, kind="stable") if np.isfinite(flat[i])][:k]
    n_heads = table.shape[1]
    labels = [label(divmod(int(i), n_heads)) for i in order]
    fig = go.Figure(go.Bar(
        x=flat[order], y=labels, orientation="h", hovertemplate="%{y}: %{x:.3f}<extra></extra>",
    ))
    fig.update_xaxes(title_text=xaxis_title)
    fig.update_yaxes(title_text="head", type="category", autorange="reversed")
    fig.update_layout(title=dict(text=title), height=max(300, 22 * len(order) + 140), width=560)
    return fig
