"""Tiny Mllama: local and global vision encoders over up to 4 tiles of 16 pixels in 4-pixel patches, and a 3-layer
Llama whose middle layer is a cross-attention layer.

A 32x32 image fills a 2x2 canvas: 4 tiles of a CLS token, 16 patches and 7 padding positions in the vision
encoders, 4 x 17 vision tokens for the cross-attention layer. The tanh gates, zero at initialisation (which would
hide the image from the LM), are drawn at random.
"""

from __future__ import annotations

import torch
import transformers as tf

from . import register
from .common import llama_config, vision_config, word_tokenizer

TILE, TILE_PATCH = 16, 4
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] | upper }}:{% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}<|image|>{% else %} {{ c['text'] }}{% endif %}{% endfor %}"
            "\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


@register("mllama")
def build(family: str):
    tok = word_tokenizer(image_token=False, extra=("<|image|>", "<|python_tag|>"), named={"image_token": "<|image|>"})
    vision = vision_config(image_size=TILE, patch_size=TILE_PATCH, num_global_layers=2, max_num_tiles=4,
                           intermediate_layers_indices=[0], vision_output_dim=64)
    vision["attention_heads"] = vision.pop("num_attention_heads")
    text = {k: v for k, v in llama_config(len(tok)).items() if k != "model_type"}
    text.update(num_hidden_layers=3, cross_attention_layers=[1])
    config = tf.MllamaConfig(vision_config=tf.MllamaVisionConfig(**vision), text_config=tf.MllamaTextConfig(**text),
                             image_token_index=tok.image_token_id)
    model = tf.MllamaForConditionalGeneration(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate", "gate_attn", "gate_ffn")):
                param.uniform_(0.5, 1.5)
    images = tf.MllamaImageProcessorPil(size={"height": TILE, "width": TILE}, max_image_tiles=4)
    return model, tf.MllamaProcessor(image_processor=images, tokenizer=tok, chat_template=TEMPLATE)
