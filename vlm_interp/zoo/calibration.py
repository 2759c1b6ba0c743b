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


def calibration_pairs(vlm, level: str = "object", n: int = 50, seed: int = CALIBRATION_SEED) -> list[tuple[str, object]]:
    """``n`` shapes-world minimal pairs of one level as ``(key, make_pair)``, for dataset tracing.

    The scenes are the calibration ones (``seed``); each pair edits one thing (``object``: an object
    replaced by an absent shape; ``attribute``: recoloured; ``relation``: two objects swap places), and
    ``make_pair()`` prepares its clean and corrupt examples with the first question whose answer the
    edit flips, only when it is called (a resumed run prepares nothing it has traced).
    """
    from ..corruptions import from_shapes_pair
    from .scene_pairs import NoMinimalPairError, minimal_pair

    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; levels are {LEVELS}")
    world = World(ORGANISM_WORLD)
    rng = np.random.default_rng([seed, LEVELS.index(level), 1])
    out = []
    for k, scene in enumerate(world.iter_scenes(50 * n, seed=seed + LEVELS.index(level))):
        try:
            pair = minimal_pair(world, scene, level, rng)
        except NoMinimalPairError:
            continue
        out.append((f"{level}-pair-{seed}-{k}", lambda pair=pair: from_shapes_pair(vlm, pair, 0)))
        if len(out) == n:
            return out
    raise ValueError(f"could not draw {n} {level} minimal pairs from {50 * n} scenes")
