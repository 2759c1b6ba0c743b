"""Tiny InternVL (the -hf classes): an InternViT over 16-pixel tiles in 4-pixel patches, pixel shuffle, a Qwen2.

A 32x32 image becomes 2x2 tiles plus a thumbnail: 5 tiles of a CLS token and 4x4 patches in the
vision tower, 5 x 4 ``<IMG_CONTEXT>`` tokens between ``<img>`` and ``</img>`` in the LM. The layer
scales (``lambda_1``, ``lambda_2``) are drawn at random so that a wrong account of them shows.
"""

from __future__ import annotations

import torch
import transformers as tf

from . import register
from .common import llama_config, vision_config, word_tokenizer

TILE, TILE_PATCH = 16, 4
NAMED = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
         "video_token": "<video>"}
TEMPLATE = ("{% for m in messages %}{{ m['role'] | upper }}:{% for c in m['content'] %}"
            "{% if c['type'] == 'image' %} <IMG_CONTEXT>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
            "\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")

@register("internvl")
def build(family: str):
    tok = word_tokenizer(extra=tuple(NAMED.values()), named=NAMED)
    text = tf.Qwen2Config(**{**llama_config(len(tok)), "model_type": "qwen2"})
    vision = tf.InternVLVisionConfig(**vision_config(image_size=TILE, patch_size=TILE_PATCH))
    seq = (TILE // TILE_PATCH // 2) ** 2
    config = tf.InternVLConfig(vision_config=vision, text_config=text, image_token_id=tok.context_image_token_id,
                               image_seq_length=seq)
    model = tf.InternVLForConditionalGeneration(config)
    with torch.no_grad():
        for layer in model.model.vision_tower.encoder.layer:
            layer.lambda_1.uniform_(0.2, 2.0)
            layer.lambda_2.uniform_(0.2, 2.0)
    images = tf.GotOcr2ImageProcessorPil(size={"height": TILE, "width": TILE}, crop_to_patches=True, min_patches=1,
                                         max_patches=4)
    processor = tf.InternVLProcessor(image_processor=images, tokenizer=tok, video_processor=tf.InternVLVideoProcessor(),
                                     image_seq_length=seq, chat_template=TEMPLATE)
    return model, processor
