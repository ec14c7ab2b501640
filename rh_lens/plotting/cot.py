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


def plot_specificity(result: CotResult, *, title: str = "") -> go.Figure | None:
    """Per masked group, the accuracy drop on retrieval tasks (y) against the drop on
    parametric facts (x), with bootstrap intervals over draws and items; above the diagonal a
    mask hurts retrieval more than recall of facts.  None when the result cannot say
    (:meth:`~rh_lens.cot.CotResult.specificity`)."""
    spec = result.specificity()
    if spec is None:
        return None
    groups = list(spec["groups"])
    get = lambda side, key: [spec["groups"][g][side][key] for g in groups]  # noqa: E731
    x, y = get("parametric", "mean"), get("retrieval", "mean")
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[-1, 1], y=[-1, 1], mode="lines", name="equal drop",
                             line=dict(dash="dash", color="gray"), hoverinfo="skip"))
    fig.add_trace(go.Scatter(
        x=x, y=y, mode="markers+text", text=groups, textposition="top center", name="masked set",
        error_x=dict(type="data", symmetric=False,
                     array=[h - m for h, m in zip(get("parametric", "high"), x, strict=True)],
                     arrayminus=[m - lo for m, lo in zip(x, get("parametric", "low"),
                                                         strict=True)]),
        error_y=dict(type="data", symmetric=False,
                     array=[h - m for h, m in zip(get("retrieval", "high"), y, strict=True)],
                     arrayminus=[m - lo for m, lo in zip(y, get("retrieval", "low"),
                                                         strict=True)]),
        hovertemplate="%{text}: retrieval drop %{y:.3f}, parametric drop %{x:.3f}"
                      "<extra></extra>"))
    retrieval = ", ".join(spec["retrieval_tasks"])
    parametric = ", ".join(spec["parametric_tasks"])
    fig.update_layout(
        title=title or "Specificity: accuracy drop under masking",
        xaxis=dict(title=f"drop on parametric facts ({parametric})", range=[-0.25, 1.05]),
        yaxis=dict(title=f"drop on retrieval tasks ({retrieval})", range=[-0.25, 1.05]),
        width=640, height=560, template="plotly_white")
    return fig
