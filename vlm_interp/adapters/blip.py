"""BLIP-VQA: ViT, a question encoder that cross-attends to the image, an answer decoder.

The question encoder is the ``text`` tower (NOTICE studied its cross-attention heads);
the answer decoder, which produces the answer, is the ``lm`` tower.
"""

from __future__ import annotations

from .base import Adapter, NoisePlace, Tower
from .tables import BERT_XATTN_LAYER, BLIP_PATCHES, BLIP_VISION_ATTENTION, BLIP_VISION_LAYER, blip_text_attention

MODEL_CLASSES = ("BlipForQuestionAnswering",)


def build(config) -> Adapter:
    return Adapter(
        family="blip",
        model_classes=MODEL_CLASSES,
        towers={
            "vision": Tower("vision_model.encoder.layers", BLIP_VISION_LAYER, "vision_config.num_attention_heads",
                            description="ViT", residual_sum=True, attention=BLIP_VISION_ATTENTION),
            "text": Tower("text_encoder.encoder.layer", BERT_XATTN_LAYER, "text_config.num_attention_heads",
                          description="question encoder, cross-attends to the image",
                          attention=blip_text_attention("vision")),
            "lm": Tower("text_decoder.bert.encoder.layer", BERT_XATTN_LAYER, "text_config.num_attention_heads",
                        description="answer decoder, cross-attends to the question encoding",
                        attention=blip_text_attention("text", "BLIP-VQA's answer decoder never attends to image "
                                                      "tokens: it cross-attends to the question encoder's output")),
        },
        decoder="blip",
        default_template="{question}",
        image_in_lm=False,
        logits_module="text_decoder",
        patch_map_tower="vision",
        vision_root="vision_model",
        noise_places={
            "embeddings": NoisePlace("vision_model", "output", "vision", "position", "vision_config.hidden_size",
                                     "the image embeddings the question encoder cross-attends to (no image tokens in "
                                     "the LM)"),
            "patches": BLIP_PATCHES,
        },
        # no padding: the answer decoder's cross-attention reads padded question positions (transformers passes it
        # no mask for them in generate, and its forward's mask does not reach the scores; measured with 5.24), so
        # batched evaluation groups questions of equal token length
        padding={},
    )
