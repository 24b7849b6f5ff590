"""Drawing for the report page: matplotlib figures as PNG data URIs, image thumbnails, and the CSS.

matplotlib is imported inside `figure`, not at the top: the registry scan imports every module of
`coalign.evaluate` for every command, and most commands draw nothing.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import TYPE_CHECKING, Any

from coalign.data.sources.base import SampleError
from coalign.data.transforms.image import decode_image

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from coalign.evaluate.report_model import Confusion

WIDTH_IN = 10.8  # widest figure, inches at 100 dpi: the page's content column (CSS `main`), unscaled


def figure(**kwargs: Any) -> Figure:
    """A bare matplotlib Figure: it renders with Agg, with no pyplot state and no display. Imported
    here, not at the top: the registry scan imports this module for every command."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def png_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def img_tag(uri: str, alt: str, cls: str = "plot") -> str:
    """An <img> of a data URI; `cls` picks its CSS ("plot" spans the column, "thumb" is a retrieval tile)."""
    return f'<img class="{cls}" src="{uri}" alt="{html.escape(alt)}">'


def _place(fig: Figure, x: float, y: float, w: float, h: float):
    """An axis at (x, y) inches from the figure's top left, w x h inches. Margins are laid out by hand,
    in inches: a layout engine (constrained, tight, bbox_inches="tight") draws every figure twice."""
    fw, fh = fig.get_size_inches()
    return fig.add_axes((x / fw, 1 - (y + h) / fh, w / fw, h / fh))


Lines = dict[str, tuple[list[int], list[float]]]  # line label -> (steps, values)


def line_plots(
    panels: list[tuple[str, Lines]], ncols: int = 3, fractions: bool = False, legend_out: bool = False
) -> str:
    """Small multiples: one axis per (title, lines); points are marked, so a metric logged once still
    shows. `fractions`: values in [0, 1] (accuracies, recalls) are drawn on the full [0, 1] scale;
    `legend_out`: legends right of their axis (for panels with many lines)."""
    ncols = min(ncols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    pw = WIDTH_IN / ncols if legend_out else min(4.2, WIDTH_IN / ncols)  # a row fits the page's column
    ph = 3.0
    left, right, top, bottom = 0.8, (1.85 if legend_out else 0.25), 0.35, 0.55
    fig = figure(figsize=(pw * ncols, ph * nrows))
    for i, (title, lines) in enumerate(panels):
        row, col = divmod(i, ncols)
        ax = _place(fig, col * pw + left, row * ph + top, pw - left - right, ph - top - bottom)
        for label, (steps, values) in lines.items():
            total = label == "loss (total)"
            ax.plot(steps, values, marker="o", markersize=3 if len(steps) > 1 else 6, label=label,
                    color="black" if total else None, linestyle="--" if total else "-")  # fmt: skip
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        steps = sorted({s for xs, _ in lines.values() for s in xs})
        if len(steps) == 1:  # one evaluation: a single labelled tick, not a fractional axis around it
            ax.set_xticks(steps)
            ax.set_xlim(steps[0] - 1, steps[0] + 1)
        else:
            ax.xaxis.get_major_locator().set_params(integer=True)
        if len(lines) > 1:
            where = {"loc": "upper left", "bbox_to_anchor": (1.02, 1)} if legend_out else {}
            ax.legend(fontsize=7, **where)
        if fractions and all(0 <= v <= 1 for _, values in lines.values() for v in values):
            ax.set_ylim(-0.03, 1.03)
    return img_tag(png_uri(fig), ", ".join(t for t, _ in panels))


def heatmap(c: Confusion) -> str:
    cm = c.matrix.double()
    n = len(c.classnames)
    rate = (cm / cm.sum(dim=1, keepdim=True).clamp(min=1)).numpy()  # (C, C) row-normalised
    chars = min(max(len(name) for name in c.classnames), 30)  # long names are cut at 30 characters
    side = max(2.4, 0.45 * n)  # the matrix, inches
    left, bottom, top = 0.45 + 0.065 * chars, 0.5 + 0.05 * chars, 0.4
    fig = figure(figsize=(left + side + 0.2, top + side + bottom))
    ax = _place(fig, left, top, side, side)
    ax.imshow(rate, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if rate[i, j] > 0.5 else "#1d2430")  # fmt: skip
    names = [name[:30] for name in c.classnames]
    ax.set_xticks(range(n), names, rotation=45, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xlabel("predicted", fontsize=9)
    ax.set_ylabel("true", fontsize=9)
    acc = float(cm.diagonal().sum() / cm.sum().clamp(min=1))
    ax.set_title(f"{c.key} ({c.modality}): top-1 {acc:.1%}", fontsize=10)
    return img_tag(png_uri(fig), f"confusion matrix of {c.key} ({c.modality})")


def thumbnail(value: Any, size: int = 128) -> str | None:
    """A PNG data URI of a raw image value (uint8 array, path, bytes or PIL image); None if unreadable."""
    try:
        img = decode_image(value)
    except SampleError:
        return None
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# The serve page's palette, so a report and the search page look like one tool. Plots are PNGs
# scaled to the column width; retrieval tiles keep the world's pixels sharp.
CSS = """
:root { --bg: #f5f6f8; --card: #fff; --ink: #1d2430; --muted: #677285; --accent: #3157d5;
  --line: #dde1e8; --hit: #1f9d4c; --miss: #d23b3b;
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  font-size: 16px; line-height: 1.45; color: var(--ink); background: var(--bg); }
* { box-sizing: border-box; }
body { margin: 0; }
header { display: flex; align-items: baseline; justify-content: space-between; flex-wrap: wrap;
  gap: 0.5rem 2rem; padding: 1rem 2rem; background: var(--card); border-bottom: 1px solid var(--line); }
h1 { margin: 0; font-size: 1.4rem; }
h1 span { color: var(--accent); font-weight: 500; }
.status { margin: 0; color: var(--muted); font-size: 0.9rem; word-break: break-all; }
nav { position: sticky; top: 0; z-index: 1; display: flex; flex-wrap: wrap; gap: 0.3rem 1.2rem;
  padding: 0.55rem 2rem; background: var(--card); border-bottom: 1px solid var(--line); font-size: 0.92rem; }
nav a { color: var(--accent); text-decoration: none; }
nav a:hover { text-decoration: underline; }
main { max-width: 1200px; margin: 0 auto; padding: 1.2rem 2rem 3rem; }
section { background: var(--card); border: 1px solid var(--line); border-radius: 10px;
  padding: 0.4rem 1.4rem 1.2rem; margin: 0 0 1.2rem; scroll-margin-top: 3rem; }
h2 { font-size: 1.15rem; margin: 0.8rem 0 0.6rem; }
.note { color: var(--muted); font-size: 0.92rem; margin: 0.2rem 0 0.8rem; }
.missing { color: var(--muted); font-style: italic; background: var(--bg); border-radius: 6px;
  padding: 0.6rem 0.9rem; }
.missing.error { color: #9b1c1c; background: #fdecec; font-style: normal; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 0.2rem 1.2rem; margin: 0 0 1rem; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; word-break: break-all; }
table { border-collapse: collapse; font-size: 0.92rem; }
th, td { padding: 0.3rem 0.8rem; border-bottom: 1px solid var(--line); text-align: left; }
td:not(:first-child), th:not(:first-child) { text-align: right; font-variant-numeric: tabular-nums; }
img.plot { display: block; max-width: 100%; height: auto; margin: 0.4rem 0; }
.figures { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; }
.figures figure { margin: 0; max-width: 100%; }
.examples { display: grid; grid-template-columns: repeat(auto-fill, minmax(32rem, 1fr)); gap: 0 1.5rem; }
.query { padding: 0.6rem 0; border-top: 1px solid var(--line); }
.caption { margin: 0 0 0.4rem; }
.rank { color: var(--muted); font-size: 0.85rem; margin-left: 0.5rem; }
.tiles { display: flex; flex-wrap: wrap; gap: 0.6rem; }
.tile { margin: 0; text-align: center; font-size: 0.8rem; color: var(--muted); }
.tile .thumb { display: block; width: 84px; height: 84px; object-fit: contain; border: 4px solid;
  border-radius: 6px; image-rendering: pixelated; background: var(--bg); }
.tile.hit .thumb { border-color: var(--hit); }
.tile.miss .thumb { border-color: var(--miss); }
.tile.hit figcaption { color: var(--hit); font-weight: 600; }
div.thumb.unreadable { display: flex; align-items: center; justify-content: center; }
pre.recipe { background: var(--bg); border: 1px solid var(--line); border-radius: 8px; padding: 0.8rem 1rem;
  overflow-x: auto; font-size: 0.85rem; line-height: 1.35; }
"""
