"""Procedural "shapes world": seeded scenes of coloured shapes with a known scene graph.

Used to train tiny VLM model organisms and to check that causal tracing finds the
queried object. Every scene keeps its ground truth (object masks, vision patches) and
the data carries a planted co-occurrence prior. This module holds the world itself,
:class:`World`, which samples and renders scenes, and gives the world's other parts
under one name: the vocabulary and configuration (``world_config``), the shapes' masks
(``shape_masks``), the scene graph (``scene``) and co-occurrence statistics
(``cooccurrence``). Questions live in ``tasks``, POPE sets in ``pope`` and minimal
pairs in ``pairs``.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from .cooccurrence import Cooccurrence, cooccurrence
from .scene import Scene, SceneObject
from .shape_masks import SHAPE_FUNCS
from .world_config import COLORS, MAX_OBJECTS, PALETTE, SHAPES, WorldConfig, check_name

Seed = int | tuple[int, ...]
"""An integer seed or a tuple of them (a numpy seed sequence entropy)."""


def as_rng(seed_or_rng: Seed | np.random.Generator | None) -> tuple[np.random.Generator, Seed | None]:
    """A numpy Generator from a seed, a tuple of seeds or a Generator (None: fresh entropy), and the seed it came
    from (None for a Generator or fresh entropy)."""
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
        check_name(shape, self.config.shapes, "shape")
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
        check_name(color, self.config.colors, "color")
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
        rng, seed = as_rng(seed_or_rng)
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
    "as_rng",
    "check_name",
    "cooccurrence",
]
