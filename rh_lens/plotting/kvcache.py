"""The key/value-compression curve: NIAH vs the fraction of the cache kept, per policy family."""

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go


def plot_kv_curve(rows: Sequence[dict], *, metric: str = "rouge1_recall",
                  title: str = "") -> go.Figure:
    """One line per family (top-K, random-K averaged over draws with their range, uniform
    window) against the kept fraction, plus the ``full`` and ``window`` end points."""
    fig = go.Figure()
    ends = {r["policy"]: r for r in rows if r["family"] in ("full", "window")}
    for family, name in (("top", "top-K groups full"), ("random", "random-K groups full"),
                         ("uniform", "uniform window (StreamingLLM)")):
        by_k: dict[int, list[dict]] = {}
        for r in rows:
            if r["family"] == family:
                by_k.setdefault(r["k"], []).append(r)
        pts = [ends["window"]] if "window" in ends else []
        xs = [pts[0]["kv_fraction"]] if pts else []
        ys = [pts[0][metric]] if pts else []
        lo, hi = [0.0] * len(xs), [0.0] * len(xs)
        for k in sorted(by_k):
            vals = np.array([r[metric] for r in by_k[k]])
            xs.append(float(np.mean([r["kv_fraction"] for r in by_k[k]])))
            ys.append(float(vals.mean()))
            lo.append(float(vals.mean() - vals.min()))
            hi.append(float(vals.max() - vals.mean()))
        if "full" in ends:
            xs.append(ends["full"]["kv_fraction"])
            ys.append(ends["full"][metric])
            lo.append(0.0)
            hi.append(0.0)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=name,
                                 error_y=dict(type="data", symmetric=False, array=hi,
                                              arrayminus=lo)))
    fig.update_xaxes(title_text="fraction of the key/value cache kept")
    fig.update_yaxes(title_text=metric.replace("_", " "), range=[-0.02, 1.02])
    fig.update_layout(title=dict(text=title or "NIAH vs key/value cache kept"), width=640,
                      height=420)
    return fig
