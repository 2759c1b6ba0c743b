"""Idefics3 and SmolVLM: a SigLIP vision tower over image tiles, a pixel-shuffle connector, a decoder LM.

The image processor resizes the image (longest edge to ``size``), stretches it to whole tiles
of ``max_image_size`` and cuts it into ``rows x cols`` tiles, row by row, then adds the whole
image squashed to one tile (the global tile); without splitting, the squashed image is the only
tile. ``pixel_values`` are (batch, tiles, channels, height, width) with a ``pixel_attention_mask``,
and the vision tower runs every tile as one entry of its batch: its sites show an example's tiles
as one sequence, tile after tile (``batch_layout="tiles"``), with no CLS token.

The connector's pixel shuffle merges ``scale_factor x scale_factor`` neighbouring patches of a
tile into one LM image token, row-major. In the LM, each tile's tokens follow a
``<fake_token_around_image>`` and a ``<row_i_col_j>`` tag (``<global-img>`` for the global tile);
those separators cover no patch and are text positions.
"""

from __future__ import annotations

from ..geometry import Box
from .base import Adapter, ImageLayout, NoisePlace, Tower
from .tables import CLIP_VISION_LAYER, SELF_ATTN, lm_tower

IDEFICS3_CLASSES = ("Idefics3ForConditionalGeneration",)
SMOLVLM_CLASSES = ("SmolVLMForConditionalGeneration",)
MODEL_CLASSES = IDEFICS3_CLASSES + SMOLVLM_CLASSES


def _tile_side(config, inputs) -> tuple[int, int]:
    """(patches per tile side, LM tokens per tile side) for the tiles in ``pixel_values``."""
    side = int(inputs["pixel_values"].shape[-1]) // config.vision_config.patch_size
    return side, side // config.scale_factor


def image_tokens(config, inputs) -> int:
    """LM image tokens for one image: each real tile's patches after the pixel shuffle."""
    pixels = inputs["pixel_values"]
    tiles = int((pixels[0].flatten(1) != 0).any(dim=1).sum())  # all-zero tiles are batch padding the model drops
    return tiles * _tile_side(config, inputs)[1] ** 2


def tile_grid(image_processor, image_hw: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of split tiles for an image of (height, width); (0, 0) when the processor does not split it."""
    if not getattr(image_processor, "do_image_splitting", False):
        return 0, 0
    _, rows, cols = image_processor.get_number_of_image_patches(*image_hw, {})
    return int(rows), int(cols)


def _cells(scale: tuple[float, float], origin: tuple[int, int], side: int, cell: int) -> list[Box]:
    """Boxes (original pixels) of a ``side x side`` grid of ``cell``-pixel cells from ``origin`` in the stretched
    image, row-major; ``scale`` is (stretched / original) per axis."""
    sy, sx = scale
    y0, x0 = origin
    return [((y0 + i * cell) / sy, (x0 + j * cell) / sx, (y0 + (i + 1) * cell) / sy, (x0 + (j + 1) * cell) / sx)
            for i in range(side) for j in range(side)]


def image_layout(config, image_processor, image_hw: tuple[int, int], inputs: dict) -> ImageLayout:
    """Boxes of every vision position (tiles in turn, patches row-major) and of every LM image token."""
    h, w = image_hw
    tile = int(inputs["pixel_values"].shape[-1])
    patch = config.vision_config.patch_size
    side, merged = _tile_side(config, inputs)
    rows, cols = tile_grid(image_processor, image_hw)
    origins = [(r * tile, c * tile) for r in range(rows) for c in range(cols)]
    scales = [(rows * tile / h, cols * tile / w)] * len(origins) + [(tile / h, tile / w)]  # split tiles, then global
    origins.append((0, 0))
    vision, lm, pixels = [], [], {}
    for t, (origin, scale) in enumerate(zip(origins, scales)):
        for k, box in enumerate(_cells(scale, origin, side, patch)):
            pixels[len(vision)] = (t, *divmod(k, side))
            vision.append(box)
        lm += _cells(scale, origin, merged, patch * config.scale_factor)
    return ImageLayout(vision=vision, lm=lm, pixels=pixels)


def _build(family: str, classes: tuple[str, ...], config) -> Adapter:
    return Adapter(
        family=family,
        model_classes=classes,
        towers={
            "vision": Tower("model.vision_model.encoder.layers", CLIP_VISION_LAYER, "vision_config.num_attention_heads",
                            description="SigLIP vision encoder, one entry per image tile", batch_layout="tiles",
                            residual_sum=True,
                            attention=SELF_ATTN),
            "lm": lm_tower(config, "model.text_model", "lm_head"),
        },
        decoder="causal",
        default_template="USER:<image> {question}<end_of_utterance>\nASSISTANT:",
        image_in_lm=True,
        image_tokens=image_tokens,
        image_placeholder=True,
        image_layout=image_layout,
        vision_root="model.vision_model",
        noise_places={
            "embeddings": NoisePlace("model.connector", "output", "lm", "group", "text_config.hidden_size",
                                     "connector output (pixel-shuffled, projected patches), one row per LM image "
                                     "token, tiles in turn", fold=True),
            "patches": NoisePlace("model.vision_model.embeddings", "output", "vision", "position",
                                  "vision_config.hidden_size", "SigLIP patch + position embeddings of every tile",
                                  fold=True),
        },
        notes="the LM's image tokens come in one group per tile, after <fake_token_around_image> and a "
              "<row_i_col_j> or <global-img> tag; those tags are text positions",
    )


def build_idefics3(config) -> Adapter:
    return _build("idefics3", IDEFICS3_CLASSES, config)


def build_smolvlm(config) -> Adapter:
    return _build("smolvlm", SMOLVLM_CLASSES, config)
