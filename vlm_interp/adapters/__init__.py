"""Architecture adapters: one small table per model family, chosen from the model class."""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..errors import UnknownArchitectureError
from . import blip, blip2, gemma3, idefics3, internvl, llava, llava_next, llava_onevision, mllama, paligemma, qwen_vl
from .base import Adapter, BoundAdapter, ImageLayout, Tower

# model class name -> function building that family's adapter from the model config
REGISTRY: dict[str, Callable[[object], Adapter]] = {
    **{c: llava.build for c in llava.MODEL_CLASSES},
    **{c: llava_next.build for c in llava_next.MODEL_CLASSES},
    **{c: llava_onevision.build for c in llava_onevision.MODEL_CLASSES},
    **{c: gemma3.build for c in gemma3.MODEL_CLASSES},
    **{c: paligemma.build for c in paligemma.MODEL_CLASSES},
    **{c: blip.build for c in blip.MODEL_CLASSES},
    **{c: blip2.build_blip2 for c in blip2.BLIP2_CLASSES},
    **{c: blip2.build_instructblip for c in blip2.INSTRUCTBLIP_CLASSES},
    **{c: idefics3.build_idefics3 for c in idefics3.IDEFICS3_CLASSES},
    **{c: idefics3.build_smolvlm for c in idefics3.SMOLVLM_CLASSES},
    **{c: internvl.build for c in internvl.MODEL_CLASSES},
    **{c: mllama.build for c in mllama.MODEL_CLASSES},
    **{c: qwen_vl.build_qwen2 for c in qwen_vl.QWEN2_CLASSES},
    **{c: qwen_vl.build_qwen2_5 for c in qwen_vl.QWEN2_5_CLASSES},
    **{c: qwen_vl.build_qwen3 for c in qwen_vl.QWEN3_CLASSES},
}

HOW_TO_ADD = (
    "To add a family, write vlm_interp/adapters/<family>.py with a build(config) -> Adapter that gives its towers "
    "(layer list path, component table, head-count config key, its attention modules and whether they compute "
    "attention through transformers' AttentionInterface; for the answer LM its tail and the keywords the "
    "fast path may replay, a final-logit soft cap, whether input + attn + mlp = output, how its batch "
    "holds tiles or packs positions without a batch axis, scales before the residual add, features added between "
    "its layers), its decoder kind, default prompt template and image-token facts (placeholder and the processor "
    "attribute naming it, count, the boxes vision positions and LM image tokens cover or for tiled images an "
    "image_layout, a class token in the vision tower), processor outputs to drop and per-token inputs an answer "
    "extends, its attention blocks that are not causal, its vision root, per-patch projector layers and noise "
    "places, and register its model class in vlm_interp/adapters/__init__.py:REGISTRY."
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


__all__ = ["Adapter", "BoundAdapter", "ImageLayout", "Tower", "REGISTRY", "adapter_for", "supported"]
