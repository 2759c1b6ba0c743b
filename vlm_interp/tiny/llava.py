"""Tiny LLaVA and LLaVA-NeXT: a CLIP vision tower and a 2-layer Llama."""

from __future__ import annotations

import transformers as tf

from . import register
from .common import IMAGE_SIZE, PATCH, llama_config, vision_config, word_tokenizer


@register("llava", "llava_next")
def build(family: str):
    tok = word_tokenizer()
    image_id = tok.convert_tokens_to_ids("<image>")
    text = tf.LlamaConfig(**llama_config(len(tok)))
    vision = tf.CLIPVisionConfig(**vision_config())
    if family == "llava":
        config = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                                projector_hidden_act="gelu")
        model = tf.LlavaForConditionalGeneration(config)
        images = tf.CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                          crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
        processor = tf.LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=PATCH,
                                      vision_feature_select_strategy="default", num_additional_image_tokens=1)
        return model, processor
    pinpoints = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE],
                 [2 * IMAGE_SIZE, 2 * IMAGE_SIZE]]
    config = tf.LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                                image_grid_pinpoints=pinpoints)
    model = tf.LlavaNextForConditionalGeneration(config)
    images = tf.LlavaNextImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                           crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                           image_grid_pinpoints=pinpoints)
    processor = tf.LlavaNextProcessor(image_processor=images, tokenizer=tok, patch_size=PATCH,
                                      vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return model, processor
