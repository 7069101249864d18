"""Attention heatmaps from any backend's arrays (NumPy, torch, Keras/TensorFlow).

Rows are queries (T, "who asks"), columns are keys (S, "who answers"); each
row of a weights matrix sums to 1 (or 0 where it is fully masked).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

__all__ = ["to_numpy", "heatmap", "heads", "COLUMN_INCHES", "ANNOTATION_PT", "figsize", "panels"]

# The site's text column is about 7 inches of a figure at matplotlib's 100 dpi; a
# figure drawn wider is shrunk on screen, and its 10 pt text with it.
COLUMN_INCHES = 7.0
ANNOTATION_PT = 9  # values written in heatmap cells: the smallest text the book draws


def to_numpy(x) -> np.ndarray:
    """A NumPy copy of a NumPy array, a torch tensor (even one that requires grad) or a Keras tensor."""
    if hasattr(x, "detach"):  # torch
        x = x.detach().cpu()
        x = (x.float() if str(x.dtype) == "torch.bfloat16" else x).numpy()  # NumPy has no bfloat16
    elif hasattr(x, "numpy") and not isinstance(x, np.ndarray):  # TensorFlow, Keras variables
        x = x.numpy()
    return np.array(x)


def _matrix(weights, name: str) -> np.ndarray:
    a = to_numpy(weights)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a (T, S) matrix, got shape {a.shape}; pick one batch item and head")
    return a


def heatmap(weights, queries=None, keys=None, *, ax=None, title=None, annotate=None, cmap="viridis",
            colorbar=True, vmin=None, vmax=None):
    """Draws one (T, S) matrix of attention weights (or a boolean mask) and returns the Axes.

    `queries` and `keys` label the rows and columns; `annotate` writes each
    value in its cell (default: when the matrix is at most 10 x 10). Weights
    are coloured on [0, 1] unless `vmin`/`vmax` say otherwise (many keys
    make every weight small: pass ``vmax=w.max()`` to see their pattern).
    """
    a = _matrix(weights, "heatmap")
    is_mask = a.dtype == bool
    a = a.astype(np.float32) if is_mask else a
    t, s = a.shape
    if ax is None:
        _, ax = plt.subplots(figsize=(min(1.2 + 0.45 * s, COLUMN_INCHES), min(0.8 + 0.45 * t, 7)))
    if vmin is None and vmax is None and a.min() >= 0 and a.max() <= 1:
        vmin, vmax = 0.0, 1.0
    im = ax.imshow(a, cmap=cmap, vmin=vmin, vmax=vmax)
    _label(ax, t, s, queries, keys)
    if annotate is None:
        annotate = t <= 10 and s <= 10
    if annotate:
        for i in range(t):
            for j in range(s):
                ax.text(j, i, f"{a[i, j]:.0f}" if is_mask else f"{a[i, j]:.2f}", ha="center", va="center", fontsize=ANNOTATION_PT,
                        color="black" if im.norm(a[i, j]) > 0.5 else "white")
    if title:
        ax.set_title(title)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return ax


def heads(weights, queries=None, keys=None, *, batch: int = 0, ncols: int | None = None, title=None, cmap="viridis"):
    """Draws every head of (B, H, T, S) weights (item `batch`) or (H, T, S), one panel a head.

    At most `ncols` panels a row (default: 2 for up to 4 heads, so that they
    stay readable on a phone, else 4), more heads break into rows; the figure
    is at most the site's column wide, and one colour bar on [0, 1] serves
    every panel.
    Returns the Figure.
    """
    a = to_numpy(weights)
    if a.ndim == 4:
        a = a[batch]
    if a.ndim != 3:
        raise ValueError(f"heads: expected weights (B, H, T, S) or (H, T, S), got shape {a.shape}")
    h, t, s = a.shape
    ncols = min(ncols or (2 if h <= 4 else 4), h)
    nrows = -(-h // ncols)
    width = min(COLUMN_INCHES, 2.3 * ncols + 0.9)
    panel = (width - 0.9) / ncols
    height = nrows * (panel * min(max(t / s, 0.4), 1.5) + 0.5) + (0.4 if title else 0)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False, layout="constrained")
    for i, ax in enumerate(axes.flat):
        if i >= h:
            ax.axis("off")
            continue
        im = ax.imshow(a[i], cmap=cmap, vmin=0, vmax=1)
        ax.set_title(f"head {i}", fontsize=10)
        _label(ax, t, s, queries if i % ncols == 0 else None, keys, fontsize=ANNOTATION_PT)
        if i % ncols:  # labels on the first column only
            ax.set_yticks([])
            ax.set_ylabel("")
        if i < h - ncols:  # key labels on the bottom row only
            ax.set_xlabel("")
    fig.colorbar(im, ax=axes, shrink=0.9, label="weight")
    if title:
        fig.suptitle(title)
    return fig


def _label(ax, t: int, s: int, queries, keys, fontsize: int = 9) -> None:
    ax.set_xlabel("key (S)")
    ax.set_ylabel("query (T)")
    if keys is None:  # token positions: whole numbers, never matplotlib's half-steps
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        ax.set_xticks(range(s), [str(k) for k in keys], rotation=90 if s > 8 else 0, fontsize=fontsize)
    if queries is None:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        ax.set_yticks(range(t), [str(q) for q in queries], fontsize=fontsize)


# Figure sizes for the site's column -----------------------------------------------


def figsize(aspect: float = 0.6, width: float = COLUMN_INCHES) -> tuple[float, float]:
    """(width, height) in inches for a figure that fits the column: height = aspect * width."""
    if not 0 < width <= COLUMN_INCHES:
        raise ValueError(f"figsize: width must be in (0, {COLUMN_INCHES}] inches, got {width}")
    if aspect <= 0:
        raise ValueError(f"figsize: aspect must be positive, got {aspect}")
    return (width, aspect * width)


def panels(n: int, ncols: int = 2, *, aspect: float = 0.85, **subplots):
    """A figure of `n` panels for the column: `ncols` a row, more break into rows.

    Returns (fig, axes) with `axes` a flat list of the `n` Axes (extra grid cells
    are removed). `aspect` is each panel's height over its width.
    """
    if n < 1 or ncols < 1:
        raise ValueError(f"panels: n and ncols must be positive, got n={n}, ncols={ncols}")
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    panel = COLUMN_INCHES / ncols
    subplots.setdefault("layout", "constrained")
    fig, grid = plt.subplots(nrows, ncols, figsize=(COLUMN_INCHES, nrows * panel * aspect), squeeze=False, **subplots)
    axes = list(grid.flat)
    for ax in axes[n:]:
        ax.remove()
    return fig, axes[:n]
