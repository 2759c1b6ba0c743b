"""POPE-style object-hallucination benchmark sets built from the shapes world.

Draws scenes, asks balanced yes/no existence questions per image with negatives chosen
by the random, popular or adversarial (co-occurrence prior) strategy, and writes a set
to disk (PNG images, one JSON-lines file per split, captions for CHAIR) with atomic
writes; ``read_jsonl`` reads those files back.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..files import atomic_write, jsonl_rows, jsonl_text
from .shapes import Cooccurrence, Scene, World, check_name
from .tasks import caption, existence_question

POPE_SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")


@dataclass(frozen=True)
class PopeQuestion:
    """One POPE item; ``to_json`` gives the standard four-key layout."""

    question_id: int
    image: str
    text: str
    label: str
    shape: str
    scene_index: int

    def to_json(self) -> dict:
        return {"question_id": self.question_id, "image": self.image, "text": self.text, "label": self.label}


@dataclass
class PopeSet:
    """The scenes, image file names and questions of one POPE split."""

    split: str
    scenes: list[Scene]
    image_names: list[str]
    questions: list[PopeQuestion]


def pope_image_name(seed: int, index: int) -> str:
    return f"shapes_{seed}_{index:05d}.png"


def _rank_negatives(world: World, present: set[str], split: str, rng: np.random.Generator,
                    stats: Cooccurrence) -> list[str]:
    shapes = world.config.shapes
    absent = [s for s in shapes if s not in present]
    if split == "random":
        return [absent[i] for i in rng.permutation(len(absent))]
    freq = stats.frequency()
    order = {s: i for i, s in enumerate(shapes)}
    if split == "popular":
        return sorted(absent, key=lambda s: (-freq[order[s]], order[s]))
    cond = np.nan_to_num(stats.conditional())
    score = {s: max(cond[order[p], order[s]] for p in present) for s in absent}
    return sorted(absent, key=lambda s: (-score[s], -freq[order[s]], order[s]))


def _pope_from_scenes(world: World, scenes: list[Scene], names: list[str], seed: int, split: str,
                      per_image: int, stats: Cooccurrence) -> list[PopeQuestion]:
    pos_rng = np.random.default_rng([seed, 1])  # same positives for every split
    neg_rng = np.random.default_rng([seed, 2])
    out: list[PopeQuestion] = []
    for k, (sc, name) in enumerate(zip(scenes, names)):
        present = [s for s in world.config.shapes if s in sc.shape_set()]
        negatives = _rank_negatives(world, set(present), split, neg_rng, stats)
        m = min(len(present), len(negatives), per_image)
        positives = [present[i] for i in pos_rng.permutation(len(present))[:m]]
        for pos, neg in zip(positives, negatives[:m]):
            for shape, label in ((pos, "yes"), (neg, "no")):
                out.append(PopeQuestion(len(out) + 1, name, existence_question(shape), label, shape, k))
    return out


def pope_questions(world: World, n_images: int, seed: int, split: str, per_image: int = 3,
                   stats: Cooccurrence | None = None) -> PopeSet:
    """POPE existence questions over ``n_images`` scenes drawn with ``seed``.

    Per image, m = min(#present shapes, #absent shapes, per_image) positives and as
    many negatives (so exactly 50% yes). Negatives: random = random absent shapes;
    popular = most frequent absent shapes of the training distribution; adversarial =
    absent shapes that co-occur most with a present shape (its prior partner first).
    """
    check_name(split, POPE_SPLITS, "split")
    if per_image < 1:
        raise ValueError(f"per_image {per_image} must be >= 1")
    scenes = world.scenes(n_images, seed)
    names = [pope_image_name(seed, i) for i in range(n_images)]
    stats = world.shape_stats() if stats is None else stats
    return PopeSet(split, scenes, names, _pope_from_scenes(world, scenes, names, seed, split, per_image, stats))


def write_pope(world: World, folder: str | os.PathLike, n_images: int, seed: int,
               splits: Sequence[str] = POPE_SPLITS, per_image: int = 3) -> dict[str, Path]:
    """Write a POPE set: ``images/<name>.png``, one ``<split>.jsonl`` per split (keys
    question_id, image, text, label) and ``captions.jsonl`` (per image: image_id, image,
    objects = sorted canonical shape names, instances, caption) for CHAIR.
    Every file is written atomically. Returns the written paths by name."""
    for s in splits:
        check_name(s, POPE_SPLITS, "split")
    root = Path(folder)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    scenes = world.scenes(n_images, seed)
    names = [pope_image_name(seed, i) for i in range(n_images)]
    for sc, name in zip(scenes, names):
        buf = io.BytesIO()
        sc.pil().save(buf, format="PNG")
        atomic_write(img_dir / name, buf.getvalue())
    written: dict[str, Path] = {"images": img_dir}
    stats = world.shape_stats()
    for split in splits:
        qs = _pope_from_scenes(world, scenes, names, seed, split, per_image, stats)
        path = root / f"{split}.jsonl"
        atomic_write(path, jsonl_text(q.to_json() for q in qs))
        written[split] = path
    order = {s: i for i, s in enumerate(world.config.shapes)}
    caps = (
        {
            "image_id": i,
            "image": name,
            "objects": sorted(sc.shape_set(), key=order.__getitem__),
            "instances": [{"shape": o.shape, "color": o.color} for o in sc.objects],
            "caption": caption(sc),
        }
        for i, (sc, name) in enumerate(zip(scenes, names))
    )
    written["captions"] = root / "captions.jsonl"
    atomic_write(written["captions"], jsonl_text(caps))
    return written


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file (as written by ``write_pope``)."""
    return [row for _, row in jsonl_rows(path)]


__all__ = [
    "POPE_SPLITS",
    "PopeQuestion",
    "PopeSet",
    "pope_image_name",
    "pope_questions",
    "read_jsonl",
    "write_pope",
]
