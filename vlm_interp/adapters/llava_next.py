"""LLaVA-NeXT (1.6): LLaVA with any-resolution tiling; image tokens = base grid + tiles + newlines."""

from __future__ import annotations

import torch

from .. import compat, geometry
from .base import Adapter, NoisePlace, Padding
from .llava import PATCH_PROJECTOR, clip_vision_tower, lm_image_boxes as base_grid_boxes
from .tables import CLIP_PATCHES, DECODER_PADDING, lm_tower

MODEL_CLASSES = ("LlavaNextForConditionalGeneration",)


def highres_grid(config, image_size: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of the unpadded high-resolution feature grid for an image of (height, width)."""
    side = config.vision_config.image_size
    grid = side // config.vision_config.patch_size
    tiles_h, tiles_w = compat.anyres_grid_shape(image_size, config.image_grid_pinpoints, side)
    features = torch.zeros(1, tiles_h * grid, tiles_w * grid)
    rows, cols = compat.unpad_image(features, torch.tensor(image_size)).shape[-2:]
    return int(rows), int(cols)


def anyres_tokens(config, inputs) -> int:
    """Image tokens for one image: base grid (+CLS if 'full'), then high-res rows each ending in a newline."""
    grid = config.vision_config.image_size // config.vision_config.patch_size
    height, width = (int(v) for v in inputs["image_sizes"][0])
    rows, cols = highres_grid(config, (height, width))
    base = grid * grid + (1 if config.vision_feature_select_strategy == "full" else 0)
    return base + rows * (cols + 1)


def lm_image_boxes(config, image_hw: tuple[int, int], frame: list, inputs: dict | None = None) -> list:
    """The base grid's boxes (squashed frame), then the high-resolution rows, each ending in a newline token."""
    boxes = base_grid_boxes(config, image_hw, frame, inputs)
    rows, cols = highres_grid(config, image_hw)
    cells = geometry.even_cells(image_hw, (rows, cols))
    for r in range(rows):
        boxes += cells[r * cols:(r + 1) * cols] + [None]
    return boxes


def build(config) -> Adapter:
    return Adapter(
        family="llava_next",
        model_classes=MODEL_CLASSES,
        towers={"vision": clip_vision_tower(), "lm": lm_tower(config, "model.language_model", "lm_head")},
        decoder="causal",
        default_template="USER: <image>\n{question} ASSISTANT:",
        image_in_lm=True,
        image_tokens=anyres_tokens,
        image_placeholder=True,
        squashed_frame=True,
        lm_image_boxes=lm_image_boxes,
        vision_root="model.vision_tower",
        patch_projector=PATCH_PROJECTOR,
        noise_places={
            "embeddings": NoisePlace("model.language_model.layers.0", "input", "lm", "position",
                                     "text_config.hidden_size",
                                     "the LM's input embeddings (first decoder layer input); projector rows are "
                                     "re-ordered into tiles with newline tokens, so the LM input is where positions "
                                     "are the LM's"),
            "patches": CLIP_PATCHES,
        },
        # images of different shapes are cut into different numbers of tiles; the model keeps each image's own
        # tiles (by image_sizes), so the tile axis is padded with blank tiles
        padding={**DECODER_PADDING, "pixel_values": Padding("right", 0.0, axis=1)},
    )
