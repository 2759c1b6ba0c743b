"""Does a map find the object? Per-patch effects (traces, attributions) scored against an object's patches."""

from __future__ import annotations

import numpy as np


def auroc(scores, labels) -> float:
    """Area under the ROC curve: the chance a positive outscores a negative (ties count half)."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    pos, neg = scores[labels], scores[~labels]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def patch_labels(positions, object_positions) -> np.ndarray:
    """Boolean per entry of ``positions``: does that visual token belong to the object?"""
    on = set(int(p) for p in object_positions)
    return np.array([int(p) in on for p in positions], bool)


def map_auroc(values, object_positions, positions=None) -> float:
    """AUROC of a per-position map (a DataArray over ``position``, or an array with ``positions``) against an object.

    Works the same for :func:`~vlm_interp.tracing.trace` rows (``tokens="each"``) and for the
    patch maps of :mod:`~vlm_interp.tracing.baselines`: higher values should mean "on the object".
    """
    if positions is None:
        if not hasattr(values, "coords") or "position" not in values.coords:
            raise ValueError("give positions= for a plain array; a DataArray needs a 'position' coordinate")
        positions = [int(p) for p in values.coords["position"].values]
    values = np.asarray(getattr(values, "values", values), float)
    if values.shape != (len(positions),):
        raise ValueError(f"a map of shape {values.shape} for {len(positions)} positions; select one layer first")
    return auroc(values, patch_labels(positions, object_positions))


def patch_neighbourhoods(positions, rows: int, cols: int, radius: int = 1) -> dict[str, list[int]]:
    """For each patch (``positions`` in row-major grid order), the positions of its (2r+1)x(2r+1) neighbourhood.

    Keys are the centre positions as strings, ready for ``trace(..., tokens=...)``; the
    neighbourhood is clipped at the grid's edges.
    """
    positions = list(positions)
    if len(positions) != rows * cols:
        raise ValueError(f"{len(positions)} positions for a {rows}x{cols} grid")
    out = {}
    for k, centre in enumerate(positions):
        r, c = divmod(k, cols)
        out[str(centre)] = [positions[rr * cols + cc]
                            for rr in range(max(0, r - radius), min(rows, r + radius + 1))
                            for cc in range(max(0, c - radius), min(cols, c + radius + 1))]
    return out
