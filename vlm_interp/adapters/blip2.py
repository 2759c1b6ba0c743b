"""BLIP-2 and InstructBLIP: ViT, Q-Former with cross-attention to the image, decoder LM fed the queries."""

from __future__ import annotations

from .base import Adapter, Padding, Tower
from .tables import (BLIP_PATCHES, BLIP_VISION_LAYER, DECODER_PADDING, QFORMER_ATTENTION, QFORMER_LAYER, QFORMER_QUERIES,
                     SELF_ATTN, lm_tower)

BLIP2_CLASSES = ("Blip2ForConditionalGeneration",)
INSTRUCTBLIP_CLASSES = ("InstructBlipForConditionalGeneration",)


def query_tokens(config, inputs) -> int:
    """Each image becomes ``num_query_tokens`` placeholder tokens in the LM sequence."""
    return config.num_query_tokens


def _towers(config) -> dict[str, Tower]:
    return {
        "vision": Tower("vision_model.encoder.layers", BLIP_VISION_LAYER, "vision_config.num_attention_heads",
                        description="ViT", residual_sum=True, attention=SELF_ATTN),
        "qformer": Tower("qformer.encoder.layer", QFORMER_LAYER, "qformer_config.num_attention_heads",
                         description="Q-Former (queries first, then instruction text for InstructBLIP)",
                         attention=QFORMER_ATTENTION),
        "lm": lm_tower(config, "language_model.model", "language_model.lm_head"),
    }


def build_blip2(config) -> Adapter:
    return Adapter(
        family="blip2",
        model_classes=BLIP2_CLASSES,
        towers=_towers(config),
        decoder="causal",
        default_template="Question: {question} Answer:",
        image_in_lm=True,
        image_tokens=query_tokens,
        patch_map_tower="vision",
        vision_root="vision_model",
        noise_places={"embeddings": QFORMER_QUERIES, "patches": BLIP_PATCHES},
        padding=DECODER_PADDING,
    )


# the Q-Former reads its instruction after the queries, both ways (no causal order): padding on the right moves nothing
QFORMER_PADDING = {
    "qformer_input_ids": Padding("right", ("qformer_tokenizer.pad_token_id",)),
    "qformer_attention_mask": Padding("right", 0),
}


def build_instructblip(config) -> Adapter:
    return Adapter(
        family="instructblip",
        model_classes=INSTRUCTBLIP_CLASSES,
        towers=_towers(config),
        decoder="causal",
        default_template="{question}",
        image_in_lm=True,
        image_tokens=query_tokens,
        patch_map_tower="vision",
        vision_root="vision_model",
        noise_places={"embeddings": QFORMER_QUERIES, "patches": BLIP_PATCHES},
        padding={**DECODER_PADDING, **QFORMER_PADDING},
    )
