"""Held-out measurements of an organism for its model card.

Questions are answered by comparing the model's first-token logits over the task's answer
set (yes/no, or the colours): a closed-vocabulary reading of greedy decoding that cannot
fail to parse. Scenes come from seeds disjoint from training (training uses ``(seed, i)``
with the recipe seed; evaluation uses :data:`EVAL_SEED`), and always from the zoo's world
(``ORGANISM_WORLD``), also for a recipe that trains on its own variant of it, so that every
card measures the same benchmark as ``vlm-interp compare``.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from tqdm.auto import tqdm

from ..hallucination.stats import binary_metrics
from ..model import VLM
from .batches import PromptCache, pixel_normaliser, token_inputs
from .organisms import ORGANISM_WORLD, Recipe
from .pope_set import POPE_SPLITS, pope_questions
from .shapes import Scene, World
from .tasks import QA, attribute_qa, caption_qa, relation_qa

EVAL_SEED = 10_007


@torch.no_grad()
def choose(vlm: VLM, cache: PromptCache, normalise, images: torch.Tensor, questions: list[str],
           candidates: list[str], batch: int = 64) -> list[str]:
    """For each (image, question), the candidate answer whose first token has the highest logit."""
    first = {c: cache.answer(questions[0], c)[0] for c in candidates}
    if len(set(first.values())) != len(candidates):
        raise ValueError(f"candidates {candidates} share first tokens; first-token choice is ambiguous")
    ids = torch.tensor([first[c] for c in candidates])
    out: list[str] = []
    for start in range(0, len(questions), batch):
        qs = questions[start:start + batch]
        pixels = normalise(images[start:start + batch])
        prompts = [cache.prompt(q) for q in qs]
        inputs = {"pixel_values": pixels}
        for key in prompts[0]:  # input_ids, and qformer_input_ids where the Q-Former reads the question
            inputs.update(token_inputs([p[key] for p in prompts], vlm.tokenizer.pad_token_id,
                                       key.removesuffix("input_ids")))
        logits = vlm.logits(inputs)
        # the logits that predict the first answer token: at the prompt's last position, or at the start of a
        # separate answer decoder (right padding leaves both where they are in each row)
        answer_at = torch.tensor([vlm.answer_start(cache.example(q)) for q in qs])
        last = logits[torch.arange(len(qs)), answer_at]
        picks = last[:, ids].argmax(-1).tolist()
        out += [candidates[i] for i in picks]
    return out


def _images(scenes: list[Scene], index: list[int]) -> torch.Tensor:
    return torch.from_numpy(np.stack([scenes[i].image for i in index]))


def _benchmark_world(recipe: Recipe) -> World:
    """The world every organism is measured on; its images must have the recipe's size."""
    if (recipe.world.canvas, recipe.world.patch_size) != (ORGANISM_WORLD.canvas, ORGANISM_WORLD.patch_size):
        raise ValueError(f"{recipe.name} is trained on {recipe.world.canvas}px images with {recipe.world.patch_size}px "
                         f"patches; the zoo's benchmark world has {ORGANISM_WORLD.canvas}px and "
                         f"{ORGANISM_WORLD.patch_size}px: keep the training world's canvas and patch size")
    return World(ORGANISM_WORLD)


def evaluate_pope(vlm: VLM, recipe: Recipe, cache: PromptCache, normalise, n_images: int) -> dict:
    """POPE splits on held-out scenes, plus the per-pair view of adversarial negatives."""
    world = _benchmark_world(recipe)
    result: dict = {}
    for split in POPE_SPLITS:
        pope = pope_questions(world, n_images, EVAL_SEED, split)
        qs = pope.questions
        pred = choose(vlm, cache, normalise, _images(pope.scenes, [q.scene_index for q in qs]),
                      [q.text for q in qs], ["yes", "no"])
        gold = [q.label for q in qs]
        result[split] = binary_metrics(pred, gold)
        if split == "adversarial":
            pairs: dict[str, list[bool]] = defaultdict(list)
            for q, p in zip(qs, pred):
                if q.label != "no":
                    continue
                partner = world.config.partner(q.shape)
                present = pope.scenes[q.scene_index].shape_set()
                key = f"{q.shape} | {partner} present" if partner in present else "no partner present"
                pairs[key].append(p == "yes")
            result["adversarial_negatives_by_pair"] = {
                k: {"n": len(v), "yes_ratio": float(np.mean(v))} for k, v in sorted(pairs.items())
            }
        # weak positives: the queried object is small or faint
        weak = [i for i, q in enumerate(qs) if q.label == "yes" and any(
            o.weak for o in pope.scenes[q.scene_index].objects if o.shape == q.shape)]
        if split == "random" and weak:
            result["weak_positive_recall"] = float(np.mean([pred[i] == "yes" for i in weak]))
    result["prior_excess_points"] = 100 * (result["adversarial"]["yes_ratio_on_negatives"]
                                           - result["random"]["yes_ratio_on_negatives"])
    return result


def _task_questions(world: World, scenes: list[Scene], make, n: int, seed: int) -> tuple[list[int], list[QA]]:
    rng = np.random.default_rng([seed, 3])
    idx, qas = [], []
    for i, scene in enumerate(scenes):
        qa = make(scene, rng)
        if qa is not None:
            idx.append(i)
            qas.append(qa)
        if len(qas) >= n:
            break
    return idx, qas


def evaluate(vlm: VLM, recipe: Recipe, n_images: int = 400, n_questions: int = 600, n_captions: int = 100,
             progress: bool = True) -> dict:
    """All card numbers: POPE splits, colour and relation accuracy, caption exact match."""
    world = _benchmark_world(recipe)
    cache = PromptCache(vlm, world.config.canvas)
    normalise = pixel_normaliser(vlm.processor)
    scenes = world.scenes(max(n_questions * 2, n_captions), EVAL_SEED + 1)
    steps = tqdm(total=4, desc=f"evaluate {recipe.name}", disable=not progress)
    result = {"pope": evaluate_pope(vlm, recipe, cache, normalise, n_images)}
    steps.update()
    idx, qas = _task_questions(world, scenes, lambda s, r: attribute_qa(s, r), n_questions, EVAL_SEED)
    pred = choose(vlm, cache, normalise, _images(scenes, idx), [q.question for q in qas], list(world.config.colors))
    result["attribute"] = {"n": len(qas), "accuracy": float(np.mean([p == q.answer for p, q in zip(pred, qas)]))}
    steps.update()
    idx, qas = _task_questions(world, scenes, lambda s, r: relation_qa(world, s, r), n_questions, EVAL_SEED)
    pred = choose(vlm, cache, normalise, _images(scenes, idx), [q.question for q in qas], ["yes", "no"])
    result["relation"] = binary_metrics(pred, [q.answer for q in qas])
    steps.update()
    exact = []
    for scene in scenes[:n_captions]:
        qa = caption_qa(scene)
        ex = vlm.prepare(scene.pil(), qa.question)
        exact.append(vlm.generate(ex, max_new_tokens=24) == qa.answer)
    result["caption"] = {"n": len(exact), "exact_match": float(np.mean(exact))}
    steps.update()
    steps.close()
    return result
