"""Gemma 3: a SigLIP tower, average-pooled and projected image tokens, a Gemma 3 LM.

Facts this adapter gives the rest of the package:

- Layers norm each sublayer's output before the residual add: ``attn`` and ``mlp`` are the
  outputs of ``post_attention_layernorm`` and ``post_feedforward_layernorm``, the tensors added
  to the residual stream (:data:`~.tables.GEMMA2_LAYER`).
- The LM's mask is a dict per layer type (full and sliding-window attention). With
  ``token_type_ids`` (the processor returns them) each run of image tokens attends to itself
  both ways (:func:`attention_blocks`), so restoring an image token changes earlier image
  positions: the fast tracing path restarts at the start of the run.
- Text embeddings are scaled by sqrt(width) inside ``embed_tokens``; the image features are
  scattered in after that, unscaled. Noise on ``embeddings`` goes on the projector's output,
  which is exactly what fills the image-token positions.
- Gemma3ForConditionalGeneration applies no final-logit soft cap (only the text-only
  Gemma3ForCausalLM reads ``final_logit_softcapping``), so the tail is the final norm and LM head.
- The prompt marks the image with the tokenizer's start-of-image token; the processor expands
  it to start-of-image, ``mm_tokens_per_image`` image tokens, end-of-image (and blank lines).
"""

from __future__ import annotations

import math

from .base import Adapter, Blocks, NoisePlace, runs
from .tables import SIGLIP_PATCHES, lm_tower, siglip_vision_tower

MODEL_CLASSES = ("Gemma3ForConditionalGeneration",)


def image_tokens(config, inputs) -> int:
    """``mm_tokens_per_image`` per processed view (one, or more with pan-and-scan crops)."""
    return config.mm_tokens_per_image * int(inputs["pixel_values"].shape[0])


def pooled_side(config) -> tuple[int, int]:
    """(patches per side of the vision grid, patches per side of one pooled LM token)."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    return side, side // int(math.isqrt(config.mm_tokens_per_image))


def lm_image_boxes(config, image_hw: tuple[int, int], frame: list, inputs: dict | None = None) -> list:
    """One box per LM image token: the union of the square of patches its average pool covers, row-major."""
    side, k = pooled_side(config)
    tokens = side // k
    boxes = []
    for r in range(tokens):
        for c in range(tokens):
            y0, x0, _, _ = frame[(r * k) * side + c * k]
            _, _, y1, x1 = frame[(r * k + k - 1) * side + c * k + k - 1]
            boxes.append((y0, x0, y1, x1))
    return boxes


def attention_blocks(config, inputs) -> Blocks:
    """Each run of image tokens (``token_type_ids`` 1) attends to itself both ways; without them, all is causal."""
    ids = inputs["input_ids"]
    if getattr(config.text_config, "use_bidirectional_attention", False):
        return [(0, ids.shape[1] - 1)]
    types = inputs.get("token_type_ids")
    if types is None:
        return []
    return runs([t == 1 for t in types[0].tolist()])


def build(config) -> Adapter:
    return Adapter(
        family="gemma3",
        model_classes=MODEL_CLASSES,
        towers={"vision": siglip_vision_tower(), "lm": lm_tower(config, "model.language_model", "lm_head")},
        decoder="causal",
        default_template="<start_of_turn>user\n<start_of_image>{question}<end_of_turn>\n<start_of_turn>model\n",
        image_in_lm=True,
        image_tokens=image_tokens,
        image_placeholder=True,
        lm_image_boxes=lm_image_boxes,
        patch_map_tower="vision",
        vision_root="model.vision_tower",
        noise_places={
            "embeddings": NoisePlace("model.multi_modal_projector", "output", "lm", "group", "text_config.hidden_size",
                                     "the pooled, projected image features, scattered in order into the LM's "
                                     "image-token positions after the text embeddings' sqrt(width) scale (which "
                                     "they do not get)"),
            "patches": SIGLIP_PATCHES,
        },
        vision_cls=False,
        placeholder_attr="tokenizer.boi_token",
        answer_token_inputs={"token_type_ids": 0},
        attention_blocks=attention_blocks,
        notes="pan-and-scan crops add image tokens the object geometry does not map",
    )
