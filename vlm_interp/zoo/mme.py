"""The shapes world written in MME's release layout (hallucination subsets), for ``compare --benchmark mme``.

Subtasks ``existence`` (a present shape: Yes; an absent one, its co-occurrence partner when absent: No),
``color`` (a uniquely-shaped object's colour, right: Yes, another colour: No) and ``position`` (two clearly
separated objects, the relation that holds: Yes, its opposite: No). No organism is trained to count, so
there is no ``count`` subtask. Each subtask folder holds ``NAME.png`` and ``NAME.txt`` with two lines
``question<TAB>Yes|No``. The questions are asked as the organisms were trained, without MME's suffix
" Please answer yes or no." (the organisms answer it with a side, "left" or "right"); ``suffix=`` adds it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..files import atomic_write
from .amber import _png
from .evaluate import EVAL_SEED
from .organisms import ORGANISM_WORLD
from .pope_set import pope_image_name
from .shapes import World
from .tasks import existence_question, relation_candidates, relation_holds, relation_question

MME_IMAGES = 200
MME_SUBTASKS = ("existence", "color", "position")
SUFFIX = " Please answer yes or no."  # MME's own; not in the built-in set by default
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def mme_pairs(world: World, scene, rng: np.random.Generator) -> dict[str, list[tuple[str, str]]]:
    """The (question, Yes|No) pair of each subtask that this scene can pose."""
    out: dict[str, list[tuple[str, str]]] = {}
    present = sorted(scene.shape_set())
    absent = [s for s in world.config.shapes if s not in scene.shape_set()]
    if present and absent:
        yes = present[int(rng.integers(len(present)))]
        partner = world.config.partner(yes)
        no = partner if partner in absent else absent[int(rng.integers(len(absent)))]
        out["existence"] = [(existence_question(yes), "Yes"), (existence_question(no), "No")]
    unique = scene.unique_indices()
    if unique:
        obj = scene.objects[unique[int(rng.integers(len(unique)))]]
        colors = [c for c in world.config.colors if c != obj.color]
        wrong = colors[int(rng.integers(len(colors)))]
        out["color"] = [(f"Is the {obj.shape} {obj.color}?", "Yes"), (f"Is the {obj.shape} {wrong}?", "No")]
    pairs = [p for p in relation_candidates(scene, world.config.relation_margin)
             if relation_holds(scene.objects[p[0]], scene.objects[p[1]], p[2])]
    if pairs:
        i, j, rel = pairs[int(rng.integers(len(pairs)))]
        a, b = scene.objects[i].shape, scene.objects[j].shape
        out["position"] = [(relation_question(a, rel, b), "Yes"), (relation_question(a, OPPOSITE[rel], b), "No")]
    return out


def write_mme(world: World, folder: "str | Path", n_images: int, seed: int = EVAL_SEED, suffix: str = "") -> Path:
    """Write up to ``n_images`` scenes per subtask (a scene that cannot pose a subtask's pair is left out)."""
    folder = Path(folder)
    rng = np.random.default_rng([seed, 27])
    for k, scene in enumerate(world.scenes(n_images, seed)):
        stem = pope_image_name(seed, k).rsplit(".", 1)[0]
        for subtask, pair in mme_pairs(world, scene, rng).items():
            (folder / subtask).mkdir(parents=True, exist_ok=True)
            atomic_write(folder / subtask / f"{stem}.png", _png(scene))
            atomic_write(folder / subtask / f"{stem}.txt", "".join(f"{q}{suffix}\t{a}\n" for q, a in pair))
    atomic_write(folder / "images.txt", f"{n_images}\n")
    return folder


def mme_folder(folder: "str | Path", n_images: int | None = None) -> Path:
    """The built-in MME-layout set in ``folder`` over ``n_images`` held-out scenes (default 200), reused at that size."""
    n_images = MME_IMAGES if n_images is None else n_images
    if n_images < 1:
        raise ValueError(f"n_images {n_images} must be at least 1")
    folder = Path(folder)
    sized = folder / "images.txt"
    if not (sized.exists() and sized.read_text().strip() == str(n_images)):
        write_mme(World(ORGANISM_WORLD), folder, n_images)
    return folder


__all__ = ["MME_IMAGES", "MME_SUBTASKS", "mme_pairs", "write_mme", "mme_folder"]
