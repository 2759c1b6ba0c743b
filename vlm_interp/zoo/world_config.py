"""The shapes world's vocabulary (shapes, colours) and its configuration, :class:`WorldConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
"""Canonical shape names, in the order used by statistics arrays."""

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (230, 215, 40),
    "purple": (155, 60, 210),
    "orange": (245, 135, 25),
    "white": (235, 235, 235),
    "cyan": (40, 210, 220),
}
"""Every colour a config may use, as RGB."""

COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
"""Default colours of the world (a subset of PALETTE)."""

MAX_OBJECTS = 8
"""Hard upper bound on objects per scene (placement gets unreliable beyond it)."""


def check_name(value: str, allowed: Sequence[str], what: str) -> str:
    """``value`` if it is one of ``allowed``, else a ValueError naming the ``what`` and the choices."""
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {list(allowed)}")
    return value



@dataclass(frozen=True)
class WorldConfig:
    """Every knob of the shapes world; a World is fully determined by this and a seed."""

    canvas: int = 64
    patch_size: int = 8
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = COLORS
    shape_weights: tuple[float, ...] | None = (0.24, 0.20, 0.16, 0.16, 0.12, 0.12)
    """Sampling weight of each shape (normalised); None means uniform. Non-uniform so
    that POPE's "popular" split differs from "random"."""
    n_objects: tuple[int, int] = (1, 4)
    radius_range: tuple[float, float] = (5.0, 8.0)
    contrast_range: tuple[float, float] = (0.85, 1.0)
    p_weak: float = 0.2
    """Probability that an object is weak: small, faint (low contrast) or both."""
    weak_radius_range: tuple[float, float] = (3.0, 4.0)
    weak_contrast_range: tuple[float, float] = (0.3, 0.5)
    cooccur_pairs: tuple[tuple[str, str], ...] = (
        ("circle", "square"),
        ("star", "triangle"),
        ("cross", "diamond"),
    )
    p_cooccur: float = 0.8
    """When a shape with a partner is drawn and there is room, its partner is added
    with this probability (the planted language prior)."""
    p_weak_partner: float | None = None
    """Probability that an object pulled in as a partner is weak (None: p_weak, as for every
    object). Higher than p_weak, it makes the prior pay off in training: a faint partner is
    often known only from the object it co-occurs with, as a fork is from the table."""
    min_gap: float = 2.0
    """Minimum distance in px between the bounding circles of two objects."""
    relation_margin: float = 8.0
    """Two objects are "left of"/"above" each other only if their centres differ by
    at least this many px along that axis (else no relation question is asked)."""
    background_level: int = 14
    background_noise: int = 6
    """Half-width of the uniform integer background noise in intensity levels (0 disables it)."""
    max_placement_tries: int = 200

    def __post_init__(self) -> None:
        if self.canvas <= 0 or self.patch_size <= 0 or self.canvas % self.patch_size:
            raise ValueError(
                f"canvas {self.canvas} must be a positive multiple of patch_size {self.patch_size}"
            )
        if not self.shapes:
            raise ValueError("shapes must not be empty")
        for s in self.shapes:
            check_name(s, SHAPES, "shape")
        if len(set(self.shapes)) != len(self.shapes):
            raise ValueError(f"duplicate shapes in {self.shapes}")
        if not self.colors:
            raise ValueError("colors must not be empty")
        for c in self.colors:
            check_name(c, tuple(PALETTE), "color")
        if self.shape_weights is not None:
            if len(self.shape_weights) != len(self.shapes):
                raise ValueError(
                    f"shape_weights has {len(self.shape_weights)} entries for {len(self.shapes)} shapes"
                )
            if min(self.shape_weights) < 0 or sum(self.shape_weights) <= 0:
                raise ValueError(f"shape_weights {self.shape_weights} must be >= 0 with a positive sum")
        lo, hi = self.n_objects
        if not (1 <= lo <= hi <= MAX_OBJECTS):
            raise ValueError(f"n_objects {self.n_objects} out of range: need 1 <= min <= max <= {MAX_OBJECTS}")
        for name in ("radius_range", "weak_radius_range"):
            a, b = getattr(self, name)
            if not (0 < a <= b <= self.canvas / 2):
                raise ValueError(f"{name} {(a, b)} must satisfy 0 < min <= max <= canvas/2")
        for name in ("contrast_range", "weak_contrast_range"):
            a, b = getattr(self, name)
            if not (0 < a <= b <= 1):
                raise ValueError(f"{name} {(a, b)} must satisfy 0 < min <= max <= 1")
        for name in ("p_weak", "p_cooccur", "p_weak_partner"):
            p = getattr(self, name)
            if p is not None and not 0 <= p <= 1:
                raise ValueError(f"{name} {p} must be in [0, 1]")
        seen: set[str] = set()
        for pair in self.cooccur_pairs:
            if len(pair) != 2 or pair[0] == pair[1]:
                raise ValueError(f"co-occurrence pair {pair!r} must be two different shapes")
            for s in pair:
                check_name(s, self.shapes, "shape in cooccur_pairs")
                if s in seen:
                    raise ValueError(f"shape {s!r} appears in more than one co-occurrence pair")
                seen.add(s)
        if self.min_gap < 0 or self.relation_margin < 0:
            raise ValueError(f"min_gap {self.min_gap} and relation_margin {self.relation_margin} must be >= 0")
        if not 0 <= self.background_noise <= self.background_level <= 255 - self.background_noise:
            raise ValueError(
                f"background_level {self.background_level} +- background_noise {self.background_noise} "
                "must stay within 0..255"
            )

    @property
    def grid(self) -> int:
        """Patches per side of the vision grid."""
        return self.canvas // self.patch_size

    def partner(self, shape: str) -> str | None:
        """The planted co-occurrence partner of ``shape`` (None if it has none)."""
        check_name(shape, self.shapes, "shape")
        for a, b in self.cooccur_pairs:
            if shape == a:
                return b
            if shape == b:
                return a
        return None



__all__ = ["COLORS", "MAX_OBJECTS", "PALETTE", "SHAPES", "WorldConfig", "check_name"]
