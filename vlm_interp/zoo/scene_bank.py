"""Pre-rendered training scenes with per-patch targets: which object owns each patch, its shape, colour, place
and contrast, and where the other shapes lie relative to it. The vision stage learns these targets; question
answering draws its scenes from the same bank."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .shapes import Scene, World
from .tasks import RELATIONS, relation_holds


def patch_owners(scene: Scene) -> np.ndarray:
    """(P,) index of the object that owns each patch (covers over 10% of it, and more than any earlier
    object does, so on a tie the earlier object keeps it), -1 for background."""
    owner = np.full(int(np.prod(scene.grid_shape)), -1)
    best = np.zeros(owner.shape)
    for k, o in enumerate(scene.objects):
        cov = np.asarray(o.patch_coverage, dtype=float).reshape(-1)
        take = (cov > 0.1) & (cov > best)
        owner[take] = k
        best = np.maximum(best, cov)
    return owner


def faint_patches(bank: "SceneBank", min_contrast: float) -> torch.Tensor:
    """(N, P) bool: the patches owned (as in ``patch_owners``) by an object of contrast below ``min_contrast``."""
    return (bank.patch_shape > 0) & (bank.patch_contrast < min_contrast)


def visible_presence(bank: "SceneBank", config, min_contrast: float) -> torch.Tensor:
    """(N, n_shapes) float: which shapes the scene holds at contrast ``min_contrast`` or more."""
    out = torch.zeros(bank.presence.shape)
    for i, scene in enumerate(bank.scenes):
        for o in scene.objects:
            if o.contrast >= min_contrast:
                out[i, config.shapes.index(o.shape)] = 1.0
    return out


@dataclass
class SceneBank:
    """Pre-rendered scenes: uint8 images plus per-patch shape/colour targets."""

    scenes: list[Scene]
    images: torch.Tensor  # (N, H, W, 3) uint8
    patch_shape: torch.Tensor  # (N, P) int64, 0 = background, 1 + shape index
    patch_color: torch.Tensor  # (N, P) int64, 0 = background, 1 + colour index
    presence: torch.Tensor  # (N, n_shapes) float
    patch_home: torch.Tensor  # (N, P, 2) int64: (row, column) cell of the owning object's centre, grid = background
    patch_contrast: torch.Tensor  # (N, P) float64: the owning object's contrast, 0 = background

    @classmethod
    def render(cls, world: World, n: int, seed: int, progress: bool = True) -> "SceneBank":
        cfg = world.config
        scenes = list(tqdm(world.iter_scenes(n, seed), total=n, desc="render scenes", disable=not progress,
                           leave=False))
        grid = cfg.grid
        images = np.stack([s.image for s in scenes])
        shape_t = np.zeros((n, grid * grid), np.int64)
        color_t = np.zeros((n, grid * grid), np.int64)
        presence = np.zeros((n, len(cfg.shapes)), np.float32)
        home = np.full((n, grid * grid, 2), grid, np.int64)
        contrast = np.zeros((n, grid * grid), np.float64)
        for i, s in enumerate(scenes):
            owner = patch_owners(s)
            for k, o in enumerate(s.objects):
                shape_t[i, owner == k] = 1 + cfg.shapes.index(o.shape)
                color_t[i, owner == k] = 1 + cfg.colors.index(o.color)
                presence[i, cfg.shapes.index(o.shape)] = 1.0
                home[i, owner == k] = [min(int(o.y // cfg.patch_size), grid - 1), min(int(o.x // cfg.patch_size), grid - 1)]
                contrast[i, owner == k] = o.contrast
        return cls(scenes, torch.from_numpy(images), torch.from_numpy(shape_t), torch.from_numpy(color_t),
                   torch.from_numpy(presence), torch.from_numpy(home), torch.from_numpy(contrast))


def relation_targets(bank: SceneBank, config) -> torch.Tensor:
    """(N, P, 4 * n_shapes) float: for each patch owned by an object A (as in ``patch_shape``), whether
    "A <relation> S" holds for some other object of shape S, relation by relation (``tasks.RELATIONS``);
    -1 where the patch is background (no target)."""
    grid, n_shapes = config.grid, len(config.shapes)
    out = np.full((len(bank.scenes), grid * grid, len(RELATIONS) * n_shapes), -1.0, np.float32)
    for i, s in enumerate(bank.scenes):
        owner = patch_owners(s)
        for k, a in enumerate(s.objects):
            row = np.zeros(len(RELATIONS) * n_shapes, np.float32)
            for m, b in enumerate(s.objects):
                if m != k:
                    for r, rel in enumerate(RELATIONS):
                        if relation_holds(a, b, rel):
                            row[r * n_shapes + config.shapes.index(b.shape)] = 1.0
            out[i, owner == k] = row
    return torch.from_numpy(out)


__all__ = ["SceneBank", "faint_patches", "patch_owners", "relation_targets", "visible_presence"]
