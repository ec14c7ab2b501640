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
from typing import Literal

import numpy as np
import plotly.graph_objects as go
from jaxtyping import Float, Int, Real
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from rh_lens.ablation import ERROR_TYPES, PLACES, AblationResult
from rh_lens.ablation.result import _nanmean
from rh_lens.cot import CotResult
from rh_lens.heads import THRESHOLD, HeadLike, label
from rh_lens.patching import ActivationPatchingResult, PathPatchingResult
from rh_lens.properties import (
    FACTORS,
    ActivationResult,
    CorrelationMatrix,
    GroupResult,
    IntrinsicResult,
    SparsityResult,
    SwitchOnResult,
    UniversalityResult,
)
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
        z=z, x=[f"L{lay}H{h}" for lay, h in heads], y=steps, text=text, zmin=0, zmax=2,
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


# --------------------------------------------------------------------------------------------
# Property figures (results of rh_lens.properties)


def plot_sparsity(results: dict[str, SparsityResult]) -> go.Figure:
    """Score-bin shares (%) per model as grouped bars."""
    fig = go.Figure([go.Bar(name=name, x=list(r.bin_labels), y=[100 * s for s in r.bins.values()],
                            hovertemplate=f"{name} %{{x}}: %{{y:.1f}}%<extra></extra>")
                     for name, r in results.items()])
    fig.update_layout(title=dict(text="Retrieval-score bins (share of heads)"), barmode="group",
                      xaxis_title="mean retrieval score", yaxis_title="% of heads")
    return fig


def plot_layer_profile(results: dict[str, SparsityResult]) -> go.Figure:
    """Retrieval heads per layer, one line per model."""
    fig = go.Figure([go.Scatter(x=np.arange(r.per_layer.size), y=r.per_layer, name=name,
                                mode="lines+markers",
                                hovertemplate=f"{name} L%{{x}}: %{{y}} heads<extra></extra>")
                     for name, r in results.items()])
    fig.update_layout(title=dict(text="Where retrieval heads sit (score > threshold)"),
                      xaxis_title="layer", yaxis_title="retrieval heads")
    return fig


def plot_activation(results: dict[str, ActivationResult]) -> go.Figure:
    """The paper's score-vs-activation-frequency plot, one trace per model."""
    fig = go.Figure()
    for name, r in results.items():
        n_layers, n_heads = r.mean.shape
        layer, head = np.divmod(np.arange(r.mean.size), n_heads)
        fig.add_trace(go.Scatter(
            x=r.mean.ravel(), y=r.frequency.ravel(), mode="markers", name=name,
            customdata=np.stack([layer, head], axis=1), marker=dict(size=5, opacity=0.6),
            hovertemplate=f"{name} L%{{customdata[0]}}H%{{customdata[1]}}: score %{{x:.3f}}, "
                          "active %{y:.3f}<extra></extra>"))
    fig.add_vline(x=next(iter(results.values())).threshold if results else THRESHOLD,
                  line_dash="dot")
    fig.update_layout(title=dict(text="Retrieval score vs activation frequency"),
                      xaxis_title="mean retrieval score",
                      yaxis_title="activation frequency (share of successful trials)")
    return fig


def plot_switch_on(result: SwitchOnResult, *, title: str = "What switches heads on") -> go.Figure:
    """Activation rate of each head (rows) by needle, length and depth (columns)."""
    columns = [f"{f} {v:g}" for f, vals in zip(FACTORS, result.values, strict=True) for v in vals]
    z = np.concatenate(result.rates, axis=1) if result.heads else np.zeros((0, len(columns)))
    fig = go.Figure(go.Heatmap(
        z=z, x=columns, y=[label(h) for h in result.heads], colorscale=SEQUENTIAL,
        zmin=0.0, zmax=1.0, colorbar=dict(title=dict(text="activation rate")),
        hovertemplate="%{y} at %{x}: %{z:.2f}<extra></extra>"))
    fig.update_xaxes(title_text="context", type="category")
    fig.update_yaxes(title_text="head", type="category", autorange="reversed")
    fig.update_layout(title=dict(text=title), width=max(520, 26 * len(columns) + 240),
                      height=max(320, 24 * len(result.heads) + 200))
    return fig


def plot_switch_on_grid(result: SwitchOnResult, head: HeadLike, *, title: str = "") -> go.Figure:
    """One head's activation rate per (depth, length), over needles."""
    head = (int(head[0]), int(head[1]))
    if head not in result.heads:
        raise ValueError(f"{label(head)} is not among the analysed heads")
    return plot_niah_grid(
        result.grid[result.heads.index(head)], depths=list(result.values[2]),
        lengths=[int(v) for v in result.values[1]], colorbar_title="activation rate",
        title=title or f"{label(head)}: activation rate by depth and length")


def plot_universality(result: UniversalityResult) -> go.Figure:
    """Every model's score table side by side (shapes may differ)."""
    top = max(1.0, max(float(m.mean.max()) for m in result.models))
    return plot_head_heatmaps({m.name: m.mean for m in result.models},
                                       title="Retrieval scores per head", zmax=top)


def plot_intrinsic(result: IntrinsicResult) -> go.Figure:
    """Scatter of per-head scores, model a on x and model b on y, with the diagonal."""
    a, b = result.names
    n_heads = result.a.shape[1]
    layer, head = np.divmod(np.arange(result.a.size), n_heads)
    top = max(1.0, float(result.a.max()), float(result.b.max()))
    fig = go.Figure([
        go.Scatter(x=[0, top], y=[0, top], mode="lines", line=dict(dash="dot", color="grey"),
                   showlegend=False, hoverinfo="skip"),
        go.Scatter(x=result.a.ravel(), y=result.b.ravel(), mode="markers", showlegend=False,
                   customdata=np.stack([layer, head], axis=1), marker=dict(size=5, opacity=0.6),
                   hovertemplate="L%{customdata[0]}H%{customdata[1]}: %{x:.3f} vs "
                                 "%{y:.3f}<extra></extra>"),
    ])
    fig.update_layout(title=dict(text=f"{a} vs {b}: Pearson {result.pearson:.3f}, "
                                      f"Spearman {result.spearman:.3f}"),
                      xaxis_title=f"{a} score", yaxis_title=f"{b} score", width=560, height=540)
    return fig


def plot_intrinsic_heatmaps(result: IntrinsicResult) -> go.Figure:
    """The two models' score tables side by side on one colour scale."""
    top = max(1.0, float(result.a.max()), float(result.b.max()))
    return plot_head_heatmaps(dict(zip(result.names, (result.a, result.b), strict=True)),
                                       title=f"{result.names[0]} vs {result.names[1]}", zmax=top)


def plot_correlation_matrix(result: CorrelationMatrix, *,
                            method: Literal["pearson", "spearman"] = "pearson") -> go.Figure:
    """Model x model correlation, blank where the shapes differ."""
    z = getattr(result, method)
    fig = go.Figure(go.Heatmap(
        z=z, x=list(result.names), y=list(result.names), colorscale=DIVERGING,
        zmin=-1.0, zmax=1.0, zmid=0.0, text=np.where(np.isfinite(z), np.round(z, 2), np.nan),
        texttemplate="%{text}", colorbar=dict(title=dict(text=method)),
        hovertemplate="%{y} vs %{x}: %{z:.3f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category")
    fig.update_layout(title=dict(text=f"{method.capitalize()} correlation of per-head scores "
                                      "(blank: different shapes)"),
                      width=max(480, 90 * len(result.names) + 260),
                      height=max(420, 70 * len(result.names) + 220))
    return fig


def plot_groups(result: GroupResult, *, title: str) -> go.Figure:
    """Retrieval heads per (layer, KV group)."""
    fig = plot_head_heatmap(
        result.retrieval_per_group.astype(np.float64), title=title, colorbar_title="heads",
        zmax=float(max(1, result.retrieval_per_group.max())))
    fig.update_traces(hovertemplate="L%{y} group %{x}: %{z:.0f} heads<extra></extra>")
    fig.update_xaxes(title_text="KV group")
    return fig


# --------------------------------------------------------------------------------------------
# Ablation figures (results of rh_lens.ablation)


def plot_k_curve(result: AblationResult, *, metric: Literal["rouge", "success"] = "rouge",
                 title: str = "") -> go.Figure:
    """Top-K vs random-K masking (mean over needles and cells; random: mean and range of draws)."""
    curve = result.k_curve(metric)
    label = "mean ROUGE-1 recall" if metric == "rouge" else "success rate"
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=curve.ks, y=curve.top, mode="lines+markers",
                             name="top-K retrieval heads"))
    if np.isfinite(curve.random[:, curve.ks > 0]).any():
        mean = _nanmean(curve.random)
        finite = np.isfinite(curve.random)
        low = np.where(finite.any(0), np.where(finite, curve.random, np.inf).min(0), np.nan)
        high = np.where(finite.any(0), np.where(finite, curve.random, -np.inf).max(0), np.nan)
        fig.add_trace(go.Scatter(
            x=curve.ks, y=mean, mode="lines+markers", name=f"random-K ({len(curve.random)} draws)",
            error_y=dict(type="data", symmetric=False, array=high - mean, arrayminus=mean - low)))
    fig.update_xaxes(title_text="masked heads K")
    fig.update_yaxes(title_text=label, range=[-0.02, 1.02])
    cfg = result.config
    fig.update_layout(title=dict(text=title or f"NIAH under {cfg.mode} masking "
                                 f"({cfg.positions} positions)"), width=640, height=420)
    return fig


def plot_grids(result: AblationResult, *, title: str = "") -> go.Figure:
    """The depth x length ROUGE-1 grid of every display group (random draws averaged)."""
    names = result.group_names()
    grids = result.by_group(result.grids("rouge"))
    sweep = result.config.sweep
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=names, horizontal_spacing=0.05,
                        vertical_spacing=0.12)
    for i, grid in enumerate(grids):
        fig.add_trace(go.Heatmap(
            z=grid, x=[str(n) for n in sweep.lengths], y=[f"{d:g}" for d in sweep.depths],
            coloraxis="coloraxis",
            hovertemplate="depth %{y}%, length %{x}: %{z:.2f}<extra></extra>",
        ), row=i // cols + 1, col=i % cols + 1)
    fig.update_xaxes(type="category", title_text="context length")
    fig.update_yaxes(type="category", autorange="reversed", title_text="depth (%)")
    fig.update_layout(title=dict(text=title or "NIAH ROUGE-1 recall per condition"),
                      coloraxis=dict(colorscale=NIAH_SCALE, cmin=0.0, cmax=1.0),
                      width=300 * cols + 160, height=280 * rows + 120)
    return fig


def _stacked(result: AblationResult, table: np.ndarray, labels: Sequence[str], *, title: str,
             yaxis: str) -> go.Figure:
    names = result.group_names()
    fig = go.Figure([go.Bar(x=names, y=table[:, j], name=label)
                     for j, label in enumerate(labels)])
    fig.update_layout(barmode="stack", title=dict(text=title), yaxis_title=yaxis,
                      width=max(520, 70 * len(names) + 260), height=440)
    return fig


def plot_error_types(result: AblationResult, *, title: str = "") -> go.Figure:
    """Share of each output class per display group."""
    counts = result.by_group(result.error_counts().astype(np.float64))
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    return _stacked(result, shares, ERROR_TYPES, yaxis="share of trials",
                    title=title or "What the model answered, per condition")


def plot_failure_attention(result: AblationResult, *, title: str = "") -> go.Figure:
    """Where the watched (top retrieval) heads look during failed trials, per display group."""
    shares = np.nan_to_num(result.by_group(result.attention_shares(failed=True)))
    heads = ", ".join(label(h) for h in result.watch)
    return _stacked(result, shares, PLACES, yaxis="share of decode steps",
                    title=title or f"Top-1 keys of {heads or 'no heads'} in failed trials")


# --------------------------------------------------------------------------------------------
# Patching figures (results of rh_lens.patching)


def _effect_range(table: np.ndarray) -> float:
    finite = np.abs(table[np.isfinite(table)])
    return max(1.0, float(finite.max())) if finite.size else 1.0


def plot_activation_patching(result: ActivationPatchingResult, *,
                             title: str = "activation patching") -> go.Figure:
    """The per-head effect (units of the clean - corrupted gap), diverging about 0."""
    effect = result.effect
    return plot_head_heatmap(np.nan_to_num(effect), title=f"{title} ({result.config.direction})",
                             diverging=True, zmax=_effect_range(effect),
                             colorbar_title="effect")


def plot_path_patching(result: PathPatchingResult, *, title: str = "path patching") -> go.Figure:
    """Senders (y) x receivers (x) effect, with each sender's activation-patching total as the
    last column; blank cells: the receiver does not read the sender."""
    table = np.concatenate([result.effect, result.total_effect[:, None]], axis=1)
    zmax = _effect_range(table)
    fig = go.Figure(go.Heatmap(
        z=table, x=[*result.receiver_labels, "all paths"], y=result.sender_labels,
        colorscale=DIVERGING, zmin=-zmax, zmax=zmax, zmid=0.0,
        colorbar=dict(title=dict(text="effect")),
        hovertemplate="%{y} -> %{x}: %{z:.3f}<extra></extra>",
    ))
    fig.update_xaxes(title_text="receiver", type="category")
    fig.update_yaxes(title_text="sender", type="category", autorange="reversed")
    fig.update_layout(title=dict(text=f"{title} ({result.config.direction})"),
                      width=max(480, 28 * table.shape[1] + 260),
                      height=max(320, 28 * table.shape[0] + 200))
    return fig


# --------------------------------------------------------------------------------------------
# Chain-of-thought figure (results of rh_lens.cot)


def plot_cot(result: CotResult, *, title: str = "Accuracy under masking") -> go.Figure:
    """Grouped bars: one group per condition (random-K draws averaged, std as error bars),
    one bar per task."""
    mean, std = result.by_group()
    groups = result.group_names()
    fig = go.Figure()
    for t, task in enumerate(result.tasks):
        fig.add_bar(name=task, x=groups, y=mean[:, t],
                    error_y=dict(type="data", array=std[:, t], visible=bool(std[:, t].any())),
                    hovertemplate=f"{task}<br>%{{x}}: %{{y:.3f}}<extra></extra>")
    fig.update_layout(barmode="group", title=title, xaxis_title="masked heads",
                      yaxis_title="accuracy", yaxis_range=[0, 1.05], template="plotly_white")
    return fig
