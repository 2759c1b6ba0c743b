"""Tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL: 4-pixel patches merged 2 x 2, a 2-layer M-RoPE decoder.

A 32 x 32 image is not resized (it is a multiple of patch x merge = 8 pixels): 8 x 8 patches,
4 x 4 image tokens. Qwen2.5-VL's 16-pixel attention windows hold 2 x 2 merged blocks, so its vision
positions are in a window order that differs from the row-major one; Qwen3-VL adds DeepStack
features of vision block 0 after LM layer 0.
"""

from __future__ import annotations

import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers

from . import register
from .common import WORDS

PATCH, MERGE = 4, 2
SPECIALS = ["<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]
# the Qwen chat layout, written here (the real templates cannot be downloaded)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_tokenizer() -> tf.PreTrainedTokenizerFast:
    """A word-level tokenizer over the shared words with Qwen's chat and vision special tokens."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", unk_token="<unk>",
                                      eos_token="<|im_end|>", additional_special_tokens=SPECIALS[2:])


@register("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
def build(family: str):
    tok = qwen_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=len(tok), max_position_embeddings=256, pad_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], bos_token_id=None,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=2, out_hidden_size=32, initializer_range=0.02)
    special = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=32, mlp_ratio=2, num_heads=4, patch_size=PATCH,
                      spatial_merge_size=MERGE, temporal_patch_size=2, initializer_range=0.02)
        model = tf.Qwen2VLForConditionalGeneration(tf.Qwen2VLConfig(vision_config=vision, text_config=text,
                                                                    **special))
        processor_class, video_class = tf.Qwen2VLProcessor, tf.Qwen2VLVideoProcessor
    elif family == "qwen2_5_vl":
        vision.update(window_size=4 * PATCH, fullatt_block_indexes=[1])
        model = tf.Qwen2_5_VLForConditionalGeneration(tf.Qwen2_5_VLConfig(vision_config=vision, text_config=text,
                                                                          **special))
        processor_class, video_class = tf.Qwen2_5_VLProcessor, tf.Qwen2VLVideoProcessor
    else:
        vision.update(num_position_embeddings=64, deepstack_visual_indexes=[0])
        text.update(head_dim=8)
        text["rope_parameters"]["mrope_interleaved"] = True
        model = tf.Qwen3VLForConditionalGeneration(tf.Qwen3VLConfig(vision_config=vision, text_config=text, **special))
        processor_class, video_class = tf.Qwen3VLProcessor, tf.Qwen3VLVideoProcessor
    # images from 8 x 8 to 64 x 64 pixels keep their size (up to the multiple of 8)
    size = {"shortest_edge": 8 * 8, "longest_edge": 64 * 64}
    geometry = dict(patch_size=PATCH, temporal_patch_size=2, merge_size=MERGE)
    images = tf.Qwen2VLImageProcessorPil(size=size, **geometry)
    videos = video_class(size=size, **geometry)  # the processors require one; it needs torchvision
    processor = processor_class(image_processor=images, tokenizer=tok, video_processor=videos,
                                chat_template=CHAT_TEMPLATE)
    return model, processor
