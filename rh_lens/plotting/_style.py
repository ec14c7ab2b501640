"""The defaults every figure shares: colour scales, per-head heatmap axes, offline HTML."""

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from rh_lens.results import atomic_open

SEQUENTIAL = "Viridis"
DIVERGING = "RdBu_r"
# The red -> yellow -> green of Needle-in-a-Haystack plots (gkamradt's LLMTest_NeedleInAHaystack).
NIAH_SCALE = [[0.0, "#F0496E"], [0.5, "#EBB839"], [1.0, "#0CD79F"]]
HEAD_HOVER = "L%{y}H%{x}: %{z:.3f}<extra></extra>"
PLOTLY_JS = "plotly.min.js"


def _as_table(table: np.ndarray, name: str = "table") -> np.ndarray:
    table = np.asarray(table, dtype=np.float64)
    if table.ndim != 2 or 0 in table.shape:
        raise ValueError(f"{name} must be a non-empty [n_layers, n_heads] array, got {table.shape}")
    return table


def _colour_range(
    tables: Sequence[np.ndarray], *, zmin: float, zmax: float | None, diverging: bool
) -> dict:
    """Heatmap colour settings shared by one or several tables."""
    if diverging:
        if zmin != 0.0:
            raise ValueError("a diverging scale is symmetric about 0: set zmax only, not zmin")
        if zmax is None:
            finite = [np.abs(t[np.isfinite(t)]) for t in tables]
            zmax = max((float(f.max()) for f in finite if f.size), default=0.0) or 1.0
        return dict(colorscale=DIVERGING, zmin=-zmax, zmax=zmax, zmid=0.0)
    zmax = 1.0 if zmax is None else zmax
    if not zmax > zmin:
        raise ValueError(f"zmax ({zmax}) must be larger than zmin ({zmin})")
    return dict(colorscale=SEQUENTIAL, zmin=zmin, zmax=zmax)


def _head_axes(fig: go.Figure, **subplot) -> None:
    fig.update_xaxes(title_text="head", **subplot)
    fig.update_yaxes(title_text="layer", autorange="reversed", **subplot)


def save_figure(fig: go.Figure, path: str | Path, *, self_contained: bool = False) -> Path:
    """Write ``fig`` as offline HTML; returns the path.

    By default the page loads ``plotly.min.js`` from its own folder, so a folder of figures shares
    one copy of the 4.8 MB script (each page is ~20 KB).  The script is written beside the HTML
    when it is missing or differs in size from the installed plotly's bundle (a truncated copy
    would render blank).  A page moved without the script says so in its text instead of showing
    nothing.  ``self_contained=True`` embeds the script in the page, which then opens anywhere.
    Every file is written atomically.
    """
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"{path}: figures are saved as .html")
    path.parent.mkdir(parents=True, exist_ok=True)
    if self_contained:
        with atomic_open(path, "w") as f:
            f.write(fig.to_html(include_plotlyjs=True, full_html=True))
        return path
    html = fig.to_html(include_plotlyjs="directory", full_html=True)
    if f'src="{PLOTLY_JS}"' not in html or "</body>" not in html:
        raise RuntimeError(f"plotly's HTML does not reference {PLOTLY_JS}; cannot save offline")
    head, tail = html.rsplit("</body>", 1)
    with atomic_open(path, "w") as f:
        f.write(head + _MISSING_SCRIPT_NOTICE + "</body>" + tail)
    js_path = path.parent / PLOTLY_JS
    bundle = get_plotlyjs().encode("utf-8")
    if not js_path.is_file() or os.path.getsize(js_path) != len(bundle):
        with atomic_open(js_path, "wb") as f:
            f.write(bundle)
    return path


_MISSING_SCRIPT_NOTICE = f"""<script>
if (typeof Plotly === "undefined") {{
  document.body.insertAdjacentHTML("afterbegin", "<p style='font:16px sans-serif;color:#b00'>"
    + "This figure needs {PLOTLY_JS} in its folder (it is written beside every figure). Copy it "
    + "here, or save the figures with --self-contained-figures.</p>");
}}
</script>
"""
