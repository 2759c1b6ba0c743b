"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: a packed-patch vision tower with its merger, a decoder LM with M-RoPE.

Facts (transformers 5.13 to 5.24, read from the modeling files and measured on tiny builds):

* ``pixel_values`` are flattened patches, one row per patch, with ``image_grid_thw`` (frames, patch rows,
  patch columns) per image. The image processor resizes the whole image (no crop) to a multiple of
  ``patch_size * merge_size`` pixels on each side (28 at real sizes), so the number of image tokens,
  ``rows * cols / merge_size**2``, follows the image size. Patches arrive merge window by merge window:
  each ``merge_size x merge_size`` block of patches, blocks in row-major order.
* The vision tower (``model.visual``, the projector ``visual.merger`` inside it) runs the patches of every
  image of a batch packed on one axis, with no batch axis; ``cu_seqlens`` keeps images apart in attention,
  so a batch of rows is the rows' patches one after the other (``Tower.batch_layout = "packed"``).
  Qwen2.5-VL re-orders the merged patch blocks into attention windows before its blocks and back after the
  merger: its vision positions are in window order. The LM reads merged blocks in row-major order.
* The LM gets M-RoPE position ids (3, batch, positions) that the model computes from ``mm_token_type_ids``
  and ``image_grid_thw``: a token's position is not its index. ``model.model.rope_deltas`` keeps the
  offset between calls, but a forward with ``input_ids`` and no key/value cache (every forward vlm-interp
  makes outside ``generate``) recomputes it, and ``generate`` recomputes it at its first step: stale values
  never reach a run (tests/test_family_qwen.py checks it by poisoning the attribute).
  Decoder layers receive the rotary ``(cos, sin)``: (batch, positions, dim) at 5.24, (3, batch, positions,
  dim) at 5.13 (M-RoPE sections applied inside attention there); the replay table counts axes from the
  end, which holds for both.
* Qwen3-VL's DeepStack adds merged features of intermediate vision blocks to the residual stream at the
  image positions after the first LM layers, outside the layer modules (``Tower.added_after``).
"""

from __future__ import annotations

from typing import Any

from .. import geometry
from .base import Adapter, Attention, NoisePlace, Replay, Tower
from .tables import DECODER_REPLAY, LLAMA_LAYER, SELF_ATTN

QWEN2_CLASSES = ("Qwen2VLForConditionalGeneration",)
QWEN2_5_CLASSES = ("Qwen2_5_VLForConditionalGeneration",)
QWEN3_CLASSES = ("Qwen3VLForConditionalGeneration",)
MODEL_CLASSES = QWEN2_CLASSES + QWEN2_5_CLASSES + QWEN3_CLASSES

VISION_LAYER = {
    "input": ("", "input"),  # the residual stream entering the block (block 0: the patch embeddings)
    "hidden": ("", "output"),
    "attn": ("attn", "output"),
    "mlp": ("mlp", "output"),
    "head": ("attn.proj", "input"),
}
# Axes counted from the end: position ids are (batch, positions) or M-RoPE (3, batch, positions); rotary
# (cos, sin) are (batch, positions, dim), or (3, batch, positions, dim) where attention applies the sections.
REPLAY = {
    **DECODER_REPLAY,
    "position_ids": Replay("sequence", seq_axis=-1, batch_axis=-2),
    "position_embeddings": Replay("pair", seq_axis=-2, batch_axis=-3),
}
TEMPLATE = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"


# Qwen's vision attention splits the packed positions at cu_seqlens and calls the attention function once per image,
# so a call's positions are not the tower's; attention edits would address the wrong positions
PACKED_ATTENTION = {"attn": Attention("attn", interface=False,
                                      why="Qwen's vision attention runs one attention call per image of the packed "
                                          "sequence, whose positions the attention dispatcher cannot map to the tower's")}


def _grid(config, inputs: dict) -> tuple[int, int, int, int]:
    """(frames, patch rows, patch columns, merge size) of the one image in ``inputs``."""
    grid = inputs["image_grid_thw"]
    if grid.shape[0] != 1:
        raise ValueError(f"expected one image, got image_grid_thw for {grid.shape[0]}")
    t, h, w = (int(v) for v in grid[0])
    return t, h, w, int(config.vision_config.spatial_merge_size)


def image_tokens(config, inputs: dict) -> int:
    """LM image tokens of the image(s): patches / merge_size**2."""
    m = int(config.vision_config.spatial_merge_size)
    return int(inputs["image_grid_thw"].prod(-1).sum()) // (m * m)


def window_order(config, rows: int, cols: int) -> list[int]:
    """Qwen2.5-VL's order of the merged blocks (``rows`` x ``cols``, row-major ids) inside its vision blocks.

    Blocks are grouped into windows of ``window_size // merge_size // patch_size`` blocks a side, laid over
    the grid from its top-left corner (the last ones cut by the grid's edge); windows come in row-major
    order, blocks inside a window in row-major order.
    """
    vc = config.vision_config
    side = vc.window_size // vc.spatial_merge_size // vc.patch_size
    order = []
    for wr in range(0, rows, side):
        for wc in range(0, cols, side):
            order += [r * cols + c for r in range(wr, min(wr + side, rows)) for c in range(wc, min(wc + side, cols))]
    return order


def _units(config, inputs: dict, windowed: bool) -> list[int]:
    """Merged-block ids (row-major) in the order of the vision tower's positions, one frame."""
    t, h, w, m = _grid(config, inputs)
    if t != 1:
        raise ValueError(f"expected a still image (one frame), got {t} frames")
    return window_order(config, h // m, w // m) if windowed else list(range((h // m) * (w // m)))


def _pixel_rows(config, inputs: dict, windowed: bool) -> list[int]:
    """Row of pixel_values (processor order: block by block, patches row-major inside) of each vision position."""
    m2 = int(config.vision_config.spatial_merge_size) ** 2
    return [unit * m2 + k for unit in _units(config, inputs, windowed) for k in range(m2)]


def _vision_boxes(config, inputs: dict, image_hw: tuple[int, int], windowed: bool) -> list:
    """The box of every vision position: patch (r, c) covers an even cell of the whole (resized, uncropped) image."""
    t, h, w, m = _grid(config, inputs)
    cells = geometry.even_cells(image_hw, (h, w))
    cols = w // m
    boxes = []
    for unit in _units(config, inputs, windowed):
        br, bc = divmod(unit, cols)
        boxes += [cells[(br * m + dr) * w + bc * m + dc] for dr in range(m) for dc in range(m)]
    return boxes


def lm_image_boxes(config, image_hw: tuple[int, int], frame: list, inputs: dict) -> list:
    """One box per LM image token: the merged blocks of merge_size x merge_size patches, row-major."""
    t, h, w, m = _grid(config, inputs)
    return geometry.even_cells(image_hw, (h // m, w // m))


def _adapter(config: Any, family: str, classes: tuple[str, ...], windowed: bool, vision_width: str,
             added_after: tuple[int, ...] = (), notes: str = "") -> Adapter:
    lm = Tower("model.language_model.layers", LLAMA_LAYER, "text_config.num_attention_heads",
               kv_heads="text_config.num_key_value_heads", description=f"{config.text_config.model_type} decoder",
               tail=("model.language_model.norm", "lm_head"), replay=REPLAY, added_after=added_after, residual_sum=True,
               attention=SELF_ATTN)
    vision = Tower("model.visual.blocks", VISION_LAYER, "vision_config.num_heads", batch_layout="packed",
                   description="ViT on packed patches" + (" (windowed attention)" if windowed else ""),
                   residual_sum=True, attention=PACKED_ATTENTION)
    return Adapter(
        family=family,
        model_classes=classes,
        towers={"vision": vision, "lm": lm},
        decoder="causal",
        default_template=TEMPLATE,
        image_in_lm=True,
        image_tokens=image_tokens,
        image_placeholder=True,
        vision_boxes=lambda c, inputs, hw: _vision_boxes(c, inputs, hw, windowed),
        pixel_rows=lambda c, inputs: _pixel_rows(c, inputs, windowed),
        lm_image_boxes=lm_image_boxes,
        answer_token_inputs={"mm_token_type_ids": 0},
        vision_root="model.visual",
        noise_places={
            "embeddings": NoisePlace("model.language_model.layers.0", "input", "lm", "position",
                                     "text_config.hidden_size",
                                     "the LM's input embeddings (first decoder layer input), where the merger's "
                                     "features sit at the image positions" + (
                                         "; DeepStack features enter later, uncorrupted (noise on 'patches' or "
                                         "'pixels' reaches them)" if added_after else "")),
            "patches": NoisePlace("model.visual.blocks.0", "input", "vision", "position", vision_width,
                                  "patch embeddings entering the first vision block, in the tower's position order"),
        },
        notes=notes,
    )


def build_qwen2(config) -> Adapter:
    return _adapter(config, "qwen2_vl", QWEN2_CLASSES, False, "vision_config.embed_dim")


def build_qwen2_5(config) -> Adapter:
    return _adapter(config, "qwen2_5_vl", QWEN2_5_CLASSES, True, "vision_config.hidden_size",
                    notes="vision positions follow the attention windows")


def build_qwen3(config) -> Adapter:
    n_lm = config.text_config.num_hidden_layers
    deepstack = tuple(j for j in range(len(config.vision_config.deepstack_visual_indexes)) if j < n_lm)
    return _adapter(config, "qwen3_vl", QWEN3_CLASSES, False, "vision_config.hidden_size", deepstack,
                    notes="DeepStack: lm.hidden.L and lm.input.L+1 differ at image positions after layers "
                          f"{list(deepstack)}")
