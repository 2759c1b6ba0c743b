"""The shapes' masks: which pixels each shape covers.

Each function takes coordinates normalised by the radius (dx, dy broadcastable,
y pointing down) and returns the inside mask. All shapes fit in the unit circle,
so the radius is a bounding radius and non-overlap reduces to circle distances.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

_SQ = 1.0 / math.sqrt(2.0)
_STAR_SECTOR = 2.0 * math.pi / 5.0
_STAR_INNER = 0.45
_STAR_B = (_STAR_INNER * math.cos(math.pi / 5), _STAR_INNER * math.sin(math.pi / 5))
_STAR_E = (_STAR_B[0] - 1.0, _STAR_B[1])


def _circle(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    return dx * dx + dy * dy <= 1.0


def _square(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    return (np.abs(dx) <= _SQ) & (np.abs(dy) <= _SQ)


def _diamond(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    return np.abs(dx) + np.abs(dy) <= 1.0


def _triangle(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    # Equilateral, apex up, circumradius 1: three half-planes at inradius 0.5.
    h = 0.5 * dy
    return (dy <= 0.5) & (0.8660254 * dx - h <= 0.5) & (-0.8660254 * dx - h <= 0.5)


def _cross(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    ax, ay = np.abs(dx), np.abs(dy)
    w, arm = 0.32, 0.94
    return ((ax <= w) & (ay <= arm)) | ((ay <= w) & (ax <= arm))


def _star(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    # Five-pointed star, one point up: fold the angle into one half-spike and test
    # against the edge from the outer tip (1, 0) to the inner vertex.
    theta = np.arctan2(dx, -dy) % _STAR_SECTOR
    t = np.minimum(theta, _STAR_SECTOR - theta)
    rho = np.sqrt(dx * dx + dy * dy)
    qx, qy = rho * np.cos(t), rho * np.sin(t)
    return _STAR_E[0] * qy - _STAR_E[1] * (qx - 1.0) >= 0.0


SHAPE_FUNCS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "star": _star,
    "cross": _cross,
    "diamond": _diamond,
}


__all__ = ["SHAPE_FUNCS"]
