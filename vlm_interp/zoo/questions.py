"""The built-in shapes-world question set that the organism cards are measured on (POPE and CHAIR layout)."""

from __future__ import annotations

from pathlib import Path

from ..hallucination.pope import SPLITS
from .evaluate import EVAL_SEED
from .organisms import ORGANISM_WORLD
from .pope_set import write_pope
from .shapes import World

POPE_IMAGES = 400  # the size of the built-in set the organism cards are measured on


def pope_folder(folder: "str | Path", n_images: int | None = None) -> Path:
    """Write the built-in shapes-world POPE set over ``n_images`` images (default and cards: 400).

    A set already in ``folder`` is kept when it has ``n_images`` images and rewritten otherwise; the
    scenes and questions of a smaller set are the first ones of a larger set (same ids), so answers
    kept in results files stay valid.
    """
    n_images = POPE_IMAGES if n_images is None else n_images
    if n_images < 1:
        raise ValueError(f"n_images {n_images} must be at least 1")
    folder = Path(folder)
    if images_in(folder) != n_images:
        write_pope(World(ORGANISM_WORLD), folder, n_images=n_images, seed=EVAL_SEED)
    return folder


def images_in(folder: Path) -> int | None:
    """How many images a complete built-in set in ``folder`` covers (one captions line each); None if none is there."""
    files = [folder / f"{s}.jsonl" for s in SPLITS] + [folder / "captions.jsonl"]
    if not all(f.exists() for f in files):
        return None
    return sum(1 for line in files[-1].read_text(encoding="utf-8").splitlines() if line.strip())


__all__ = ["POPE_IMAGES", "pope_folder", "images_in"]
