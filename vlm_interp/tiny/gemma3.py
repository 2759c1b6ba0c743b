"""Tiny Gemma 3: a SigLIP vision tower pooled to 2x2 image tokens, a 2-layer Gemma 3 LM (one sliding-window layer)."""

from __future__ import annotations

import torch
import transformers as tf

from . import register
from .common import IMAGE_SIZE, vision_config, word_tokenizer

MARKERS = ("<start_of_image>", "<end_of_image>", "<image_soft_token>", "<start_of_turn>", "<end_of_turn>")
# Gemma's chat format (the real template also writes BOS, which the tiny tokenizer adds itself)
TEMPLATE = ("{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
            "{% for c in m['content'] %}{% if c['type'] == 'image' %}<start_of_image>{% else %}{{ c['text'] }}"
            "{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
            "{% endif %}")
TOKENS_PER_IMAGE = 4  # the 4x4 patch grid average-pooled 2x2


def gemma_text_config(vocab: int, **kw) -> dict:
    """A 2-layer Gemma 2/3 text config: a sliding-window layer (window 8), then a global one; head_dim 8."""
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, vocab_size=vocab,
                max_position_embeddings=256, pad_token_id=0, bos_token_id=2, eos_token_id=3, sliding_window=8,
                layer_types=["sliding_attention", "full_attention"], **kw)


@register("gemma3")
def build(family: str):
    tok = word_tokenizer(extra=MARKERS, words=("model",),
                         named={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                                "eoi_token": "<end_of_image>"})
    ids = {t: tok.convert_tokens_to_ids(t) for t in MARKERS}
    config = tf.Gemma3Config(
        text_config=tf.Gemma3TextConfig(**gemma_text_config(len(tok))),
        vision_config=tf.SiglipVisionConfig(**vision_config(vision_use_head=False)),
        mm_tokens_per_image=TOKENS_PER_IMAGE, image_token_index=ids["<image_soft_token>"],
        boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"])
    model = tf.Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # transformers starts the image projection at zero: the image would have no effect at all
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=config.initializer_range)
    images = tf.Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = tf.Gemma3Processor(image_processor=images, tokenizer=tok, image_seq_length=TOKENS_PER_IMAGE,
                                   chat_template=TEMPLATE)
    return model, processor
