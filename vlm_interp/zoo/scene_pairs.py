"""Minimal pairs of shapes-world scenes for causal tracing and patching.

Edits exactly one thing of a scene (replace or remove an object, recolour it, or swap
two objects' places) while keeping the background and every other object identical, and
returns the clean/corrupt pair with the exact mask of changed pixels and the questions
whose answers the edit flips.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .shapes import Scene, SceneObject, World, as_rng, check_name
from .tasks import (
    CAPTION_PROMPT,
    caption,
    color_question,
    existence_question,
    relation_candidates,
    relation_holds,
    relation_question,
)

PAIR_LEVELS: tuple[str, ...] = ("object", "attribute", "relation")


class NoMinimalPairError(ValueError):
    """The scene has no object (or pair of objects) that the requested edit can use."""


@dataclass(frozen=True)
class PairQuestion:
    """A question whose answer differs between the clean and the corrupt scene."""

    task: str
    question: str
    clean_answer: str
    corrupt_answer: str


@dataclass(eq=False)
class MinimalPair:
    """Clean/corrupt scenes differing by one semantic edit, with the changed pixels."""

    clean: Scene
    corrupt: Scene
    level: str
    kind: str
    """"replace" or "remove" (object), "recolor" (attribute), "swap" (relation)."""
    change: dict
    mask: np.ndarray
    """Bool (H, W): union of old and new masks of the edited objects; the two images
    are identical outside it."""
    questions: list[PairQuestion]
    object_indices: tuple[int, ...]
    """Indices (in the clean scene) of the edited objects."""

    def patch_mask(self) -> np.ndarray:
        """Bool (grid_h, grid_w): patches containing at least one changed-mask pixel."""
        gh, gw = self.clean.grid_shape
        p = self.clean.patch_size
        return self.mask.reshape(gh, p, gw, p).any(axis=(1, 3))


_PAIR_KINDS = {"object": ("replace", "remove"), "attribute": ("recolor",), "relation": ("swap",)}


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def _swap_ok(world: World, objs: list[SceneObject], i: int, j: int) -> bool:
    """Whether objects i and j can trade centres and stay in-canvas and non-overlapping."""
    c = world.config
    moved = {i: (objs[j].x, objs[j].y), j: (objs[i].x, objs[i].y)}
    for k, (x, y) in moved.items():
        r = objs[k].radius
        if not (r <= x <= c.canvas - r and r <= y <= c.canvas - r):
            return False
        for m, o in enumerate(objs):
            if m in moved:
                continue
            if (x - o.x) ** 2 + (y - o.y) ** 2 < (r + o.radius + c.min_gap) ** 2:
                return False
    return True


def minimal_pair(world: World, scene: Scene, level: str, rng: np.random.Generator | int,
                 kind: str | None = None) -> MinimalPair:
    """Edit one thing of ``scene`` and return the pair with its ground-truth change.

    object: replace a uniquely-shaped object by an absent shape (same colour, size,
    place), or remove it (kind="remove"); attribute: recolour a uniquely-shaped object;
    relation: two uniquely-shaped, clearly separated objects swap centres. The
    background (same noise seed) and all other objects are untouched, so the images
    differ only inside ``mask``. Raises NoMinimalPairError if the scene cannot support
    the edit.
    """
    check_name(level, PAIR_LEVELS, "level")
    kind = kind or _PAIR_KINDS[level][0]
    check_name(kind, _PAIR_KINDS[level], f"kind for level {level!r}")
    rng, _ = as_rng(rng)
    c = world.config
    objs = list(scene.objects)
    uniq = scene.unique_indices()

    if level == "relation":
        cands = [(i, j, rel) for i, j, rel in relation_candidates(scene, c.relation_margin)
                 if i < j and _swap_ok(world, objs, i, j)]
        if not cands:
            raise NoMinimalPairError("no two uniquely-shaped, clearly separated objects can swap places")
        i, j, rel = _pick(rng, cands)
        a, b = objs[i], objs[j]
        new_a = world.make_object(a.shape, a.color, a.radius, b.x, b.y, a.contrast, a.weak)
        new_b = world.make_object(b.shape, b.color, b.radius, a.x, a.y, b.contrast, b.weak)
        objs[i], objs[j] = new_a, new_b
        mask = a.mask | b.mask | new_a.mask | new_b.mask
        clean_ans = relation_holds(a, b, rel)
        q = relation_question(a.shape, rel, b.shape)
        questions = [PairQuestion("relation", q, "yes" if clean_ans else "no", "no" if clean_ans else "yes")]
        change = {"swap": [a.shape, b.shape], "relation": rel}
        indices: tuple[int, ...] = (i, j)
    else:
        if not uniq:
            raise NoMinimalPairError("no object has a shape that occurs exactly once")
        if kind == "remove" and len(objs) < 2:
            raise NoMinimalPairError("cannot remove the only object of a scene")
        i = _pick(rng, uniq)
        old = objs[i]
        indices = (i,)
        if kind == "recolor":
            new_color = _pick(rng, [col for col in c.colors if col != old.color])
            new = world.make_object(old.shape, new_color, old.radius, old.x, old.y, old.contrast, old.weak)
            objs[i] = new
            mask = old.mask | new.mask
            change = {"from": old.color, "to": new_color, "shape": old.shape}
            questions = [PairQuestion("attribute", color_question(old.shape), old.color, new_color)]
        elif kind == "replace":
            absent = [s for s in c.shapes if s not in scene.shape_set()]
            if not absent:
                raise NoMinimalPairError("every shape is already present; nothing to replace with")
            to = _pick(rng, absent)
            new = world.make_object(to, old.color, old.radius, old.x, old.y, old.contrast, old.weak)
            objs[i] = new
            mask = old.mask | new.mask
            change = {"from": old.shape, "to": to, "color": old.color}
            questions = [
                PairQuestion("existence", existence_question(old.shape), "yes", "no"),
                PairQuestion("existence", existence_question(to), "no", "yes"),
            ]
        else:  # remove
            del objs[i]
            mask = old.mask.copy()
            change = {"from": old.shape, "to": None, "color": old.color}
            questions = [PairQuestion("existence", existence_question(old.shape), "yes", "no")]
    corrupt = world.compose(objs, scene.background_seed)
    questions.append(PairQuestion("caption", CAPTION_PROMPT, caption(scene), caption(corrupt)))
    return MinimalPair(scene, corrupt, level, kind, change, mask, questions, indices)


__all__ = [
    "MinimalPair",
    "NoMinimalPairError",
    "PAIR_LEVELS",
    "PairQuestion",
    "minimal_pair",
]
