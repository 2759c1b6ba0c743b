"""Model organisms: tiny VLMs of the real transformers classes, trained on the shapes world.

Their checkpoints ship inside the package (``zoo/checkpoints/NAME``) and load through the
ordinary path: ``vlm_interp.load("zoo:shapes-llava")``. ``vlm-interp zoo train NAME``
retrains one from its recipe and seed.
"""

from __future__ import annotations

import json
from pathlib import Path

from .organisms import ORGANISM_WORLD, RECIPES, get_recipe
from .shapes import COLORS, SHAPES, World
from .tasks import existence_question

ORGANISM_DIR = Path(__file__).parent / "checkpoints"


def scene(seed: int):
    """A scene of the world the organisms were trained on: ``vi.zoo.scene(1).pil()`` is its image."""
    return World(ORGANISM_WORLD).scene(seed)


def organism_path(name: str) -> Path:
    """Folder of a shipped organism's checkpoint, with a clear error when it is missing."""
    if name not in RECIPES:
        raise KeyError(f"unknown organism {name!r}; organisms: {sorted(RECIPES)}")
    path = ORGANISM_DIR / name
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"organism {name!r} has no checkpoint at {path}; train it with `vlm-interp zoo train {name} --out {path}`"
        )
    return path


def card(name: str) -> dict:
    """The organism's model card (JSON), or a stub saying it is not trained; unknown names are an error."""
    recipe = get_recipe(name)
    path = ORGANISM_DIR / name / "card.json"
    if not path.exists():
        return {"name": name, "trained": False, "recipe": recipe.to_dict()}
    return json.loads(path.read_text())


def list_organisms() -> list[str]:
    return sorted(RECIPES)


__all__ = ["COLORS", "ORGANISM_DIR", "ORGANISM_WORLD", "RECIPES", "SHAPES", "World", "card", "existence_question",
           "list_organisms", "organism_path", "scene"]
