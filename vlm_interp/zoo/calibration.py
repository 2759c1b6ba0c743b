"""Calibration questions: shapes-world examples from a seed disjoint from training and evaluation.

Interventions are fitted (head scores, IRI plans, strengths) on these and reported on the
held-out POPE set (:data:`~vlm_interp.zoo.evaluate.EVAL_SEED`), never on the same questions.
"""

from __future__ import annotations

import numpy as np

from .organisms import ORGANISM_WORLD
from .shapes import World
from .tasks import attribute_qa, existence_qa, relation_qa

CALIBRATION_SEED = 20_011
LEVELS = ("object", "attribute", "relation")  # V-SEAM's semantic levels; object = existence questions


def calibration_qas(level: str = "object", n: int = 100, seed: int = CALIBRATION_SEED, positive_only: bool = False):
    """``n`` (scene, QA) pairs of one semantic level, deterministic from ``seed``."""
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; levels are {LEVELS}")
    world = World(ORGANISM_WORLD)
    rng = np.random.default_rng([seed, LEVELS.index(level)])
    out = []
    for scene in world.iter_scenes(50 * n, seed=seed + LEVELS.index(level)):
        if level == "object":
            qa = existence_qa(world, scene, rng, positive=True if positive_only else None)
        elif level == "attribute":
            qa = attribute_qa(scene, rng)
        else:
            qa = relation_qa(world, scene, rng)
        if qa is not None:
            out.append((scene, qa))
        if len(out) == n:
            return out
    raise ValueError(f"could not draw {n} {level} questions from {50 * n} scenes")


def calibration_examples(vlm, level: str = "object", n: int = 100, seed: int = CALIBRATION_SEED,
                         positive_only: bool = False) -> list[tuple[str, object]]:
    """``(key, Example)`` pairs with answers and, when one object is queried, its ``object`` group."""
    out = []
    for k, (scene, qa) in enumerate(calibration_qas(level, n, seed, positive_only)):
        region = scene.objects[qa.object_index].mask if qa.object_index is not None else None
        ex = vlm.prepare(scene.pil(), qa.question, answer=qa.answer, region=region)
        out.append((f"{level}-{seed}-{k}", ex))
    return out
