"""Figure of a precision comparison (:mod:`rh_lens.precision`)."""

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from rh_lens.heads import label
from rh_lens.precision import PrecisionResult

MEASURES = {  # PrecisionRow field -> bar label
    "position_agreement": "positions",
    "same_input_agreement": "positions (same input)",
    "token_agreement": "tokens",
    "retrieval_jaccard": "retrieval heads (Jaccard)",
    "topk_jaccard": "top-K (Jaccard)",
}


def plot_precision(result: PrecisionResult, *, title: str = "") -> go.Figure:
    """Left: each dtype's agreement with the reference (0..1, grouped by measure); right: each
    head's score in each dtype against the reference's (the diagonal: equal scores)."""
    fig = make_subplots(rows=1, cols=2, column_widths=[0.55, 0.45], subplot_titles=(
        f"agreement with {result.reference}", f"per-head {result.score} score"))
    rows = result.rows[1:] or result.rows
    for row in rows:
        values = [getattr(row, m) for m in MEASURES]
        fig.add_trace(go.Bar(
            name=row.dtype, x=[MEASURES[m].replace("top-K", f"top-{result.k}") for m in MEASURES],
            y=[np.nan if v is None else v for v in values], legendgroup=row.dtype,
            hovertemplate=f"{row.dtype} %{{x}}: %{{y:.4f}}<extra></extra>"), row=1, col=1)
    ref = result.scores[0]
    n_heads = ref.shape[1]
    names = [label((i // n_heads, i % n_heads)) for i in range(ref.size)]
    finite = [t[np.isfinite(t)] for t in result.scores]
    top = max([1.0] + [float(f.max()) for f in finite if f.size])
    fig.add_trace(go.Scatter(x=[0, top], y=[0, top], mode="lines", showlegend=False,
                             line=dict(color="grey", dash="dot"), hoverinfo="skip"), row=1, col=2)
    for i, dtype in enumerate(result.dtypes[1:], start=1):
        fig.add_trace(go.Scatter(
            x=ref.ravel(), y=result.scores[i].ravel(), mode="markers", name=dtype,
            legendgroup=dtype, showlegend=False, text=names,
            hovertemplate=f"%{{text}}: {result.reference} %{{x:.3f}}, {dtype} %{{y:.3f}}"
                          "<extra></extra>"), row=1, col=2)
    fig.update_yaxes(title_text="agreement", range=[0, 1.05], row=1, col=1)
    fig.update_xaxes(title_text=result.reference, row=1, col=2)
    fig.update_yaxes(title_text="other dtype", row=1, col=2)
    fig.update_layout(title=dict(text=title or "Detection across precisions"), barmode="group")
    return fig
