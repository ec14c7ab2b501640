"""The side-by-side benchmark at a real model shape: time and memory against the context."""

from collections.abc import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots


def plot_scale(rows: Sequence[dict], *, labels: dict[str, str], title: str = "") -> go.Figure:
    """Three panels against the context length, one line per method: prefill seconds, seconds
    per decode step and peak memory (measured, solid; the memory model, dotted)."""
    fig = make_subplots(rows=1, cols=3, subplot_titles=("prefill", "one decode step",
                                                        "peak memory over the weights"))
    palette = ("#1f77b4", "#ff7f0e", "#2ca02c", "#7f7f7f")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for i, method in enumerate(methods):
        mine = sorted((r for r in rows if r["method"] == method and not r["out_of_memory"]),
                      key=lambda r: r["context"])
        x = [r["context"] for r in mine]
        style = dict(color=palette[i % len(palette)])
        name = labels.get(method, method)
        fig.add_trace(go.Scatter(x=x, y=[r["prefill_s"] for r in mine], name=name,
                                 legendgroup=method, line=style), row=1, col=1)
        fig.add_trace(go.Scatter(x=x, y=[r["step_s"] * 1e3 for r in mine], name=name,
                                 legendgroup=method, line=style, showlegend=False), row=1, col=2)
        fig.add_trace(go.Scatter(x=x, y=[r["peak_bytes"] / 2**30 for r in mine], name=name,
                                 legendgroup=method, line=style, showlegend=False), row=1, col=3)
        fig.add_trace(go.Scatter(x=x, y=[r["predicted_bytes"] / 2**30 for r in mine],
                                 name=f"{name}, model", legendgroup=method, showlegend=False,
                                 line=dict(style, dash="dot")), row=1, col=3)
    for col, unit in ((1, "s"), (2, "ms"), (3, "GiB")):
        fig.update_xaxes(title_text="context (tokens)", type="log", row=1, col=col)
        fig.update_yaxes(title_text=unit, type="log", row=1, col=col)
    fig.update_layout(title=dict(text=title or "detection at scale"), width=1200, height=420)
    return fig
