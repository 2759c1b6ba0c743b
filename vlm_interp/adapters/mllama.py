"""Mllama (Llama 3.2 Vision): a local and a global vision encoder over image tiles; the LM reads the image only
through cross-attention decoder layers mixed into its layer list.

The image processor picks a ``rows x cols`` tile canvas (an aspect ratio the model supports), resizes the
image to fit it keeping its aspect ratio, pads the rest, and cuts the canvas into tiles row by row; the
tile count is padded to ``max_num_tiles``. Both vision encoders run one sequence per image: every tile in
turn, each a CLS token, its patches row-major and padding to a multiple of 8 (towers ``vision``, the local
encoder, and ``vision_global``, the gated global encoder). The projector turns each tile's CLS and patches
(padding removed) into the vision tokens the LM's cross-attention layers read as keys and values: the token
sequence ``cross``, which holds the ``image`` and ``object`` groups that noise at ``embeddings`` addresses.

The LM's text holds one ``<|image|>`` token; its groups are ``question``, ``text`` and ``last``. Its layers
are self-attention layers (``attn``, ``head``) and cross-attention layers (``xattn``, ``xattn_head``; both
kinds have ``mlp``). Cross-attention layers scale ``xattn`` and ``mlp`` by the tanh of a learned gate before
the residual add (and zero the ``mlp`` of text rows before the image token); the global encoder gates its
``attn`` and ``mlp`` the same way: ``Tower.residual_scale`` says so, and the components are hooked before it.
The tracing fast path does not apply: cross-attention layers take the image's keys and values as keywords
(``cross_attention_states``), which it cannot replay, so it declines and names them.
"""

from __future__ import annotations

from .. import compat
from ..errors import ImageTokenMismatchError
from .base import Adapter, Attention, ImageLayout, NoisePlace, Slot, Tower
from .idefics3 import _cells
from .tables import DECODER_REPLAY, SELF_ATTN

MODEL_CLASSES = ("MllamaForConditionalGeneration",)

VISION_LAYER: dict[str, Slot] = {
    "input": ("", "input"),
    "hidden": ("", "output"),
    "attn": ("self_attn", "output"),
    "mlp": ("mlp", "output"),
    "head": ("self_attn.o_proj", "input"),
}
LM_LAYER: dict[str, Slot] = {
    "input": ("", "input"),
    "hidden": ("", "output"),
    "attn": ("self_attn", "output"),  # self-attention layers only
    "mlp": ("mlp", "output"),  # on cross-attention layers before the tanh gate
    "head": ("self_attn.o_proj", "input"),
    "xattn": ("cross_attn", "output"),  # cross-attention layers only, before the tanh gate
    "xattn_head": ("cross_attn.o_proj", "input"),
}
GATES = {"attn": ("gate_attn", "tanh"), "mlp": ("gate_ffn", "tanh")}
XATTN_GATES = {"xattn": ("cross_attn_attn_gate", "tanh"), "mlp": ("cross_attn_mlp_gate", "tanh")}


def image_tokens(config, inputs) -> int:
    """``<|image|>`` tokens in the text: one per image."""
    return int(inputs["pixel_values"].shape[1])


def image_layout(config, image_processor, image_hw: tuple[int, int], inputs: dict) -> ImageLayout:
    """Boxes of every vision-encoder position (tiles in turn, CLS, patches, padding) and of every vision token
    the cross-attention layers read (the same without padding); the LM holds no image token."""
    vc = config.vision_config
    tile, patch = int(inputs["pixel_values"].shape[-1]), int(vc.patch_size)
    side = tile // patch
    slots = side * side + 1
    padded = slots + (8 - slots % 8) % 8
    ratio_id = int(inputs["aspect_ratio_ids"].reshape(-1)[0])
    rows, cols = (int(v) for v in vc.supported_aspect_ratios[ratio_id - 1])
    tiles = int(inputs["pixel_values"].shape[2])
    if rows * cols > tiles:
        raise ImageTokenMismatchError(f"aspect ratio id {ratio_id} means {rows}x{cols} tiles, but pixel_values hold "
                                      f"{tiles}; process the image with this model's processor")
    height, width = compat.fit_to_canvas(image_hw, (rows * tile, cols * tile), tile)
    scale = (height / image_hw[0], width / image_hw[1])
    vision, cross, pixels = [], [], {}
    for t in range(tiles):
        if t >= rows * cols:  # a padding tile
            vision += [None] * padded
            cross += [None] * slots
            continue
        r, c = divmod(t, cols)
        boxes = _cells(scale, (r * tile, c * tile), side, patch)
        for k in range(side * side):
            pixels[len(vision) + 1 + k] = (t, *divmod(k, side))
        vision += ["cls", *boxes] + [None] * (padded - slots)
        cross += ["cls", *boxes]
    return ImageLayout(vision=vision, lm=[], pixels=pixels, other={"vision_global": list(vision), "cross": cross})


def build(config) -> Adapter:
    return Adapter(
        family="mllama",
        model_classes=MODEL_CLASSES,
        towers={
            "vision": Tower("model.vision_model.transformer.layers", VISION_LAYER, "vision_config.attention_heads",
                            description="local vision encoder, one sequence per image (tiles in turn)",
                            residual_sum=True,
                            attention=SELF_ATTN),
            "vision_global": Tower("model.vision_model.global_transformer.layers", VISION_LAYER,
                                   "vision_config.attention_heads", residual_scale=GATES,
                                   description="global vision encoder (tanh-gated), same positions", residual_sum=True,
                                   attention=SELF_ATTN),
            "lm": Tower("model.language_model.layers", LM_LAYER, "text_config.num_attention_heads",
                        kv_heads="text_config.num_key_value_heads", residual_scale=XATTN_GATES,
                        description="Llama with cross-attention layers reading the vision tokens",
                        # not a plain sum: cross-attention layers multiply the MLP output by a row mask (text rows
                        # before the image get none) between the hooked output and the residual add
                        residual_sum=False,
                        attention={"attn": Attention("self_attn"), "xattn": Attention("cross_attn", keys="cross")},
                        tail=("model.language_model.norm", "lm_head"), replay=DECODER_REPLAY),
        },
        decoder="causal",
        default_template="USER:<|image|> {question}\nASSISTANT:",
        image_in_lm=False,
        image_tokens=image_tokens,
        image_placeholder=True,
        image_layout=image_layout,
        text_aligned_inputs=("cross_attention_mask",),
        vision_root="model.vision_model",
        noise_places={
            "embeddings": NoisePlace("model.multi_modal_projector", "output", "cross", "position",
                                     "text_config.hidden_size", "projected vision tokens the cross-attention layers "
                                     "read (tiles in turn: CLS and patches)", fold=True),
            "patches": NoisePlace("model.vision_model.transformer.layers.0", "input", "vision", "position",
                                  "vision_config.hidden_size", "the local encoder's input: patch, CLS, position and "
                                  "tile embeddings of every tile"),
        },
        notes="LM groups are question, text and last; image and object live on 'cross' and the vision towers",
    )
