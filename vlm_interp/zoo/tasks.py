"""Question answering over shapes-world scenes: the QA record and task vocabulary.

Turns a rendered Scene into ground-truth questions and answers for the four tasks
(existence, attribute, relation, caption): the question templates, the reference
caption, the spatial-relation ground truth, and per-task QA samplers. POPE sets and
minimal pairs build their questions from these templates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .shapes import Scene, SceneObject, World, check_name

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
TASKS: tuple[str, ...] = ("existence", "attribute", "relation", "caption")
# Training-only tasks, not measured in the model cards: stepping stones towards relations. Their
# answers name a side ("left"/"right", ...), so reading where an object is pays off directly; a yes/no
# relation question instead needs where-the-objects-are combined with the relation word (an XOR)
# before any answer improves.
AUX_TASKS: tuple[str, ...] = ("side", "relation_choice")
# For each axis the two sides (y grows downwards), as a side question and as a relation choice names them.
SIDES: dict[str, tuple[str, str]] = {"x": ("left", "right"), "y": ("top", "bottom")}
RELATION_SIDES: dict[str, tuple[str, str]] = {"x": ("left", "right"), "y": ("above", "below")}
CAPTION_PROMPT = "Describe the image."


@dataclass(frozen=True)
class QA:
    """A question about a scene with its ground-truth answer."""

    question: str
    answer: str
    task: str
    object_index: int | None = None
    """Queried object (the subject for relations); None for captions and for shapes that
    are absent or present several times."""
    shape: str | None = None
    color: str | None = None
    relation: str | None = None
    """The relation words; for side and relation-choice questions, the side that is the answer."""
    other_index: int | None = None
    other_shape: str | None = None

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def existence_question(shape: str) -> str:
    return f"Is there a {shape} in the image?"


def color_question(shape: str) -> str:
    return f"What color is the {shape}?"


def relation_question(shape: str, relation: str, other: str) -> str:
    check_name(relation, RELATIONS, "relation")
    return f"Is the {shape} {relation} the {other}?"


def side_question(shape: str, axis: str) -> str:
    check_name(axis, tuple(SIDES), "axis")
    first, second = SIDES[axis]
    return f"Is the {shape} {'on' if axis == 'x' else 'at'} the {first} or the {second}?"


def relation_choice_question(shape: str, axis: str, other: str) -> str:
    check_name(axis, tuple(RELATION_SIDES), "axis")
    first, second = RELATION_SIDES[axis]
    return f"Is the {shape} {first} or {second} {'of ' if axis == 'x' else ''}the {other}?"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene) -> str:
    """Reference caption: objects left to right, e.g. "a red circle, a blue star and an orange cross"."""
    objs = sorted(scene.objects, key=lambda o: (o.x, o.y))
    parts = [f"{_article(o.color)} {o.color} {o.shape}" for o in objs]
    if not parts:
        raise ValueError("cannot caption a scene without objects")
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def relation_holds(a: SceneObject, b: SceneObject, relation: str) -> bool:
    """Ground truth of "a <relation> b" from the centres (image y grows downwards)."""
    check_name(relation, RELATIONS, "relation")
    return {
        "left of": a.x < b.x,
        "right of": a.x > b.x,
        "above": a.y < b.y,
        "below": a.y > b.y,
    }[relation]


def relation_is_clear(a: SceneObject, b: SceneObject, relation: str, margin: float) -> bool:
    """True if the centres differ by at least ``margin`` along the relation's axis."""
    check_name(relation, RELATIONS, "relation")
    d = a.x - b.x if relation in ("left of", "right of") else a.y - b.y
    return abs(d) >= margin


def existence_qa(world: World, scene: Scene, rng: np.random.Generator, positive: bool | None = None) -> QA | None:
    """Yes/no question about a shape; negatives ask about a random absent shape.
    Returns None if the requested polarity is impossible (nothing present/absent)."""
    if positive is None:
        positive = bool(rng.random() < 0.5)
    present = [s for s in world.config.shapes if s in scene.shape_set()]
    if positive:
        if not present:
            return None
        s = present[int(rng.integers(len(present)))]
        idx = [i for i, o in enumerate(scene.objects) if o.shape == s]
        i = idx[0] if len(idx) == 1 else None
        color = scene.objects[i].color if i is not None else None
        return QA(existence_question(s), "yes", "existence", i, s, color)
    absent = [s for s in world.config.shapes if s not in present]
    if not absent:
        return None
    s = absent[int(rng.integers(len(absent)))]
    return QA(existence_question(s), "no", "existence", None, s)


def attribute_qa(scene: Scene, rng: np.random.Generator) -> QA | None:
    """Colour of a shape that occurs exactly once (None if there is none)."""
    uniq = scene.unique_indices()
    if not uniq:
        return None
    i = uniq[int(rng.integers(len(uniq)))]
    o = scene.objects[i]
    return QA(color_question(o.shape), o.color, "attribute", i, o.shape, o.color)


def relation_candidates(scene: Scene, margin: float) -> list[tuple[int, int, str]]:
    """All (i, j, relation) between uniquely-shaped objects that are clear by ``margin``."""
    uniq = scene.unique_indices()
    out = []
    for i in uniq:
        for j in uniq:
            if i == j:
                continue
            for rel in RELATIONS:
                if relation_is_clear(scene.objects[i], scene.objects[j], rel, margin):
                    out.append((i, j, rel))
    return out


def relation_qa(world: World, scene: Scene, rng: np.random.Generator) -> QA | None:
    """Spatial yes/no question between two uniquely-shaped, clearly separated objects."""
    cands = relation_candidates(scene, world.config.relation_margin)
    if not cands:
        return None
    i, j, rel = cands[int(rng.integers(len(cands)))]
    a, b = scene.objects[i], scene.objects[j]
    answer = "yes" if relation_holds(a, b, rel) else "no"
    return QA(relation_question(a.shape, rel, b.shape), answer, "relation", i, a.shape, a.color, rel, j, b.shape)


def side_qa(world: World, scene: Scene, rng: np.random.Generator) -> QA | None:
    """Which half of the image a uniquely-shaped object lies in ("left"/"right" or "top"/"bottom"); asked
    only when its centre is at least half the relation margin away from the middle."""
    half, margin = world.config.canvas / 2, world.config.relation_margin / 2
    cands = [(i, axis) for i in scene.unique_indices() for axis in SIDES
             if abs(getattr(scene.objects[i], axis) - half) >= margin]
    if not cands:
        return None
    i, axis = cands[int(rng.integers(len(cands)))]
    o = scene.objects[i]
    answer = SIDES[axis][int(getattr(o, axis) > half)]
    return QA(side_question(o.shape, axis), answer, "side", i, o.shape, o.color, answer)


def relation_choice_qa(world: World, scene: Scene, rng: np.random.Generator) -> QA | None:
    """Where a uniquely-shaped object lies relative to another ("left"/"right" or "above"/"below"), for
    pairs clearly separated along that axis."""
    cands = sorted({(i, j, "x" if rel in ("left of", "right of") else "y")
                    for i, j, rel in relation_candidates(scene, world.config.relation_margin)})
    if not cands:
        return None
    i, j, axis = cands[int(rng.integers(len(cands)))]
    a, b = scene.objects[i], scene.objects[j]
    answer = RELATION_SIDES[axis][int(getattr(a, axis) > getattr(b, axis))]
    return QA(relation_choice_question(a.shape, axis, b.shape), answer, "relation_choice", i, a.shape, a.color,
              answer, j, b.shape)


def caption_qa(scene: Scene) -> QA:
    return QA(CAPTION_PROMPT, caption(scene), "caption")


def make_qa(world: World, scene: Scene, task: str, rng: np.random.Generator) -> QA | None:
    """One QA of the given task, or None if the scene does not support it."""
    check_name(task, TASKS + AUX_TASKS, "task")
    if task == "side":
        return side_qa(world, scene, rng)
    if task == "relation_choice":
        return relation_choice_qa(world, scene, rng)
    if task == "existence":
        return existence_qa(world, scene, rng)
    if task == "attribute":
        return attribute_qa(scene, rng)
    if task == "relation":
        return relation_qa(world, scene, rng)
    return caption_qa(scene)


def scene_qa(world: World, scene: Scene, rng: np.random.Generator, tasks: Sequence[str] = TASKS) -> list[QA]:
    """One QA per task (skipping tasks the scene cannot support)."""
    out = []
    for t in tasks:
        qa = make_qa(world, scene, t, rng)
        if qa is not None:
            out.append(qa)
    return out


__all__ = [
    "AUX_TASKS",
    "CAPTION_PROMPT",
    "RELATION_SIDES",
    "SIDES",
    "QA",
    "RELATIONS",
    "TASKS",
    "attribute_qa",
    "caption",
    "caption_qa",
    "color_question",
    "existence_qa",
    "existence_question",
    "make_qa",
    "relation_choice_qa",
    "relation_choice_question",
    "relation_candidates",
    "relation_holds",
    "relation_is_clear",
    "relation_qa",
    "relation_question",
    "scene_qa",
    "side_qa",
    "side_question",
]
