"""Text side of the shapes world: its corpus and a small byte-level BPE tokenizer.

The tokenizer is trained on the world's questions, answers and captions plus a short
built-in English filler, so that (as with real tokenizers) frequent world words are
single tokens while rarer ones split into several.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from .shapes import World
from .tasks import scene_qa

BOS, EOS, PAD, UNK, IMAGE = "<s>", "</s>", "<pad>", "<unk>", "<image>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD, UNK, IMAGE)

DEFAULT_VOCAB_SIZE = 340
"""Chosen so that, on ``world_corpus`` output, common words ("red", "circle", "the")
are single tokens while rarer world words (e.g. "diamond", "purple") still split."""

FILLER_TEXT = """\
The morning was quiet, and the old town slowly woke under a grey sky.
A baker opened his shop early and put warm bread on the long wooden shelf.
Children walked to school with heavy bags and talked about the game they had played.
My sister likes to read books about distant places, rivers and mountains.
We took the train to the coast last summer and stayed for almost two weeks.
The weather changed every day, so we carried coats even when the sun was bright.
Some people prefer tea in the afternoon, while others drink coffee all day long.
He forgot his keys again and had to wait outside until his friend came home.
The library keeps newspapers from many years ago in a small room upstairs.
On Sundays the market fills the square with fruit, cheese, flowers and music.
She wrote a letter to her grandmother and told her about the new job.
Learning to play the piano takes patience, practice and a little courage.
The river rose after the storm, but the bridge stood strong through the night.
Our neighbour grows tomatoes, beans and potatoes in a garden behind the house.
When the lights went out, everyone laughed and looked for candles in the kitchen.
A good teacher listens carefully and explains hard ideas with simple words.
The museum was closed for repairs, so we walked along the river instead.
They planned to paint the fence, but it rained for the whole weekend.
Most birds leave the north before winter and return when the days grow longer.
I usually cook dinner at seven and wash the dishes right after we eat.
The doctor asked a few questions, wrote a note and told him to rest.
Every city has its own sounds: buses, bells, voices and the wind between buildings.
We counted the stars from the hill until our eyes were tired and cold.
The company hired three new workers to help with the busy season.
Please close the window before you leave, because the cat likes to escape.
Her brother fixed the bicycle with a borrowed tool and some patience.
After the meeting, the team went out for lunch and shared a large pizza.
The road through the forest was narrow, dark and full of sharp turns.
An honest answer is often better than a clever one.
Yesterday the wind was so strong that it knocked over the chairs on the porch.
Reading before sleep helps many people forget the worries of the day.
The farmer sold his eggs at the corner every Saturday morning.
We should leave soon if we want to arrive before the shops close.
A small boat drifted across the lake while the fishermen waited in silence.
The students finished their project and presented it to the whole class.
Time moves slowly in the waiting room of a busy hospital.
If you mix flour, water and salt, you can make a simple kind of bread.
The concert ended late, and the streets were empty when we walked home.
Good friends remember the little things you tell them.
"""
"""Plain English written for this module (a few hundred words), mixed into tokenizer
training so that world words compete with ordinary words for merges."""


def world_corpus(world: World, n: int, seed: int = 0) -> Iterator[str]:
    """Yield the world's text for ``n`` scenes: one line "question answer" per task the
    scene supports (existence, attribute, relation, caption)."""
    rng = np.random.default_rng([seed, 0x7E27])
    for scene in world.iter_scenes(n, seed):
        for qa in scene_qa(world, scene, rng):
            yield f"{qa.question} {qa.answer}"


def train_bpe_tokenizer(
    corpus_iter: Iterable[str],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    include_filler: bool = True,
    add_bos: bool = True,
    model_max_length: int = 512,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``corpus_iter`` (plus FILLER_TEXT) and wrap it as a
    transformers tokenizer with <s>, </s>, <pad>, <unk> and the unsplittable <image>.

    Deterministic for a fixed corpus. ``add_bos`` prepends <s> when encoding, as
    Llama-style tokenizers do.
    """
    n_base = len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS)
    if vocab_size < n_base:
        raise ValueError(f"vocab_size {vocab_size} is below the byte alphabet plus specials ({n_base})")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def lines() -> Iterator[str]:
        yield from corpus_iter
        if include_filler:
            yield from FILLER_TEXT.splitlines()

    tok.train_from_iterator(lines(), trainer=trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[IMAGE],
        model_max_length=model_max_length,
    )


def world_words(world: World) -> list[str]:
    """The content words of the world (shapes, colours, relation words, answers)."""
    c = world.config
    return list(c.shapes) + list(c.colors) + ["left", "right", "above", "below", "yes", "no"]


def multi_token_words(tokenizer: PreTrainedTokenizerFast, words: Iterable[str]) -> dict[str, list[str]]:
    """Words (as they appear mid-sentence, after a space) that split into several tokens."""
    out = {}
    for w in words:
        pieces = tokenizer.tokenize(" " + w)
        if len(pieces) > 1:
            out[w] = pieces
    return out


__all__ = [
    "BOS", "DEFAULT_VOCAB_SIZE", "EOS", "FILLER_TEXT", "IMAGE", "PAD", "SPECIAL_TOKENS", "UNK",
    "multi_token_words", "train_bpe_tokenizer", "world_corpus", "world_words",
]
