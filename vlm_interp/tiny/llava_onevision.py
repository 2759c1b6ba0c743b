"""Tiny LLaVA-OneVision: a SigLIP vision tower and a 2-layer Qwen2, any-resolution tiles up to 4x4 of the base view."""

from __future__ import annotations

import transformers as tf

from . import register
from .common import IMAGE_SIZE, llama_config, vision_config, word_tokenizer

# A Qwen-free stand-in for the real chat template (which the processor of a real checkpoint carries).
TEMPLATE = ("{% for m in messages %}{{ m['role'] | upper }}: {% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
            "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
# up to 4x4 tiles: 128x128 images give a 16x16 feature grid, which anyres_max_9 shrinks to 12x12
PINPOINTS = [[IMAGE_SIZE * a, IMAGE_SIZE * b] for a, b in ((1, 1), (1, 2), (2, 1), (2, 2), (3, 3), (4, 4))]


@register("llava_onevision")
def build(family: str):
    tok = word_tokenizer()
    text = {k: v for k, v in llama_config(len(tok)).items() if k != "model_type"}
    config = tf.LlavaOnevisionConfig(
        text_config=tf.Qwen2Config(**text), vision_config=tf.SiglipVisionConfig(**vision_config(vision_use_head=False)),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy="full", vision_feature_layer=-1)
    model = tf.LlavaOnevisionForConditionalGeneration(config)
    images = tf.LlavaOnevisionImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                                image_grid_pinpoints=PINPOINTS)
    grid = (IMAGE_SIZE // config.vision_config.patch_size) ** 2
    processor = tf.LlavaOnevisionProcessor(image_processor=images, tokenizer=tok,
                                           video_processor=tf.LlavaOnevisionVideoProcessor(), num_image_tokens=grid,
                                           vision_feature_select_strategy="full", chat_template=TEMPLATE)
    return model, processor
