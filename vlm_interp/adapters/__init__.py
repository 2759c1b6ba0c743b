"""Architecture adapters: one small table per model family, chosen from the model class."""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..errors import UnknownArchitectureError
from . import blip, blip2, llava, llava_next
from .base import Adapter, BoundAdapter, Tower

# model class name -> function building that family's adapter from the model config
REGISTRY: dict[str, Callable[[object], Adapter]] = {
    **{c: llava.build for c in llava.MODEL_CLASSES},
    **{c: llava_next.build for c in llava_next.MODEL_CLASSES},
    **{c: blip.build for c in blip.MODEL_CLASSES},
    **{c: blip2.build_blip2 for c in blip2.BLIP2_CLASSES},
    **{c: blip2.build_instructblip for c in blip2.INSTRUCTBLIP_CLASSES},
}

HOW_TO_ADD = (
    "To add a family, write vlm_interp/adapters/<family>.py with a build(config) -> Adapter that gives its towers "
    "(layer list path, component table, head-count config key, its attention modules and whether they compute "
    "attention through transformers' AttentionInterface; for the answer LM its tail and the keywords the "
    "fast path may replay), its decoder kind, default prompt template and image-token facts (placeholder, count, "
    "the boxes LM image tokens cover), its vision root and noise places, and register its model class in "
    "vlm_interp/adapters/__init__.py:REGISTRY."
)


def supported() -> list[str]:
    """Model class names that have an adapter."""
    return sorted(REGISTRY)


def adapter_for(model: nn.Module) -> BoundAdapter:
    """Build and validate the adapter for ``model``'s class."""
    name = type(model).__name__
    if name not in REGISTRY:
        raise UnknownArchitectureError(
            f"no adapter for {name}. Supported: {', '.join(supported())}. {HOW_TO_ADD}"
        )
    return BoundAdapter(REGISTRY[name](model.config), model)


__all__ = ["Adapter", "BoundAdapter", "Tower", "REGISTRY", "adapter_for", "supported"]
