"""The chain-of-thought figure (:class:`rh_lens.cot.CotResult`)."""

import plotly.graph_objects as go

from rh_lens.cot import CotResult


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
