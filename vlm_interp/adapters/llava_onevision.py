"""LLaVA-OneVision: a SigLIP tower, LLaVA-NeXT's any-resolution tiling, a Qwen2 LM.

The LM's image span is the base view's patches (a square grid, no class token), then the
tiles' features as one unpadded grid written row by row, each row ending in a learned
``image_newline`` token. Grids larger than ``anyres_max_N`` allows (``vision_aspect_ratio``)
are shrunk by bilinear interpolation first. The token count thus depends on the image's size
and aspect ratio; the tiling geometry is LLaVA-NeXT's (:mod:`.llava_next`), reused here.
"""

from __future__ import annotations

import dataclasses
import math

from .. import geometry
from . import llava_next
from .base import Adapter, NoisePlace, Replay
from .tables import SIGLIP_PATCHES, lm_tower, siglip_vision_tower

MODEL_CLASSES = ("LlavaOnevisionForConditionalGeneration",)


def highres_grid(config, image_hw: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of the tiles' feature grid for an image of (height, width): unpadded, then shrunk to at most
    ``anyres_max_N`` base grids when it is more than 1.1 times larger (as the model's ``pack_image_features``)."""
    rows, cols = llava_next.highres_grid(config, image_hw)
    grid = config.vision_config.image_size // config.vision_config.patch_size
    most = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
    ratio = math.sqrt(rows * cols / (most * grid ** 2))
    if ratio > 1.1:
        rows, cols = int(rows // ratio), int(cols // ratio)
    return rows, cols


def image_tokens(config, inputs) -> int:
    """Image tokens for one image: the base grid, then the tiles' rows, each ending in a newline token."""
    grid = config.vision_config.image_size // config.vision_config.patch_size
    rows, cols = highres_grid(config, tuple(int(v) for v in inputs["image_sizes"][0]))
    return grid * grid + rows * (cols + 1)


def lm_image_boxes(config, image_hw: tuple[int, int], frame: list, inputs: dict | None = None) -> list:
    """The base view's patches (the whole image squashed to a square), then the tiles' grid laid evenly over the
    image (what the unpadding keeps), row by row, each row's newline token covering no patch."""
    rows, cols = highres_grid(config, image_hw)
    cells = geometry.even_cells(image_hw, (rows, cols))
    boxes = list(frame)
    for r in range(rows):
        boxes += cells[r * cols:(r + 1) * cols] + [None]
    return boxes


def build(config) -> Adapter:
    lm = lm_tower(config, "model.language_model", "lm_head")
    # the model hands its logits_to_keep on to the decoder layers, which ignore it: a constant for any positions
    lm = dataclasses.replace(lm, replay={**lm.replay, "logits_to_keep": Replay("constant")})
    return Adapter(
        family="llava_onevision",
        model_classes=MODEL_CLASSES,
        towers={"vision": siglip_vision_tower(), "lm": lm},
        decoder="causal",
        default_template="<|im_start|>user <image>\n{question}<|im_end|><|im_start|>assistant\n",
        image_in_lm=True,
        image_tokens=image_tokens,
        image_placeholder=True,
        lm_image_boxes=lm_image_boxes,
        vision_root="model.vision_tower",
        noise_places={
            "embeddings": NoisePlace("model.language_model.layers.0", "input", "lm", "position",
                                     "text_config.hidden_size",
                                     "the LM's input embeddings (first decoder layer input): projector rows are "
                                     "re-ordered into tiles with newline tokens, so the LM input is where positions "
                                     "are the LM's"),
            "patches": SIGLIP_PATCHES,
        },
        vision_cls=False,
        notes="one image per prompt; the vision tower runs the base view and every tile as a batch",
    )
