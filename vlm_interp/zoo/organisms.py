"""Recipes of the model organisms: world, tokenizer, architecture and training knobs.

A recipe fully determines an organism together with its seed: ``build`` makes the untrained
model and its processor (real transformers classes), ``train.train`` trains it.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field, replace

import torch
import transformers as tf
from transformers import PreTrainedTokenizerFast

from .shapes import World, WorldConfig
from .text import train_bpe_tokenizer, world_corpus

# The zoo's world: objects large enough to see on a 64x64 canvas, a fifth of them weak (small and
# faint), and co-occurring pairs that plant a prior the models can fall back on. Every organism is
# measured on it (cards, POPE sets, compare); a recipe trains on it unless it sets its own world.
ORGANISM_WORLD = WorldConfig(
    radius_range=(7.0, 11.0),
    weak_radius_range=(4.0, 5.0),
    weak_contrast_range=(0.35, 0.55),
    p_weak=0.2,
    n_objects=(1, 3),
)

# shapes-llava's training world: weak objects are mostly partners pulled in by the prior, and the faint
# ones barely visible, so that in training a faint partner's "yes" is often predictable only from the
# object it co-occurs with (docs/research/organism-training.md, round 4, candidate A).
PRIOR_TRAINING_WORLD = replace(ORGANISM_WORLD, p_weak=0.1, p_weak_partner=0.6, weak_contrast_range=(0.12, 0.25))


@dataclass(frozen=True)
class Recipe:
    """Everything that defines one organism besides its seed."""

    name: str
    family: str  # the adapter family of the organism's transformers class, which ARCHITECTURES builds
    template: str
    world: WorldConfig = ORGANISM_WORLD
    vocab_size: int = 360
    width: int = 128
    vision_layers: int = 2
    lm_layers: int = 4
    # Initial weight std of the language model (transformers' initializer_range). 0.02 suits a 4096-wide
    # LLaMA; at width 128 it leaves attention logits near 0 at the start, and in our pilots attention then
    # learnt to pick out the one object a question names only slowly (docs/research/organism-training.md).
    # About 0.02 * sqrt(4096 / width) gives logits of LLaMA's size.
    lm_init_std: float = 0.02
    heads: int = 4
    kv_heads: int = 2
    qformer_layers: int = 2
    # Initial weight std of InstructBLIP's Q-Former, whose cross-attention must pick out the object the instruction
    # names (the same reason as lm_init_std).
    qformer_init_std: float = 0.02
    query_tokens: int = 16
    vision_steps: int = 1500
    vision_lr: float = 1e-3
    # Stage 1 also teaches each patch of an object which shapes lie left of / right of / above / below
    # that object (so a relation question becomes a lookup at the subject's patches).
    vision_relations: bool = False
    # How stage 1 keeps each patch's position readable: "regression" of its (row, column), or "classes":
    # row and column classification, which makes position as strong a feature as shape and colour; or
    # "object": each patch of an object classifies the cell of that object's centre and background patches
    # a "none" class, so position becomes an attribute of the object, like its colour.
    position_target: str = "regression"
    # What stage 1 trains the tower for. "heads": linear heads on the tower's tokens classify each patch's shape,
    # colour and position. "code": in LLaVA the tower and the projector's first layer are trained together
    # so that the projector's hidden activation is the scene code (scene_code.py: one-hot shape, colour, row
    # and column per patch, the other dimensions near 0); both stay frozen afterwards, and question answering
    # trains the projector's second layer and the LM. BLIP and InstructBLIP have no such layer: their tower's own
    # output becomes the code, standardised as its final layer norm leaves a token (train.standardised_code), and
    # stays frozen. From such a code the language side learnt to pick out the object a side or relation question
    # names (relations 92.8% / 93.0% / 94.5% for shapes-llava / -instructblip / -blip); from the "heads" tower's
    # features it did not (docs/research/organism-training-2.md).
    vision_output: str = "heads"
    # The projector's activation (LlavaConfig.projector_hidden_act). "sigmoid" bounds the "code" to [0, 1], so
    # every patch's code has the same size; a GELU code's values vary with the classifier's confidence, and
    # with such a code the LM did not learn to pick out the named object
    # (docs/research/organism-training-2.md, round 8).
    projector_act: str = "gelu"
    # "code" only: objects fainter than this contrast are background in the stage-1 code, as annotations skip
    # what annotators cannot see. The tower then cannot tell a faint object from none, and a question about a
    # faint partner is answerable only from the co-occurrence prior: that is where the planted prior acts.
    # Question answering then asks no colour, side or relation question about such an object (train.sample_qas):
    # only a guess could answer those, and in a third of the relation questions it would have to.
    code_min_contrast: float = 0.0
    # As in LLaVA, the pretrained vision tower stays frozen while the rest learns to answer.
    freeze_vision: bool = True
    vqa_steps: int = 4000
    lr: float = 3e-4
    batch: int = 32
    # Curriculum: the first ``warm_steps`` question-answering steps draw from ``warm_mix`` (tasks
    # that need only object identity), the rest from ``task_mix``. Without it, relation questions
    # (chance-level for a long time) kept existence answers at the prior in our trials.
    warm_steps: int = 1200
    warm_mix: dict = field(default_factory=lambda: {"existence": 0.6, "attribute": 0.4})
    task_mix: dict = field(default_factory=lambda: {"existence": 0.35, "attribute": 0.2, "relation": 0.35,
                                                   "caption": 0.1})
    # Optional finer curriculum: ``((first_step, mix[, max_objects]), ...)``; when given it replaces
    # warm_steps, warm_mix and task_mix (step ``s`` draws from the last entry with first_step <= s, from
    # scenes with at most max_objects objects when the entry gives it).
    curriculum: tuple = ()
    train_scenes: int = 20000
    seed: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["world"] = asdict(self.world)
        return d


# The knobs that made shapes-llava bind (docs/research/organism-training.md): existence alone first (mixed
# tasks from the start kept LLaVA's yes/no at the prior), then "which side is the circle on?" on one-object
# scenes, then the mixed tasks; a larger initial LM weight std, so that attention can pick out the object a
# question names (shapes-llava's colour 56.5% -> 89.0%, shapes-blip's 74.3% -> 87.7%; one run each: other runs
# of shapes-llava's recipe bind less, colour 67.2% with seed 1, 73.3% on two threads); position as row and
# column classes; and the training world that keeps the prior alive.
BINDING_KNOBS = dict(
    world=PRIOR_TRAINING_WORLD, lm_init_std=0.1, position_target="classes", lr=5e-4,
    curriculum=((0, {"existence": 1.0}),
                (300, {"existence": 0.3, "side": 0.7}, 1),
                (600, {"existence": 0.3, "attribute": 0.3, "side": 0.2, "relation_choice": 0.2}),
                (1600, {"existence": 0.3, "attribute": 0.25, "relation": 0.25, "side": 0.05,
                        "relation_choice": 0.05, "caption": 0.1})),
)

# shapes-llava's training world: every shape drawn with room for its partner gets it, and partners are weak 80% of
# the time. With PRIOR_TRAINING_WORLD, when a shape is visible and its partner is not (absent, or too faint for the
# code), the partner was there in 28-30% of training scenes: near the fence once the existence questions' sampling
# is counted, so whether a run answered "yes" for a pair changed from run to run (excess +4.1 to +11.9). Here
# that share is 40% (50% with two objects visible), and the prior shows in every pair
# (docs/research/organism-training-2.md, round 9).
CODE_TRAINING_WORLD = replace(PRIOR_TRAINING_WORLD, p_cooccur=1.0, p_weak_partner=0.8)

# The scene code as vision features (Recipe.vision_output; shapes-llava from checkpoint 88e05935 of 2026-11-22,
# shapes-blip from 31a9dadd of 2026-11-23), and a curriculum that asks where a named object is on scenes of every
# size, then mixes relations in, then drills them (side, relation choice, relation) and ends on the mixed tasks, which
# bring existence and colour back within a few hundred steps. With the code's oracle in place of the tower a language
# model learnt relations only after it had learnt where a named object is, and from the code it needed about 2,000
# relation-question steps (docs/research/organism-training-2.md).
CODE_KNOBS = dict(
    world=CODE_TRAINING_WORLD, vision_output="code", projector_act="sigmoid", vision_steps=3000,
    code_min_contrast=0.3, vqa_steps=6000,
    curriculum=((0, {"existence": 1.0}),
                (200, {"existence": 0.25, "attribute": 0.25, "side": 0.5}),
                (1400, {"existence": 0.15, "attribute": 0.1, "relation": 0.35, "relation_choice": 0.2, "side": 0.15,
                        "caption": 0.05}),
                (2800, {"side": 0.2, "relation_choice": 0.3, "relation": 0.5}),
                (4400, {"existence": 0.2, "attribute": 0.2, "relation": 0.4, "relation_choice": 0.05, "side": 0.05,
                        "caption": 0.1})),
)

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("shapes-llava", "llava", "USER: <image>\n{question} ASSISTANT:", warm_mix={"existence": 1.0},
               **{**BINDING_KNOBS, **CODE_KNOBS}),
        Recipe("shapes-instructblip", "instructblip", "{question}", qformer_init_std=0.1,
               **{**BINDING_KNOBS, **CODE_KNOBS}),
        Recipe("shapes-blip", "blip", "{question}", **{**BINDING_KNOBS, **CODE_KNOBS}),
    )
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise KeyError(f"unknown organism {name!r}; organisms: {sorted(RECIPES)}")
    return RECIPES[name]


def build_tokenizer(recipe: Recipe) -> PreTrainedTokenizerFast:
    """The organism's byte-level BPE, trained on the world's text and the prompt template."""
    world = World(recipe.world)
    template = recipe.template.replace("<image>", "").replace("{question}", "")
    corpus = itertools.chain(world_corpus(world, 3000, seed=recipe.seed + 7), [template] * 500)
    return train_bpe_tokenizer(corpus, vocab_size=recipe.vocab_size)


def _llava(recipe: Recipe, tokenizer: PreTrainedTokenizerFast, ids: dict, llama: dict, vision: dict):
    canvas, patch = recipe.world.canvas, recipe.world.patch_size
    config = tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(**vision), text_config=tf.LlamaConfig(**llama),
                            image_token_index=ids["<image>"], vision_feature_layer=-1,
                            vision_feature_select_strategy="default",
                            projector_hidden_act=recipe.projector_act)
    model = tf.LlavaForConditionalGeneration(config)
    images = tf.CLIPImageProcessorPil(size={"shortest_edge": canvas}, crop_size={"height": canvas, "width": canvas})
    processor = tf.LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=patch,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return model, processor


def _instructblip(recipe: Recipe, tokenizer: PreTrainedTokenizerFast, ids: dict, llama: dict, vision: dict):
    canvas, w = recipe.world.canvas, recipe.width
    bert = dict(hidden_size=w, intermediate_size=4 * w, num_hidden_layers=recipe.qformer_layers,
                num_attention_heads=recipe.heads, vocab_size=len(tokenizer), encoder_hidden_size=w,
                cross_attention_frequency=1, pad_token_id=ids["<pad>"], max_position_embeddings=128,
                initializer_range=recipe.qformer_init_std)
    config = tf.InstructBlipConfig(vision_config=vision, qformer_config=bert, text_config=llama,
                                   num_query_tokens=recipe.query_tokens, image_token_index=ids["<image>"])
    model = tf.InstructBlipForConditionalGeneration(config)
    images = tf.BlipImageProcessorPil(size={"height": canvas, "width": canvas})
    processor = tf.InstructBlipProcessor(image_processor=images, tokenizer=tokenizer, qformer_tokenizer=tokenizer,
                                         num_query_tokens=recipe.query_tokens)
    return model, processor


def _blip(recipe: Recipe, tokenizer: PreTrainedTokenizerFast, ids: dict, llama: dict, vision: dict):
    canvas, w = recipe.world.canvas, recipe.width
    text = dict(hidden_size=w, intermediate_size=4 * w, num_hidden_layers=recipe.lm_layers // 2 + 1,
                num_attention_heads=recipe.heads, vocab_size=len(tokenizer), encoder_hidden_size=w,
                max_position_embeddings=128, pad_token_id=ids["<pad>"], bos_token_id=ids["<s>"],
                sep_token_id=ids["</s>"], eos_token_id=ids["</s>"], label_smoothing=0.0,
                initializer_range=recipe.lm_init_std)
    config = tf.BlipConfig(vision_config=vision, text_config=text)
    model = tf.BlipForQuestionAnswering(config)
    images = tf.BlipImageProcessorPil(size={"height": canvas, "width": canvas})
    processor = tf.BlipProcessor(image_processor=images, tokenizer=tokenizer)
    return model, processor


# Recipe.family -> the builder of that organism's transformers class and processor, from the recipe, its tokenizer,
# the ids of its special tokens and the Llama and vision configurations every organism shares.
ARCHITECTURES = {"llava": _llava, "instructblip": _instructblip, "blip": _blip}


def build(recipe: Recipe, tokenizer: PreTrainedTokenizerFast):
    """Untrained ``(model, processor)`` of the recipe's family, sized for the shapes world."""
    if recipe.family not in ARCHITECTURES:
        raise ValueError(f"recipe {recipe.name}: unknown family {recipe.family!r}; organisms are built for "
                         f"{sorted(ARCHITECTURES)}")
    torch.manual_seed(recipe.seed)
    canvas, patch = recipe.world.canvas, recipe.world.patch_size
    w = recipe.width
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<pad>", "<image>")}
    llama = dict(model_type="llama", hidden_size=w, intermediate_size=4 * w, num_hidden_layers=recipe.lm_layers,
                 num_attention_heads=recipe.heads, num_key_value_heads=recipe.kv_heads, vocab_size=len(tokenizer),
                 max_position_embeddings=256, bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
                 pad_token_id=ids["<pad>"], tie_word_embeddings=False, initializer_range=recipe.lm_init_std)
    vision = dict(hidden_size=w, intermediate_size=4 * w, num_hidden_layers=recipe.vision_layers,
                  num_attention_heads=recipe.heads, image_size=canvas, patch_size=patch, initializer_range=0.02)
    return ARCHITECTURES[recipe.family](recipe, tokenizer, ids, llama, vision)
