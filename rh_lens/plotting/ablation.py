"""Figures of an ablation sweep (:class:`rh_lens.ablation.AblationResult`)."""

from collections.abc import Sequence
from typing import Literal

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from rh_lens.ablation import ERROR_TYPES, PLACES, AblationResult
from rh_lens.ablation.result import _nanmean
from rh_lens.heads import label
from rh_lens.plotting._style import NIAH_SCALE


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
