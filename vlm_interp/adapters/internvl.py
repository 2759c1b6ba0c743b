"""InternVL (the -hf classes): an InternViT over image tiles, pixel shuffle and an MLP projector, a decoder LM.

The GOT-OCR2 image processor picks a ``cols x rows`` grid of tiles whose aspect ratio is closest to the
image's, stretches the image onto it and cuts the tiles row by row, then adds a thumbnail (the whole
image squashed to one tile) when there is more than one tile. ``pixel_values`` are (tiles, channels,
height, width): the vision tower runs every tile as one entry of its batch, and its sites show an
example's tiles as one sequence, tile after tile, each a CLS token and its patches row-major
(``batch_layout="tiles"``). The CLS tokens are dropped before the pixel shuffle, which merges 2x2
neighbouring patches into one LM token. The LM sees ``<img>``, then ``<IMG_CONTEXT>`` tokens for
every tile in turn, then ``</img>``.

InternViT scales its attention and MLP outputs per channel before the residual add (layer scale,
``lambda_1`` and ``lambda_2``), and no module outputs the scaled tensors: ``attn`` and ``mlp`` are
hooked before the scale (``Tower.residual_scale`` says so).
"""

from __future__ import annotations

from .. import compat
from ..errors import ImageTokenMismatchError
from .base import Adapter, Attention, ImageLayout, NoisePlace, Slot, Tower
from .idefics3 import _cells
from .tables import lm_tower

MODEL_CLASSES = ("InternVLForConditionalGeneration",)

INTERNVIT_LAYER: dict[str, Slot] = {
    "input": ("", "input"),  # the residual stream entering the layer (layer 0: the patch and position embeddings)
    "hidden": ("", "output"),
    "attn": ("attention", "output"),  # before the layer scale lambda_1
    "mlp": ("mlp", "output"),  # before the layer scale lambda_2
    "head": ("attention.projection_layer", "input"),
}


def _side(value) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def _sides(config, inputs) -> tuple[int, int]:
    """(patches per tile side, LM tokens per tile side)."""
    side = int(inputs["pixel_values"].shape[-1]) // _side(config.vision_config.patch_size)
    return side, int(side * config.downsample_ratio)


def image_tokens(config, inputs) -> int:
    """``<IMG_CONTEXT>`` tokens for one image: every tile's patches after the pixel shuffle."""
    return int(inputs["pixel_values"].shape[0]) * _sides(config, inputs)[1] ** 2


def tile_grid(image_processor, image_hw: tuple[int, int], tile: int) -> tuple[int, int]:
    """(rows, cols) of the tiles an image of (height, width) is cut into; (1, 1) when it is not cut."""
    if not getattr(image_processor, "crop_to_patches", False) or image_processor.max_patches <= 1:
        return 1, 1
    cols, rows = compat.tile_canvas(image_hw, (tile, tile), image_processor.min_patches, image_processor.max_patches)
    return rows, cols


def image_layout(config, image_processor, image_hw: tuple[int, int], inputs: dict) -> ImageLayout:
    """Boxes of every vision position (tiles in turn: CLS, then patches row-major) and of every LM image token."""
    h, w = image_hw
    tile = int(inputs["pixel_values"].shape[-1])
    patch = _side(config.vision_config.patch_size)
    side, merged = _sides(config, inputs)
    rows, cols = tile_grid(image_processor, image_hw, tile)
    origins = [(r * tile, c * tile) for r in range(rows) for c in range(cols)]
    scales = [(rows * tile / h, cols * tile / w)] * len(origins)
    if len(origins) > 1:  # the thumbnail
        origins.append((0, 0))
        scales.append((tile / h, tile / w))
    if len(origins) != inputs["pixel_values"].shape[0]:
        raise ImageTokenMismatchError(
            f"the image processor made {inputs['pixel_values'].shape[0]} tiles but its settings give {len(origins)} "
            f"for an image of {image_hw} (height, width); process the image with this processor"
        )
    vision, lm, pixels = [], [], {}
    for t, (origin, scale) in enumerate(zip(origins, scales)):
        vision.append("cls")
        for k, box in enumerate(_cells(scale, origin, side, patch)):
            pixels[len(vision)] = (t, *divmod(k, side))
            vision.append(box)
        lm += _cells(scale, origin, merged, tile // merged)
    return ImageLayout(vision=vision, lm=lm, pixels=pixels)


def build(config) -> Adapter:
    return Adapter(
        family="internvl",
        model_classes=MODEL_CLASSES,
        towers={
            "vision": Tower("model.vision_tower.encoder.layer", INTERNVIT_LAYER, "vision_config.num_attention_heads",
                            description="InternViT, one entry per image tile (CLS first in each)",
                            batch_layout="tiles", residual_sum=True, attention={"attn": Attention("attention")},
                            residual_scale={"attn": ("lambda_1", "scale"), "mlp": ("lambda_2", "scale")}),
            "lm": lm_tower(config, "model.language_model", "lm_head"),
        },
        decoder="causal",
        default_template="USER: <IMG_CONTEXT>\n{question}\nASSISTANT:",
        image_in_lm=True,
        image_tokens=image_tokens,
        image_placeholder=True,
        image_layout=image_layout,
        vision_root="model.vision_tower",
        noise_places={
            "embeddings": NoisePlace("model.multi_modal_projector", "output", "lm", "group", "text_config.hidden_size",
                                     "projected pixel-shuffled patches, one row per <IMG_CONTEXT> token, tiles in "
                                     "turn", fold=True),
            "patches": NoisePlace("model.vision_tower.embeddings", "output", "vision", "position",
                                  "vision_config.hidden_size", "InternViT CLS + patch + position embeddings of every "
                                  "tile", fold=True),
        },
        notes="<img> and </img> around the image tokens are text positions",
    )
