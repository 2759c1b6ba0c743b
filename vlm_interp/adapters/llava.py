"""LLaVA (1.5): CLIP vision tower, projector, decoder LM with image tokens in its sequence."""

from __future__ import annotations

from .base import Adapter, NoisePlace, Tower
from .tables import CLIP_PATCHES, CLIP_VISION_LAYER, DECODER_PADDING, SELF_ATTN, lm_tower

MODEL_CLASSES = ("LlavaForConditionalGeneration",)
# the projector MLP that maps each CLIP token into the LM: its two linear layers, around its activation
PATCH_PROJECTOR = ("model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2")


def clip_vision_tower(prefix: str = "model.vision_tower") -> Tower:
    return Tower(f"{prefix}.encoder.layers", CLIP_VISION_LAYER, "vision_config.num_attention_heads",
                 description="CLIP vision encoder", residual_sum=True, attention=SELF_ATTN)


def patch_tokens(config, inputs) -> int:
    """Image tokens LLaVA puts in the LM sequence for one image: one per patch (+CLS if 'full')."""
    h, w = inputs["pixel_values"].shape[-2:]
    p = config.vision_config.patch_size
    return (h // p) * (w // p) + (1 if config.vision_feature_select_strategy == "full" else 0)


def lm_image_boxes(config, image_hw: tuple[int, int], frame: list, inputs: dict | None = None) -> list:
    """One box per LM image token: the patches in row-major order, after CLS if 'full' (it covers no patch)."""
    return ([None] if config.vision_feature_select_strategy == "full" else []) + list(frame)


def build(config) -> Adapter:
    return Adapter(
        family="llava",
        model_classes=MODEL_CLASSES,
        towers={"vision": clip_vision_tower(), "lm": lm_tower(config, "model.language_model", "lm_head")},
        decoder="causal",
        default_template="USER: <image>\n{question} ASSISTANT:",
        image_in_lm=True,
        image_tokens=patch_tokens,
        image_placeholder=True,
        lm_image_boxes=lm_image_boxes,
        patch_map_tower="lm",
        vision_root="model.vision_tower",
        patch_projector=PATCH_PROJECTOR,
        noise_places={
            "embeddings": NoisePlace("model.multi_modal_projector", "output", "lm", "group", "text_config.hidden_size",
                                     "projected image features, scattered in order into the LM's image-token positions"),
            "patches": CLIP_PATCHES,
        },
        padding=DECODER_PADDING,
    )
