"""Co-occurrence statistics of shapes over scenes: how the planted prior shows in the data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from .scene import Scene
from .world_config import SHAPES, check_name


@dataclass
class Cooccurrence:
    """Presence counts of shapes over a set of scenes (a shape counts once per scene)."""

    shapes: tuple[str, ...]
    n_scenes: int
    present: np.ndarray
    """(k,) number of scenes containing each shape."""
    joint: np.ndarray
    """(k, k) number of scenes containing both shapes (diagonal = present)."""

    def frequency(self) -> np.ndarray:
        """(k,) fraction of scenes containing each shape."""
        return self.present / max(self.n_scenes, 1)

    def conditional(self) -> np.ndarray:
        """(k, k) P(column shape present | row shape present); NaN for unseen rows."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.joint / self.present[:, None]

    def pair_rates(self, pairs: Iterable[tuple[str, str]]) -> tuple[float, float]:
        """Mean conditional co-occurrence over the given (partner) pairs, both directions,
        and over all other ordered pairs of distinct shapes."""
        cond = self.conditional()
        idx = {s: i for i, s in enumerate(self.shapes)}
        is_pair = np.zeros_like(cond, dtype=bool)
        for a, b in pairs:
            is_pair[idx[a], idx[b]] = is_pair[idx[b], idx[a]] = True
        off = ~np.eye(len(self.shapes), dtype=bool)
        return float(np.nanmean(cond[is_pair])), float(np.nanmean(cond[off & ~is_pair]))

    def to_dict(self) -> dict:
        return {
            "shapes": list(self.shapes),
            "n_scenes": self.n_scenes,
            "frequency": self.frequency().round(4).tolist(),
            "conditional": np.nan_to_num(self.conditional()).round(4).tolist(),
        }


def cooccurrence(scenes: Iterable[Scene | Iterable[str]], shapes: Sequence[str] = SHAPES) -> Cooccurrence:
    """Empirical co-occurrence of shapes over scenes (or over iterables of shape names)."""
    idx = {s: i for i, s in enumerate(shapes)}
    k = len(shapes)
    joint = np.zeros((k, k), dtype=np.int64)
    n = 0
    for sc in scenes:
        names = sc.shape_set() if isinstance(sc, Scene) else set(sc)
        v = np.zeros(k, dtype=np.int64)
        for s in names:
            v[idx[check_name(s, shapes, "shape")]] = 1
        joint += np.outer(v, v)
        n += 1
    return Cooccurrence(tuple(shapes), n, joint.diagonal().copy(), joint)


__all__ = ["Cooccurrence", "cooccurrence"]
