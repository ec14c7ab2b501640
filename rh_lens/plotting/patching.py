"""Figures of activation and path patching (results of :mod:`rh_lens.patching`)."""

import numpy as np
import plotly.graph_objects as go

from rh_lens.patching import ActivationPatchingResult, PathPatchingResult
from rh_lens.plotting._style import DIVERGING
from rh_lens.plotting.detect import plot_head_heatmap


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
