"""Figures of the retrieval-head properties (results of :mod:`rh_lens.properties`)."""

from typing import Literal

import numpy as np
import plotly.graph_objects as go

from rh_lens.heads import THRESHOLD, HeadLike, label
from rh_lens.plotting._style import DIVERGING, SEQUENTIAL
from rh_lens.plotting.detect import plot_head_heatmap, plot_head_heatmaps, plot_niah_grid
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
from rh_lens.properties.stability import STABLE_JACCARD, StabilityCurve, ThresholdSweep


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


def plot_threshold_sweep(results: dict[str, ThresholdSweep]) -> go.Figure:
    """Retrieval heads at each threshold, one line per model; the hover adds the share of heads
    and the overlap with the set at the default threshold."""
    fig = go.Figure()
    for name, r in results.items():
        fig.add_trace(go.Scatter(
            x=list(r.thresholds), y=r.n_retrieval, name=name, mode="lines+markers",
            customdata=np.stack([r.share, r.jaccard_with_default], axis=1),
            hovertemplate=f"{name} > %{{x}}: %{{y}} heads (%{{customdata[0]:.1%}}), Jaccard "
                          f"with > {r.default:g}: %{{customdata[1]:.2f}}<extra></extra>"))
    fig.update_layout(title=dict(text="Retrieval heads by threshold"),
                      xaxis_title="threshold (mean score >)", yaxis_title="retrieval heads")
    return fig


def plot_stability(curve: StabilityCurve, *, title: str = "") -> go.Figure:
    """Agreement of resampled trials with all trials against their number: the mean over draws
    of each measure, the top-K Jaccard with its 5th-95th percentile band."""
    x = curve.sizes
    low, high = (np.nanpercentile(curve.topk_jaccard, q, axis=1) for q in (5, 95))
    fig = go.Figure([
        go.Scatter(x=np.concatenate([x, x[::-1]]), y=np.concatenate([high, low[::-1]]),
                   fill="toself", line=dict(width=0), opacity=0.25, hoverinfo="skip",
                   name=f"top-{curve.k} Jaccard, 5-95 %"),
        *(go.Scatter(x=x, y=np.nanmean(values, axis=1), mode="lines+markers", name=name)
          for name, values in ((f"top-{curve.k} Jaccard", curve.topk_jaccard),
                               (f"retrieval heads (> {curve.threshold:g}) Jaccard",
                                curve.retrieval_jaccard),
                               ("Spearman of all scores", curve.spearman))),
    ])
    fig.add_hline(y=STABLE_JACCARD, line_dash="dot")
    fig.update_layout(title=dict(text=title or f"{curve.name}: stability over trials"),
                      xaxis=dict(title="trials", type="log"),
                      yaxis=dict(title="agreement with all trials", range=[0, 1.02]))
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


def plot_property_summary(result, *, file_name=str) -> dict[str, go.Figure]:
    """Every figure of a computed (not loaded) :class:`~rh_lens.properties.PropertySummary`, by
    file stem (``file_name`` turns a model name into part of a file name)."""
    if result.universality is None:
        raise ValueError("this summary was loaded from disk: its figures need the scores "
                         "(compute_property_summary)")
    figures = {}
    for name, g in (result.groups or {}).items():
        figures[f"groups_{file_name(name)}"] = plot_groups(
            g, title=f"{name}: retrieval heads per KV group")
    for name, sw in (result.switch_on or {}).items():
        if sw.heads:
            figures[f"switch_on_{file_name(name)}"] = plot_switch_on(
                sw, title=f"{name}: activation rate of context-dependent heads")
            figures[f"switch_on_grid_{file_name(name)}"] = plot_switch_on_grid(sw, sw.heads[0])
    for name, curve in (result.stability or {}).items():
        figures[f"stability_{file_name(name)}"] = plot_stability(curve)
    if result.thresholds:
        figures["thresholds"] = plot_threshold_sweep(result.thresholds)
    for r in result.intrinsic:
        a, b = r.names
        stem = f"intrinsic_{file_name(a)}_vs_{file_name(b)}"
        figures[f"{stem}_scatter"] = plot_intrinsic(r)
        figures[f"{stem}_heatmaps"] = plot_intrinsic_heatmaps(r)
    sparsity = {row.name: row.sparsity for row in result.universality.models}
    figures.update({
        "heatmaps": plot_universality(result.universality),
        "sparsity_bins": plot_sparsity(sparsity),
        "layer_profile": plot_layer_profile(sparsity),
        "activation": plot_activation(result.activation),
        "correlation_pearson": plot_correlation_matrix(result.correlations, method="pearson"),
        "correlation_spearman": plot_correlation_matrix(result.correlations, method="spearman"),
    })
    return figures
