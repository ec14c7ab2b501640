"""Figures of an ablation sweep (:class:`rh_lens.ablation.AblationResult`)."""

from collections.abc import Sequence
from typing import Literal

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from rh_lens import stats
from rh_lens.ablation import ERROR_TYPES, PLACES, AblationResult
from rh_lens.heads import label
from rh_lens.plotting._style import NIAH_SCALE

_BAND = {"top": "31,119,180", "random": "255,127,14", "matched": "44,160,44",
         "bottom": "148,103,189"}


def _band(fig: go.Figure, x, rows: np.ndarray, *, name: str, color: str) -> None:
    """A mean line with its interval as a shaded band (``rows``: mean, low, high per x)."""
    fig.add_trace(go.Scatter(x=np.concatenate([x, x[::-1]]),
                             y=np.concatenate([rows[:, 2], rows[::-1, 1]]), fill="toself",
                             fillcolor=f"rgba({color},0.2)", line=dict(width=0),
                             hoverinfo="skip", showlegend=False, legendgroup=name))
    fig.add_trace(go.Scatter(x=x, y=rows[:, 0], mode="lines+markers", name=name,
                             legendgroup=name, line=dict(color=f"rgb({color})"),
                             customdata=rows[:, 1:],
                             hovertemplate="K=%{x}: %{y:.3f} [%{customdata[0]:.3f}, "
                             "%{customdata[1]:.3f}]<extra></extra>"))


def plot_k_curve(result: AblationResult, *, metric: Literal["rouge", "success"] = "rouge",
                 title: str = "") -> go.Figure:
    """Top-K vs each control the sweep ran (random-K, matched-K, bottom-K): mean over trials
    (and draws) with its bootstrap interval as a shaded band; ``*`` marks the K where top-K
    differs from the matched control (else the random one) after Benjamini-Hochberg."""
    curve = result.k_curve(metric)
    comparisons = result.controls(metric)
    label = "mean ROUGE-1 recall" if metric == "rouge" else "success rate"
    fig = go.Figure()
    if not comparisons:
        fig.add_trace(go.Scatter(x=curve.ks, y=curve.top, mode="lines+markers",
                                 name="top-K retrieval heads"))
    start = np.zeros((0, 3))
    values = result.per_trial(metric)
    if "none" in values:
        none = stats.bootstrap_ci(values["none"])
        start = np.array([[none.mean, none.low, none.high]])
    for i, comp in enumerate(comparisons):
        x = np.concatenate([[0] if len(start) else [], comp.ks])
        if i == 0:
            _band(fig, x, np.concatenate([start, comp.top]), name="top-K retrieval heads",
                  color=_BAND["top"])
        draws = int(comp.n_draws.max())
        _band(fig, x, np.concatenate([start, comp.control_values]),
              name=f"{comp.control}-K" + (f" ({draws} draws)" if comp.control != "bottom"
                                          else ""), color=_BAND[comp.control])
    tested = {c.control: c for c in comparisons}
    marked = tested.get("matched") or tested.get("random")
    if marked is not None and marked.significant.any():
        keep = marked.significant
        fig.add_trace(go.Scatter(
            x=marked.ks[keep], y=np.full(int(keep.sum()), 1.06), mode="text", text="*",
            textfont=dict(size=18), name=f"q <= {marked.alpha} vs {marked.control}-K",
            customdata=np.stack([marked.p[keep], marked.q[keep]], axis=-1),
            hovertemplate="K=%{x}: p=%{customdata[0]:.2g}, q=%{customdata[1]:.2g}"
            "<extra></extra>"))
    level = comparisons[0].level if comparisons else None
    fig.update_xaxes(title_text="masked heads K")
    fig.update_yaxes(title_text=label + (f" ({level:.0%} bootstrap bands)" if level else ""),
                     range=[-0.02, 1.1])
    cfg = result.config
    fig.update_layout(title=dict(text=title or f"NIAH under {cfg.mode} masking "
                                 f"({cfg.positions} positions)"), width=680, height=440)
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
