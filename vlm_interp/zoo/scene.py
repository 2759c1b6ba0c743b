"""A rendered shapes-world scene and its scene graph: :class:`Scene` and its :class:`SceneObject` records."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


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


__all__ = ["Scene", "SceneObject"]
