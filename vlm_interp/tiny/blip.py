"""Tiny BLIP-VQA, BLIP-2 and InstructBLIP: a BLIP vision tower, BERT-style text models or a Q-Former and a Llama."""

from __future__ import annotations

import transformers as tf

from . import register
from .common import IMAGE_SIZE, bert_config, llama_config, vision_config, word_tokenizer


@register("blip", "blip2", "instructblip")
def build(family: str):
    images = tf.BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    if family == "blip":
        tok = word_tokenizer(bert_style=True)
        ids = {t: tok.convert_tokens_to_ids(t) for t in ("[PAD]", "[SEP]", "[DEC]")}
        text = bert_config(len(tok), pad_token_id=ids["[PAD]"], sep_token_id=ids["[SEP]"], bos_token_id=ids["[DEC]"])
        model = tf.BlipForQuestionAnswering(tf.BlipConfig(vision_config=vision_config(), text_config=text))
        return model, tf.BlipProcessor(image_processor=images, tokenizer=tok)
    # BLIP-2 processors register the image token themselves
    tok = word_tokenizer(image_token=False)
    image_id = tok.convert_tokens_to_ids("<image>")
    qtok = word_tokenizer(bert_style=True)
    n_query = 4
    kw = dict(vision_config=vision_config(), qformer_config=bert_config(len(qtok)), text_config=llama_config(len(tok)),
              num_query_tokens=n_query, image_token_index=image_id)
    if family == "blip2":
        model = tf.Blip2ForConditionalGeneration(tf.Blip2Config(**kw))
        return model, tf.Blip2Processor(image_processor=images, tokenizer=tok, num_query_tokens=n_query)
    model = tf.InstructBlipForConditionalGeneration(tf.InstructBlipConfig(**kw))
    return model, tf.InstructBlipProcessor(image_processor=images, tokenizer=tok, qformer_tokenizer=qtok,
                                           num_query_tokens=n_query)
