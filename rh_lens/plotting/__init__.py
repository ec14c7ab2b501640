"""Plotly figures with one set of defaults; every function returns a ``go.Figure``.

Per-head tables are drawn with layers on y (layer 0 at the top, as in an image of the
``[n_layers, n_heads]`` array) and heads on x, hover ``L{layer}H{head}: value``.  Scores use a
sequential 0..1 scale (``zmax`` raises the top, e.g. for step scores above 1); effects use a
diverging scale centred on 0.  Nothing here calls ``.show()``: notebooks end a cell with the
figure, scripts call :func:`save_figure`.

One module per analysis: :mod:`~rh_lens.plotting.detect`, :mod:`~rh_lens.plotting.properties`,
:mod:`~rh_lens.plotting.ablation`, :mod:`~rh_lens.plotting.patching`,
:mod:`~rh_lens.plotting.cot`, :mod:`~rh_lens.plotting.dynamics`,
:mod:`~rh_lens.plotting.kvcache`, :mod:`~rh_lens.plotting.scale`,
:mod:`~rh_lens.plotting.precision`.  Every ``plot_*`` is re-exported
here and imported on first use, so that the property figures load without torch.
"""

import importlib

from rh_lens.plotting._style import (
    DIVERGING,
    HEAD_HOVER,
    NIAH_SCALE,
    PLOTLY_JS,
    SEQUENTIAL,
    save_figure,
)

_PLOTS = {
    "detect": ("STEP_SCALE", "plot_decode_steps", "plot_head_heatmap", "plot_head_heatmaps",
               "plot_niah_grid", "plot_top_heads"),
    "properties": ("plot_activation", "plot_correlation_matrix", "plot_groups", "plot_intrinsic",
                   "plot_intrinsic_heatmaps", "plot_layer_profile", "plot_sparsity",
                   "plot_property_summary", "plot_stability", "plot_switch_on",
                   "plot_switch_on_grid", "plot_threshold_sweep", "plot_universality"),
    "ablation": ("plot_error_types", "plot_failure_attention", "plot_grids", "plot_k_curve"),
    "patching": ("plot_activation_patching", "plot_path_patching"),
    "cot": ("plot_cot", "plot_specificity"),
    "kvcache": ("plot_kv_curve",),
    "scale": ("plot_scale",),
    "dynamics": ("plot_niah_over_steps", "plot_onsets", "plot_score_over_steps"),
    "precision": ("plot_precision",),
}
_EXPORTS = {name: module for module, names in _PLOTS.items() for name in names}

__all__ = [
    "DIVERGING", "HEAD_HOVER", "NIAH_SCALE", "PLOTLY_JS", "SEQUENTIAL", "STEP_SCALE",
    "plot_activation", "plot_activation_patching", "plot_correlation_matrix", "plot_cot",
    "plot_decode_steps", "plot_error_types", "plot_failure_attention", "plot_grids", "plot_groups",
    "plot_head_heatmap", "plot_head_heatmaps", "plot_intrinsic", "plot_intrinsic_heatmaps",
    "plot_k_curve", "plot_kv_curve", "plot_layer_profile", "plot_niah_grid",
    "plot_niah_over_steps", "plot_onsets", "plot_path_patching", "plot_precision",
    "plot_property_summary", "plot_score_over_steps", "plot_sparsity", "plot_specificity",
    "plot_stability",
    "plot_switch_on", "plot_switch_on_grid", "plot_threshold_sweep", "plot_top_heads",
    "plot_universality", "save_figure",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"rh_lens.plotting.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'rh_lens.plotting' has no attribute {name!r}")


def __dir__():
    return sorted([*__all__, *_PLOTS])
