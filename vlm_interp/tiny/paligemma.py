"""Tiny PaliGemma 2 (a Gemma 2 LM; PaliGemma 1's Gemma with ``gemma2=False``) and a SigLIP vision tower."""

from __future__ import annotations

import transformers as tf

from . import register
from .common import IMAGE_SIZE, PATCH, vision_config, word_tokenizer
from .gemma3 import gemma_text_config

SOFTCAP = 2.0  # small, so that the final-logit soft cap visibly bends the tiny model's logits


def paligemma(gemma2: bool = True):
    """``(model, processor)``: the processor first, because it adds PaliGemma's location and segment tokens."""
    images = tf.SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    images.image_seq_length = (IMAGE_SIZE // PATCH) ** 2
    tok = word_tokenizer(words=("en",))
    processor = tf.PaliGemmaProcessor(image_processor=images, tokenizer=tok)
    if gemma2:
        text = tf.Gemma2Config(**gemma_text_config(len(tok), final_logit_softcapping=SOFTCAP))
    else:
        text = tf.GemmaConfig(**{k: v for k, v in gemma_text_config(len(tok)).items()
                                 if k not in ("sliding_window", "layer_types", "query_pre_attn_scalar")})
    width = text.hidden_size
    config = tf.PaliGemmaConfig(text_config=text,
                                vision_config=tf.SiglipVisionConfig(**vision_config(vision_use_head=False,
                                                                                    projection_dim=width)),
                                image_token_index=tok.convert_tokens_to_ids("<image>"), projection_dim=width,
                                hidden_size=width)
    return tf.PaliGemmaForConditionalGeneration(config), processor


@register("paligemma")
def build(family: str):
    return paligemma(gemma2=True)
