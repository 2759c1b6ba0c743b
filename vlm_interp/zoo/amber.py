"""The shapes world written in AMBER's data layout, for ``compare --benchmark amber`` with no downloads.

Per scene: a caption query ("Describe the image."; truth = the shapes present, hallu = the absent
co-occurrence partners of present shapes, the objects the organisms are prone to hallucinate); existence
questions about absent shapes (truth "no", partners first, as AMBER's existence questions all are);
attribute questions on a uniquely-shaped object's colour ("Is the circle red?", once right, once with
another colour); and relation questions between two clearly separated objects (``relation_question``,
labelled ``discriminative-relation`` when true and ``relation`` when false, as in AMBER). ``relation.json``
maps every shape to its CHAIR synonyms; ``safe_words.txt`` is empty.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from ..files import atomic_write
from ..hallucination.chair import Vocabulary
from .evaluate import EVAL_SEED
from .organisms import ORGANISM_WORLD
from .pope_set import pope_image_name
from .shapes import World
from .tasks import CAPTION_PROMPT, existence_question, relation_candidates, relation_holds, relation_question

AMBER_IMAGES = 200  # default size of the built-in set
PER_IMAGE = 2  # existence and attribute questions per scene


def _png(scene) -> bytes:
    buf = io.BytesIO()
    scene.pil().save(buf, format="PNG")
    return buf.getvalue()


def amber_set(world: World, n_images: int, seed: int = EVAL_SEED) -> tuple[list[dict], list[dict], list]:
    """(queries, annotations, scenes) of the AMBER-layout set over ``n_images`` scenes drawn with ``seed``."""
    rng = np.random.default_rng([seed, 26])
    scenes = world.scenes(n_images, seed)
    names = [pope_image_name(seed, i) for i in range(n_images)]
    shapes, colors = world.config.shapes, world.config.colors
    queries, notes = [], []

    def add(image: str, query: str, kind: str, truth, hallu=None) -> None:
        qid = len(queries) + 1
        queries.append({"id": qid, "image": image, "query": query})
        notes.append({"id": qid, "type": kind, "truth": truth, **({"hallu": hallu} if hallu is not None else {})})

    for scene, name in zip(scenes, names):  # the captions first, as AMBER numbers them
        present = [s for s in shapes if s in scene.shape_set()]
        partners = [p for p in dict.fromkeys(world.config.partner(s) for s in present) if p and p not in present]
        add(name, CAPTION_PROMPT, "generative", present, partners)
    for scene, name in zip(scenes, names):
        present = scene.shape_set()
        partners = [p for p in dict.fromkeys(world.config.partner(s) for s in sorted(present)) if p and p not in present]
        others = [s for s in shapes if s not in present and s not in partners]
        absent = partners + [others[i] for i in rng.permutation(len(others))]
        for shape in absent[:PER_IMAGE]:
            add(name, existence_question(shape), "discriminative-hallucination", "no")
        unique = scene.unique_indices()
        for k in rng.permutation(len(unique))[:PER_IMAGE // 2 or 1]:
            obj = scene.objects[unique[k]]
            wrong = [c for c in colors if c != obj.color][int(rng.integers(len(colors) - 1))]
            add(name, f"Is the {obj.shape} {obj.color}?", "discriminative-attribute-state", "yes")
            add(name, f"Is the {obj.shape} {wrong}?", "discriminative-attribute-state", "no")
        pairs = relation_candidates(scene, world.config.relation_margin)
        if pairs:
            i, j, rel = pairs[int(rng.integers(len(pairs)))]
            a, b = scene.objects[i], scene.objects[j]
            holds = relation_holds(a, b, rel)
            add(name, relation_question(a.shape, rel, b.shape), "discriminative-relation" if holds else "relation",
                "yes" if holds else "no")
    return queries, notes, scenes


def write_amber(world: World, folder: "str | Path", n_images: int, seed: int = EVAL_SEED) -> Path:
    """Write the set: ``query/query_all.json``, ``annotations.json``, ``relation.json``, ``safe_words.txt``,
    ``image/<name>.png`` and ``images.txt`` (the size, for reuse); every file atomically."""
    folder = Path(folder)
    queries, notes, scenes = amber_set(world, n_images, seed)
    (folder / "image").mkdir(parents=True, exist_ok=True)
    for scene, name in zip(scenes, [pope_image_name(seed, i) for i in range(n_images)]):
        atomic_write(folder / "image" / name, _png(scene))
    (folder / "query").mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "query" / "query_all.json", json.dumps(queries, indent=4))
    atomic_write(folder / "annotations.json", json.dumps(notes, indent=4))
    synonyms = Vocabulary.load("shapes").synonyms
    relation = {s: [w for w in synonyms.get(s, []) if w != s] for s in world.config.shapes}
    atomic_write(folder / "relation.json", json.dumps(relation, indent=4))
    atomic_write(folder / "safe_words.txt", "")
    atomic_write(folder / "images.txt", f"{n_images}\n")
    return folder


def amber_folder(folder: "str | Path", n_images: int | None = None) -> Path:
    """The built-in AMBER-layout set in ``folder`` over ``n_images`` held-out scenes (default 200), reused when
    it is already there at that size."""
    n_images = AMBER_IMAGES if n_images is None else n_images
    if n_images < 1:
        raise ValueError(f"n_images {n_images} must be at least 1")
    folder = Path(folder)
    sized = folder / "images.txt"
    if not (sized.exists() and sized.read_text().strip() == str(n_images)):
        write_amber(World(ORGANISM_WORLD), folder, n_images)
    return folder


__all__ = ["AMBER_IMAGES", "amber_set", "write_amber", "amber_folder"]
