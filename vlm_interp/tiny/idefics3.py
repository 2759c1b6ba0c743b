"""Tiny Idefics3 and SmolVLM: a SigLIP tower over 16-pixel tiles in 4-pixel patches, a 2x pixel shuffle, a Llama.

A 32x32 image is split into 2x2 tiles plus the global tile: 5 tiles of 4x4 patches in the vision
tower, 5 x 4 image tokens in the LM. SmolVLM's processor needs ``num2words`` (the ``families`` extra)
and a video processor (torchvision).
"""

from __future__ import annotations

import transformers as tf

from . import register
from .common import IMAGE_SIZE, llama_config, vision_config, word_tokenizer

TILE, TILE_PATCH = 16, 4
SEPARATORS = ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>",
              *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)))
# a short chat template in the shape of the real ones: the image placeholder, then the question
TEMPLATE = ("{% for m in messages %}{{ m['role'] | upper }}:{% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}<image>{% else %} {{ c['text'] }}{% endif %}{% endfor %}"
            "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


@register("idefics3", "smolvlm")
def build(family: str):
    tok = word_tokenizer(extra=SEPARATORS)
    image_id = tok.convert_tokens_to_ids("<image>")
    text = tf.LlamaConfig(**llama_config(len(tok)))
    seq = (TILE // TILE_PATCH // 2) ** 2
    sizes = dict(size={"longest_edge": IMAGE_SIZE}, max_image_size={"longest_edge": TILE})
    if family == "idefics3":
        vision = tf.Idefics3VisionConfig(**vision_config(image_size=TILE, patch_size=TILE_PATCH))
        model = tf.Idefics3ForConditionalGeneration(
            tf.Idefics3Config(vision_config=vision, text_config=text, image_token_id=image_id, scale_factor=2))
        processor = tf.Idefics3Processor(image_processor=tf.Idefics3ImageProcessorPil(**sizes), tokenizer=tok,
                                         image_seq_len=seq, chat_template=TEMPLATE)
        return model, processor
    vision = tf.SmolVLMVisionConfig(**vision_config(image_size=TILE, patch_size=TILE_PATCH))
    model = tf.SmolVLMForConditionalGeneration(
        tf.SmolVLMConfig(vision_config=vision, text_config=text, image_token_id=image_id, scale_factor=2))
    processor = tf.SmolVLMProcessor(image_processor=tf.SmolVLMImageProcessorPil(**sizes), tokenizer=tok,
                                    video_processor=tf.SmolVLMVideoProcessor(), image_seq_len=seq,
                                    chat_template=TEMPLATE)
    return model, processor
