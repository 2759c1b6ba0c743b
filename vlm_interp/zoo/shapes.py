"""Procedural "shapes world": seeded scenes of coloured shapes with a known scene graph.

Used to train tiny VLM model organisms and to check that causal tracing finds the
queried object. Every scene keeps its ground truth (object masks, vision patches) and
the data carries a planted co-occurrence prior. This module holds the world itself:
vocabulary, configuration, rendering (World / Scene) and co-occurrence statistics.
Questions live in ``tasks``, POPE sets in ``pope`` and minimal pairs in ``pairs``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

# --------------------------------------------------------------------------- vocabulary

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


def _check_name(value: str, allowed: Sequence[str], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {list(allowed)}")
    return value


# --------------------------------------------------------------------------- configuration


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
            _check_name(s, SHAPES, "shape")
        if len(set(self.shapes)) != len(self.shapes):
            raise ValueError(f"duplicate shapes in {self.shapes}")
        if not self.colors:
            raise ValueError("colors must not be empty")
        for c in self.colors:
            _check_name(c, tuple(PALETTE), "color")
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
                _check_name(s, self.shapes, "shape in cooccur_pairs")
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
        _check_name(shape, self.shapes, "shape")
        for a, b in self.cooccur_pairs:
            if shape == a:
                return b
            if shape == b:
                return a
        return None


# --------------------------------------------------------------------------- shape masks
# Each function takes coordinates normalised by the radius (dx, dy broadcastable,
# y pointing down) and returns the inside mask. All shapes fit in the unit circle,
# so the radius is a bounding radius and non-overlap reduces to circle distances.

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


# --------------------------------------------------------------------------- scene graph


@dataclass(eq=False)
class SceneObject:
    """One object of a scene: what it is, where it is, and which pixels/patches it covers."""

    shape: str
    color: str
    radius: float
    x: float
    """Centre column in px (continuous; pixel j has centre j + 0.5)."""
    y: float
    """Centre row in px (y grows downwards)."""
    contrast: float
    weak: bool
    mask: np.ndarray
    """Boolean (H, W): pixels painted by this object."""
    patches: tuple[int, ...]
    """Row-major indices of vision patches holding at least one pixel of the mask."""
    patch_coverage: np.ndarray
    """Float (grid, grid): fraction of each patch's pixels covered by the mask."""

    @property
    def size(self) -> float:
        """Alias of ``radius`` (bounding radius in px)."""
        return self.radius

    @property
    def center(self) -> tuple[float, float]:
        return (self.x, self.y)

    def describe(self) -> dict:
        """JSON-friendly description (everything except the mask arrays)."""
        return {
            "shape": self.shape,
            "color": self.color,
            "radius": float(self.radius),
            "x": float(self.x),
            "y": float(self.y),
            "contrast": float(self.contrast),
            "weak": bool(self.weak),
            "patches": list(self.patches),
        }


@dataclass(eq=False)
class Scene:
    """A rendered scene and its scene graph."""

    objects: list[SceneObject]
    image: np.ndarray
    """uint8 (H, W, 3)."""
    patch_size: int
    background_seed: int
    """Seed of the background noise, so edited scenes can reuse it exactly."""
    seed: int | tuple[int, ...] | None = None
    """The seed the scene was drawn from, if any: ``world.scene(scene.seed)`` redraws it."""

    def pil(self) -> Image.Image:
        return Image.fromarray(self.image, mode="RGB")

    @property
    def grid_shape(self) -> tuple[int, int]:
        h, w = self.image.shape[:2]
        return (h // self.patch_size, w // self.patch_size)

    def patch_mask(self, obj_index: int) -> np.ndarray:
        """Bool (grid_h, grid_w): patches covered by object ``obj_index``."""
        if not 0 <= obj_index < len(self.objects):
            raise ValueError(f"obj_index {obj_index} out of range for {len(self.objects)} objects")
        return self.objects[obj_index].patch_coverage > 0

    @property
    def shapes(self) -> list[str]:
        return [o.shape for o in self.objects]

    def shape_set(self) -> set[str]:
        return {o.shape for o in self.objects}

    def count(self, shape: str) -> int:
        return sum(o.shape == shape for o in self.objects)

    def unique_indices(self) -> list[int]:
        """Indices of objects whose shape occurs exactly once (identifiable by name)."""
        return [i for i, o in enumerate(self.objects) if self.count(o.shape) == 1]

    def index_of(self, shape: str) -> int:
        """Index of the single object with this shape (ValueError if 0 or several)."""
        idx = [i for i, o in enumerate(self.objects) if o.shape == shape]
        if len(idx) != 1:
            raise ValueError(f"shape {shape!r} occurs {len(idx)} times, not exactly once")
        return idx[0]

    def graph(self) -> list[dict]:
        """The scene graph without masks, for comparisons and JSON."""
        return [o.describe() for o in self.objects]


# --------------------------------------------------------------------------- the world


Seed = int | tuple[int, ...]
"""An integer seed or a tuple of them (a numpy seed sequence entropy)."""


def _as_rng(seed_or_rng: Seed | np.random.Generator | None) -> tuple[np.random.Generator, Seed | None]:
    if isinstance(seed_or_rng, np.random.Generator):
        return seed_or_rng, None
    if seed_or_rng is None:
        return np.random.default_rng(), None
    if isinstance(seed_or_rng, (int, np.integer)):
        return np.random.default_rng(int(seed_or_rng)), int(seed_or_rng)
    if isinstance(seed_or_rng, (tuple, list)) and all(isinstance(v, (int, np.integer)) for v in seed_or_rng):
        seed = tuple(int(v) for v in seed_or_rng)
        return np.random.default_rng(list(seed)), seed
    raise ValueError(f"expected an int seed, a tuple of ints or a numpy Generator, got {seed_or_rng!r}")


class World:
    """Samples and renders scenes of a WorldConfig; all randomness comes from the seed."""

    def __init__(self, config: WorldConfig | None = None) -> None:
        self.config = config or WorldConfig()
        c = self.config
        self._centers = np.arange(c.canvas, dtype=np.float32) + 0.5  # pixel centres
        w = np.ones(len(c.shapes)) if c.shape_weights is None else np.asarray(c.shape_weights, float)
        self._shape_cdf = np.cumsum(w / w.sum())
        self._rgb = {name: np.asarray(PALETTE[name], dtype=np.float32) for name in c.colors}
        self._stats_cache: dict[tuple[int, int], Cooccurrence] = {}

    # ---- composition (no pixels) ---------------------------------------------------

    def _draw_shape(self, rng: np.random.Generator) -> str:
        i = int(np.searchsorted(self._shape_cdf, rng.random(), side="right"))
        return self.config.shapes[min(i, len(self.config.shapes) - 1)]

    def sample_shapes(self, rng: np.random.Generator, n_objects: int) -> list[str]:
        """Draw the shapes of a scene under the planted prior: each drawn shape pulls in
        its partner with probability p_cooccur (if there is room and it is absent)."""
        return [s for s, _ in self._sample_shapes_marked(rng, n_objects)]

    def _sample_shapes_marked(self, rng: np.random.Generator, n_objects: int) -> list[tuple[str, bool]]:
        """sample_shapes, each shape marked True when it was pulled in as a partner."""
        shapes: list[tuple[str, bool]] = []
        while len(shapes) < n_objects:
            s = self._draw_shape(rng)
            shapes.append((s, False))
            p = self.config.partner(s)
            if p is not None and len(shapes) < n_objects and all(p != t for t, _ in shapes):
                if rng.random() < self.config.p_cooccur:
                    shapes.append((p, True))
        return shapes

    def _draw_n(self, rng: np.random.Generator, n_objects: int | None) -> int:
        lo, hi = self.config.n_objects
        if n_objects is None:
            return int(rng.integers(lo, hi + 1))
        if not lo <= n_objects <= hi:
            raise ValueError(f"n_objects {n_objects} out of range {self.config.n_objects}")
        return int(n_objects)

    # ---- rendering -----------------------------------------------------------------

    def background(self, background_seed: int) -> np.ndarray:
        """uint8 (H, W, 3) dark background; uniform integer noise of +-background_noise
        levels drawn from ``background_seed`` (integer draws are the fast ones)."""
        c = self.config
        shape = (c.canvas, c.canvas, 3)
        if c.background_noise == 0:
            return np.full(shape, c.background_level, dtype=np.uint8)
        rng = np.random.default_rng(background_seed)
        bg = rng.integers(0, 2 * c.background_noise + 1, size=shape, dtype=np.uint8)
        bg += np.uint8(c.background_level - c.background_noise)
        return bg

    def object_mask(self, shape: str, radius: float, x: float, y: float) -> np.ndarray:
        """Bool (H, W) mask of a shape, evaluated only inside its bounding box."""
        _check_name(shape, self.config.shapes, "shape")
        n = self.config.canvas
        x0, x1 = max(0, int(x - radius) - 1), min(n, int(x + radius) + 2)
        y0, y1 = max(0, int(y - radius) - 1), min(n, int(y + radius) + 2)
        mask = np.zeros((n, n), dtype=bool)
        if x0 < x1 and y0 < y1:
            dx = (self._centers[x0:x1] - x) / radius
            dy = (self._centers[y0:y1] - y) / radius
            mask[y0:y1, x0:x1] = SHAPE_FUNCS[shape](dx[None, :], dy[:, None])
        return mask

    def make_object(
        self,
        shape: str,
        color: str,
        radius: float,
        x: float,
        y: float,
        contrast: float = 1.0,
        weak: bool = False,
    ) -> SceneObject:
        """Build a SceneObject with its mask and patch coverage computed."""
        _check_name(color, self.config.colors, "color")
        mask = self.object_mask(shape, radius, x, y)
        if not mask.any():
            raise ValueError(f"{shape} of radius {radius} at ({x}, {y}) covers no pixel")
        g, p = self.config.grid, self.config.patch_size
        coverage = mask.reshape(g, p, g, p).mean(axis=(1, 3))
        patches = tuple(int(i) for i in np.flatnonzero(coverage))
        return SceneObject(shape, color, float(radius), float(x), float(y), float(contrast),
                           bool(weak), mask, patches, coverage)

    def compose(self, objects: Sequence[SceneObject], background_seed: int, seed: Seed | None = None) -> Scene:
        """Render objects (in order) over the background of ``background_seed``; each
        object blends its colour into its mask pixels with weight ``contrast``."""
        img = self.background(background_seed)
        for o in objects:
            rgb = self._rgb.get(o.color)
            if rgb is None:
                raise ValueError(f"unknown color {o.color!r}; expected one of {list(self.config.colors)}")
            sel = img[o.mask].astype(np.float32)
            img[o.mask] = np.rint(sel + (rgb - sel) * np.float32(o.contrast)).astype(np.uint8)
        return Scene(list(objects), img, self.config.patch_size, int(background_seed), seed)

    # ---- sampling ------------------------------------------------------------------

    def _place(self, rng: np.random.Generator, radii: Sequence[float]) -> list[tuple[float, float]]:
        """Reject-sample centres so that bounding circles keep ``min_gap`` apart."""
        c = self.config
        for _ in range(20):
            placed: list[tuple[float, float, float]] = []
            for r in radii:
                for _ in range(c.max_placement_tries):
                    x, y = rng.uniform(r, c.canvas - r, size=2)
                    if all((x - px) ** 2 + (y - py) ** 2 >= (r + pr + c.min_gap) ** 2 for px, py, pr in placed):
                        placed.append((float(x), float(y), r))
                        break
                else:
                    break
            if len(placed) == len(radii):
                return [(x, y) for x, y, _ in placed]
        raise RuntimeError(
            f"could not place {len(radii)} objects of radii {list(radii)} on a {c.canvas}px canvas; "
            "lower n_objects, radius_range or min_gap"
        )

    def scene(self, seed_or_rng: Seed | np.random.Generator | None = None, n_objects: int | None = None) -> Scene:
        """Draw one scene; the same seed always gives the same scene (pixels and graph)."""
        rng, seed = _as_rng(seed_or_rng)
        c = self.config
        shapes = self._sample_shapes_marked(rng, self._draw_n(rng, n_objects))
        specs = []
        for s, pulled in shapes:
            color = c.colors[int(rng.integers(len(c.colors)))]
            p_weak = c.p_weak_partner if pulled and c.p_weak_partner is not None else c.p_weak
            weak = bool(rng.random() < p_weak)
            kind = int(rng.integers(3)) if weak else -1  # 0 small, 1 faint, 2 both
            r_lo, r_hi = c.weak_radius_range if kind in (0, 2) else c.radius_range
            c_lo, c_hi = c.weak_contrast_range if kind in (1, 2) else c.contrast_range
            specs.append((s, color, float(rng.uniform(r_lo, r_hi)), float(rng.uniform(c_lo, c_hi)), weak))
        centres = self._place(rng, [sp[2] for sp in specs])
        objects = [
            self.make_object(s, col, r, x, y, con, weak)
            for (s, col, r, con, weak), (x, y) in zip(specs, centres)
        ]
        return self.compose(objects, int(rng.integers(2**31 - 1)), seed)

    def iter_scenes(self, n: int, seed: int = 0) -> Iterator[Scene]:
        """Scene i is drawn from the seed (seed, i), so ``world.scene((seed, i))`` redraws it."""
        if n < 0:
            raise ValueError(f"n {n} must be >= 0")
        for i in range(n):
            yield self.scene((seed, i))

    def scenes(self, n: int, seed: int = 0) -> list[Scene]:
        return list(self.iter_scenes(n, seed))

    # ---- training-distribution statistics ---------------------------------------------

    def shape_stats(self, n: int = 4000, seed: int = 0) -> "Cooccurrence":
        """Co-occurrence statistics of the training distribution, from ``n`` sampled
        compositions (shapes only, no rendering); cached per (n, seed)."""
        key = (n, seed)
        if key not in self._stats_cache:
            rng = np.random.default_rng([seed, 0xC0])
            sets = (self.sample_shapes(rng, self._draw_n(rng, None)) for _ in range(n))
            self._stats_cache[key] = cooccurrence(sets, self.config.shapes)
        return self._stats_cache[key]


# --------------------------------------------------------------------------- statistics


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
            v[idx[_check_name(s, shapes, "shape")]] = 1
        joint += np.outer(v, v)
        n += 1
    return Cooccurrence(tuple(shapes), n, joint.diagonal().copy(), joint)


__all__ = [
    "COLORS",
    "Cooccurrence",
    "MAX_OBJECTS",
    "PALETTE",
    "SHAPES",
    "SHAPE_FUNCS",
    "Scene",
    "SceneObject",
    "Seed",
    "World",
    "WorldConfig",
    "cooccurrence",
]
