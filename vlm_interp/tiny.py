"""Tiny randomly initialised models of every supported family, with real processors.

Used by the tests (every architecture on the real transformers classes) and by anyone who
wants to try the library without weights. Sizes are minimal: 32-wide, 2 layers, 32x32
images in 8-pixel patches. The tokenizer is a word-level one over a small vocabulary.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

FAMILIES = ("llava", "llava_next", "blip", "blip2", "instructblip")

WORDS = (
    "yes no not is are there a an the in on of image picture what which color shape how many "
    "circle square triangle star cross diamond red green blue yellow purple orange white "
    "left right above below and it describe question answer user assistant please one word "
    "Is Are What Which How Describe There USER ASSISTANT Question Answer : ? . , \n"
).split(" ")
WORDS = [w for w in dict.fromkeys(w.strip() for w in WORDS) if w]

IMAGE_SIZE, PATCH = 32, 8


def word_tokenizer(bert_style: bool = False, image_token: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over :data:`WORDS`; BERT-style specials for BLIP's text models."""
    if bert_style:
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    else:
        specials = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    unk = specials[1]
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bert_style:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
            mask_token="[MASK]", bos_token="[DEC]", additional_special_tokens=["[DEC]"],
        )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    extra = {"extra_special_tokens": {"image_token": "<image>"}} if image_token else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>", **extra
    )


def _llama(vocab: int, **kw) -> dict:
    return dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256,
                pad_token_id=0, bos_token_id=2, eos_token_id=3, **kw)


def _vision(**kw) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                image_size=IMAGE_SIZE, patch_size=PATCH, initializer_range=0.02, **kw)


def _bert(vocab: int, **kw) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=vocab, max_position_embeddings=128, encoder_hidden_size=32, **kw)


def tiny(family: str, seed: int = 0):
    """Return ``(model, processor)``: a tiny random model of ``family`` and a matching processor."""
    import transformers as tf

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    torch.manual_seed(seed)
    if family in ("llava", "llava_next"):
        tok = word_tokenizer()
        image_id = tok.convert_tokens_to_ids("<image>")
        text = tf.LlamaConfig(**_llama(len(tok)))
        vision = tf.CLIPVisionConfig(**_vision())
        if family == "llava":
            config = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                                    projector_hidden_act="gelu")
            model = tf.LlavaForConditionalGeneration(config)
            images = tf.CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                              crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
            processor = tf.LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=PATCH,
                                          vision_feature_select_strategy="default",
                                          num_additional_image_tokens=1)
        else:
            pinpoints = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE],
                         [2 * IMAGE_SIZE, 2 * IMAGE_SIZE]]
            config = tf.LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                                        image_grid_pinpoints=pinpoints)
            model = tf.LlavaNextForConditionalGeneration(config)
            images = tf.LlavaNextImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                                   crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                                   image_grid_pinpoints=pinpoints)
            processor = tf.LlavaNextProcessor(image_processor=images, tokenizer=tok, patch_size=PATCH,
                                              vision_feature_select_strategy="default",
                                          num_additional_image_tokens=1)
    elif family == "blip":
        tok = word_tokenizer(bert_style=True)
        ids = {t: tok.convert_tokens_to_ids(t) for t in ("[PAD]", "[SEP]", "[DEC]")}
        text = _bert(len(tok), pad_token_id=ids["[PAD]"], sep_token_id=ids["[SEP]"], bos_token_id=ids["[DEC]"])
        config = tf.BlipConfig(vision_config=_vision(), text_config=text)
        model = tf.BlipForQuestionAnswering(config)
        images = tf.BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
        processor = tf.BlipProcessor(image_processor=images, tokenizer=tok)
    else:  # BLIP-2 processors register the image token themselves
        tok = word_tokenizer(image_token=False)
        image_id = tok.convert_tokens_to_ids("<image>")
        qtok = word_tokenizer(bert_style=True)
        n_query = 4
        kw = dict(vision_config=_vision(), qformer_config=_bert(len(qtok)), text_config=_llama(len(tok)),
                  num_query_tokens=n_query, image_token_index=image_id)
        images = tf.BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
        if family == "blip2":
            model = tf.Blip2ForConditionalGeneration(tf.Blip2Config(**kw))
            processor = tf.Blip2Processor(image_processor=images, tokenizer=tok, num_query_tokens=n_query)
        else:
            model = tf.InstructBlipForConditionalGeneration(tf.InstructBlipConfig(**kw))
            processor = tf.InstructBlipProcessor(image_processor=images, tokenizer=tok, qformer_tokenizer=qtok,
                                                 num_query_tokens=n_query)
    model.eval()
    return model, processor
