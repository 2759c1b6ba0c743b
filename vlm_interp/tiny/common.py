"""What every tiny test configuration shares: sizes, the word-level tokenizer, and config builders."""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

WORDS = (
    "yes no not is are there a an the in on of image picture what which color shape how many "
    "circle square triangle star cross diamond red green blue yellow purple orange white "
    "left right above below and it describe question answer user assistant please one word "
    "Is Are What Which How Describe There USER ASSISTANT Question Answer : ? . , \n"
).split(" ")
WORDS = [w for w in dict.fromkeys(w.strip() for w in WORDS) if w]

IMAGE_SIZE, PATCH = 32, 8


def word_tokenizer(bert_style: bool = False, image_token: bool = True, extra: tuple[str, ...] = (),
                   named: dict[str, str] | None = None, words: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over :data:`WORDS`; BERT-style specials for BLIP's text models.

    ``extra``: more special tokens (a family's image and turn markers), after the usual ones;
    ``named``: special tokens the processor reads as tokenizer attributes (``{"boi_token": "<start_of_image>"}``);
    ``words``: more words, after :data:`WORDS` (a family's prompt words), so the usual ids stay as they are.
    """
    if bert_style:
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    else:
        specials = ["<pad>", "<unk>", "<s>", "</s>", "<image>", *extra]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS + [w for w in words if w not in WORDS])}
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
    names = {**({"image_token": "<image>"} if image_token else {}), **(named or {})}
    kw = {"extra_special_tokens": names} if names else {}
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>", **kw
    )
    if extra:  # kept whole by the pre-tokenizer, with their ids in the vocabulary above
        out.add_tokens([AddedToken(t, special=True, normalized=False) for t in extra], special_tokens=True)
    return out


def llama_config(vocab: int, **kw) -> dict:
    return dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256,
                pad_token_id=0, bos_token_id=2, eos_token_id=3, **kw)


def vision_config(**kw) -> dict:
    return {**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   image_size=IMAGE_SIZE, patch_size=PATCH, initializer_range=0.02), **kw}


def bert_config(vocab: int, **kw) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=vocab, max_position_embeddings=128, encoder_hidden_size=32, **kw)


