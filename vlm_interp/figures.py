"""Figures: matplotlib without a display, atomic saving, and the token groups drawn over the image.

The plots of traces (:mod:`vlm_interp.tracing.plot`), of head scores and of evaluations
all draw through :func:`pyplot` and save through :func:`save_figure`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .example import Example
from .files import atomic_path


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (figures are written to files, never shown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def signed_limits(values) -> tuple[float, float]:
    """Colour limits centred at zero for signed effects: (-m, m) with m the largest magnitude (1e-12 when all zero)."""
    import numpy as np

    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    m = float(np.abs(finite).max()) if finite.size else 0.0
    return -max(m, 1e-12), max(m, 1e-12)


def save_figure(fig, path: "str | Path") -> Path:
    """Save a matplotlib figure atomically (the format follows the file suffix) and close it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=150, bbox_inches="tight")
    finally:
        pyplot().close(fig)
    return Path(path)


def save_object_overlay(ex: Example, tower: str, path: "str | Path", group: str = "object",
                        title: str | None = None) -> Path:
    """Draw the image with the patch boxes of ``tower`` and highlight those in ``group``."""
    from matplotlib.patches import Rectangle

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(np.asarray(ex.image))
    chosen = set(ex.groups.get(tower, {}).get(group, []))
    for pos, (y0, x0, y1, x1) in ex.boxes.get(tower, {}).items():
        hit = pos in chosen
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=hit, alpha=0.35 if hit else 0.6,
                               edgecolor="white", facecolor="yellow", linewidth=0.5))
    ax.set_title(title or f"{tower} tokens in group '{group}'", fontsize=8)
    ax.axis("off")
    return save_figure(fig, Path(path))
