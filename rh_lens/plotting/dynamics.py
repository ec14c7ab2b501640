"""Figures of a checkpoint series: each head's score over the steps, NIAH accuracy and the
number of retrieval heads over the steps, and each retrieval head's induction vs retrieval
onset."""

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from jaxtyping import Float
from plotly.subplots import make_subplots

from rh_lens.heads import label
from rh_lens.plotting._style import SEQUENTIAL


def plot_score_over_steps(
    steps: Sequence[int] | np.ndarray,
    table: Float[np.ndarray, "checkpoint n_layers n_heads"],
    *,
    title: str,
    zmax: float | None = None,
    colorbar_title: str = "score",
) -> go.Figure:
    """Every head (rows, ``L{layer}H{head}``, layer by layer) at every checkpoint (columns); a
    checkpoint without a score (no successful trial) is left blank."""
    table = np.asarray(table, dtype=np.float64)
    if table.ndim != 3 or table.shape[0] != len(steps) or 0 in table.shape:
        raise ValueError(f"need a [checkpoint, n_layers, n_heads] table for {len(steps)} steps, "
                         f"got {table.shape}")
    _, n_layers, n_heads = table.shape
    z = table.reshape(len(steps), -1).T
    heads = [label((lay, h)) for lay in range(n_layers) for h in range(n_heads)]
    top = zmax if zmax is not None else max(1.0, float(np.nanmax(table)) if np.isfinite(
        table).any() else 1.0)
    fig = go.Figure(go.Heatmap(
        z=z, x=[str(s) for s in steps], y=heads, colorscale=SEQUENTIAL, zmin=0.0, zmax=top,
        colorbar=dict(title=dict(text=colorbar_title)),
        hovertemplate="%{y} at step %{x}: %{z:.3f}<extra></extra>"))
    fig.update_xaxes(title_text="training step", type="category")
    fig.update_yaxes(title_text="head", type="category", autorange="reversed")
    fig.update_layout(title=dict(text=title), width=max(520, 30 * len(steps) + 240),
                      height=max(360, 14 * len(heads) + 160))
    return fig


def plot_niah_over_steps(
    steps: Sequence[int] | np.ndarray,
    accuracy: Sequence[float] | np.ndarray,
    n_retrieval_heads: Sequence[int] | np.ndarray,
    *,
    title: str,
) -> go.Figure:
    """NIAH accuracy (left axis) and the number of retrieval heads (right axis) by step."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=list(steps), y=list(accuracy), mode="lines+markers",
                             name="NIAH accuracy"), secondary_y=False)
    fig.add_trace(go.Scatter(x=list(steps), y=list(n_retrieval_heads), mode="lines+markers",
                             name="retrieval heads", line=dict(dash="dot")), secondary_y=True)
    fig.update_xaxes(title_text="training step")
    fig.update_yaxes(title_text="NIAH accuracy", range=[0, 1.05], secondary_y=False)
    fig.update_yaxes(title_text="retrieval heads", rangemode="tozero", secondary_y=True)
    fig.update_layout(title=dict(text=title), width=720, height=420)
    return fig


def plot_onsets(onsets: Sequence[dict], *, title: str, last_step: int) -> go.Figure:
    """Each final retrieval head (``DynamicsResult.onsets``) at (induction onset, retrieval
    onset), with the diagonal; a head whose induction score never crossed sits at the right
    edge, marked open."""
    never = last_step * 1.05
    crossed = [o for o in onsets if o["induction_onset"] is not None]
    not_crossed = [o for o in onsets if o["induction_onset"] is None]
    fig = go.Figure(go.Scatter(x=[0, last_step], y=[0, last_step], mode="lines",
                               line=dict(dash="dot", color="grey"), showlegend=False,
                               hoverinfo="skip"))
    for group, name, symbol, x_of in ((crossed, "induction crossed", "circle",
                                       lambda o: o["induction_onset"]),
                                      (not_crossed, "induction never crossed", "circle-open",
                                       lambda o: never)):
        if group:
            fig.add_trace(go.Scatter(
                x=[x_of(o) for o in group], y=[o["retrieval_onset"] for o in group],
                mode="markers+text", text=[label(tuple(o["head"])) for o in group],
                textposition="top center", name=name, marker=dict(symbol=symbol, size=10),
                hovertemplate="%{text}: induction %{x}, retrieval %{y}<extra></extra>"))
    fig.update_xaxes(title_text="induction onset (step)", range=[-0.03 * never, never * 1.05])
    fig.update_yaxes(title_text="retrieval onset (step)", range=[-0.03 * never, never * 1.05])
    fig.update_layout(title=dict(text=title), width=620, height=560)
    return fig
