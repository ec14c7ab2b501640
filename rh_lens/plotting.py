"""Plotly figures with one set of defaults; every function returns a ``go.Figure``.

Per-head tables are drawn with layers on y (layer 0 at the top, as in an image of the
``[n_layers, n_heads]`` array) and heads on x, hover ``L{layer}H{head}: value``.  Scores use a
sequential 0..1 scale (``zmax`` raises the top, e.g. for step scores above 1); effects use a
diverging scale centred on 0.  Nothing here calls ``.show()``: notebooks end a cell with the
figure, scripts call :func:`save_figure`.
"""

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from jaxtyping import Float, Int, Real
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from rh_lens.results import atomic_open

SEQUENTIAL = "Viridis"
DIVERGING = "RdBu_r"
# The red -> yellow -> green of Needle-in-a-Haystack plots (gkamradt's LLMTest_NeedleInAHaystack).
NIAH_SCALE = [[0.0, "#F0496E"], [0.5, "#EBB839"], [1.0, "#0CD79F"]]
HEAD_HOVER = "L%{y}H%{x}: %{z:.3f}<extra></extra>"
PLOTLY_JS = "plotly.min.js"


def _as_table(table: np.ndarray, name: str = "table") -> np.ndarray:
    table = np.asarray(table, dtype=np.float64)
    if table.ndim != 2 or 0 in table.shape:
        raise ValueError(f"{name} must be a non-empty [n_layers, n_heads] array, got {table.shape}")
    return table


def _colour_range(
    tables: Sequence[np.ndarray], *, zmin: float, zmax: float | None, diverging: bool
) -> dict:
    """Heatmap colour settings shared by one or several tables."""
    if diverging:
        if zmin != 0.0:
            raise ValueError("a diverging scale is symmetric about 0: set zmax only, not zmin")
        if zmax is None:
            finite = [np.abs(t[np.isfinite(t)]) for t in tables]
            zmax = max((float(f.max()) for f in finite if f.size), default=0.0) or 1.0
        return dict(colorscale=DIVERGING, zmin=-zmax, zmax=zmax, zmid=0.0)
    zmax = 1.0 if zmax is None else zmax
    if not zmax > zmin:
        raise ValueError(f"zmax ({zmax}) must be larger than zmin ({zmin})")
    return dict(colorscale=SEQUENTIAL, zmin=zmin, zmax=zmax)


def _head_axes(fig: go.Figure, **subplot) -> None:
    fig.update_xaxes(title_text="head", **subplot)
    fig.update_yaxes(title_text="layer", autorange="reversed", **subplot)


def plot_head_heatmap(
    table: Float[np.ndarray, "n_layers n_heads"],
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


def plot_top_heads(
    table: Float[np.ndarray, "n_layers n_heads"],
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
    labels = [f"L{i // n_heads}H{i % n_heads}" for i in order]
    fig = go.Figure(go.Bar(
        x=flat[order], y=labels, orientation="h", hovertemplate="%{y}: %{x:.3f}<extra></extra>",
    ))
    fig.update_xaxes(title_text=xaxis_title)
    fig.update_yaxes(title_text="head", type="category", autorange="reversed")
    fig.update_layout(title=dict(text=title), height=max(300, 22 * len(order) + 140), width=560)
    return fig


def save_figure(fig: go.Figure, path: str | Path) -> Path:
    """Write ``fig`` as offline HTML that loads ``plotly.min.js`` from the same folder.

    The script is written beside the HTML when it is missing or differs in size from the
    installed plotly's bundle (a truncated copy would render blank), so a folder of figures
    shares one copy.  Both files are written atomically.  Returns the path.
    """
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"{path}: figures are saved as .html")
    path.parent.mkdir(parents=True, exist_ok=True)
    html = fig.to_html(include_plotlyjs="directory", full_html=True)
    if f'src="{PLOTLY_JS}"' not in html:  # plotly changed how "directory" references the script
        raise RuntimeError(f"plotly's HTML does not reference {PLOTLY_JS}; cannot save offline")
    with atomic_open(path, "w") as f:
        f.write(html)
    js_path = path.parent / PLOTLY_JS
    bundle = get_plotlyjs().encode("utf-8")
    if not js_path.is_file() or os.path.getsize(js_path) != len(bundle):
        with atomic_open(js_path, "wb") as f:
            f.write(bundle)
    return path
