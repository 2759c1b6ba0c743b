"""Training of the model organisms: vision pretraining, then visual question answering.

Real VLMs start from a pretrained vision encoder; so do the organisms. Stage 1 (``vision_pretraining``) trains the
vision tower alone to say, for every patch, which shape and colour cover it (and which shapes the scene holds), or
to emit the scene code. Stage 2 (here) trains the whole model on the shapes world's questions with the ordinary
language-modelling loss on the answer tokens. The data are tokenized through the same ``VLM.prepare`` path that
inference uses (``batches``), so training and inference agree. ``retrain`` trains an organism from its recipe,
measures it (``evaluate``) and writes its card.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..loading import wrap
from ..model import VLM
from .batches import PromptCache, answer_loss, lr_schedule, make_batch, pixel_normaliser
from .cards import card_dict, write_card
from .evaluate import evaluate
from .organisms import Recipe, build, build_tokenizer, get_recipe
from .scene_bank import SceneBank
from .shapes import Scene, World
from .tasks import QA, make_qa
from .vision_pretraining import code_layer, pretrain_vision


# Tasks whose question names a present object and asks what it looks like or where it is.
LOOKING_TASKS = ("attribute", "side", "relation", "relation_choice")


def asks_about_faint(scene: Scene, qa: QA, min_contrast: float) -> bool:
    """True if ``qa`` asks what an object of contrast below ``min_contrast`` looks like or where it is."""
    if qa.task not in LOOKING_TASKS:
        return False
    named = [i for i in (qa.object_index, qa.other_index) if i is not None]
    return any(scene.objects[i].contrast < min_contrast for i in named)


def sample_qas(world: World, bank: SceneBank, mix: dict[str, float], rng: np.random.Generator,
               n: int, max_objects: int | None = None, min_contrast: float = 0.0) -> tuple[list[int], list[QA]]:
    """``n`` (scene index, QA) pairs with tasks drawn from ``mix`` (task -> weight), optionally only
    from scenes with at most ``max_objects`` objects. Questions about the colour or place of an object
    fainter than ``min_contrast`` are redrawn: with the tower blind to it, only a guess could answer them."""
    tasks = list(mix)
    probs = np.array([mix[t] for t in tasks], float)
    probs /= probs.sum()
    allowed = np.arange(len(bank.scenes))
    if max_objects is not None:
        allowed = np.array([i for i, s in enumerate(bank.scenes) if len(s.objects) <= max_objects])
        if not len(allowed):
            raise ValueError(f"no training scene has at most {max_objects} objects")
    idx, qas = [], []
    while len(qas) < n:
        i = int(allowed[int(rng.integers(len(allowed)))])
        qa = make_qa(world, bank.scenes[i], tasks[int(rng.choice(len(tasks), p=probs))], rng)
        if qa is not None and not asks_about_faint(bank.scenes[i], qa, min_contrast):
            idx.append(i)
            qas.append(qa)
    return idx, qas


def curriculum_at(recipe: Recipe, step: int) -> tuple[dict[str, float], int | None]:
    """The task mix that question-answering step ``step`` draws from, and the largest number of objects
    its scenes may hold (None: any), as ``Recipe.curriculum`` says."""
    if not recipe.curriculum:
        return (recipe.warm_mix if step < recipe.warm_steps else recipe.task_mix), None
    stage = recipe.curriculum[0]
    for entry in recipe.curriculum:
        if step >= entry[0]:
            stage = entry
    return dict(stage[1]), (stage[2] if len(stage) > 2 else None)



def train_vqa(vlm: VLM, recipe: Recipe, world: World, bank: SceneBank, normalise, steps: int | None = None,
              progress: bool = True, on_step: Callable[[int, list[float]], None] | None = None) -> list[float]:
    """Stage 2: the whole model on question answering, loss on answer tokens only.

    ``on_step(step, losses)``, if given, is called after every optimiser step (e.g. to monitor a run)."""
    steps = recipe.vqa_steps if steps is None else steps
    cache = PromptCache(vlm, recipe.world.canvas)
    model = vlm.model
    vision = model.get_submodule(vlm.adapter.adapter.vision_root)
    frozen = [vision] if recipe.freeze_vision else []
    coder = code_layer(vlm) if recipe.vision_output == "code" else None
    if coder is not None:
        frozen.append(coder)  # the code stays what stage 1 made it
    for module in frozen:
        module.requires_grad_(False)
    try:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.01)
        rng = np.random.default_rng([recipe.seed, 2])
        losses = []
        model.train()
        if recipe.freeze_vision:
            vision.eval()
        bar = tqdm(range(steps), desc=f"{recipe.name} vqa", disable=not progress)
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = recipe.lr * lr_schedule(step, steps)
            mix, max_objects = curriculum_at(recipe, step)
            idx, qas = sample_qas(world, bank, mix, rng, recipe.batch, max_objects, recipe.code_min_contrast)
            batch = make_batch(vlm, cache, normalise(bank.images[idx]), qas)
            per_sample = answer_loss(vlm, batch)
            loss = per_sample.mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
            if step % 50 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
            if on_step is not None:
                on_step(step + 1, losses)
    finally:  # also on an exception: the caller's model is left in eval mode, nothing frozen
        model.eval()
        for module in frozen:
            module.requires_grad_(True)
    return losses


def save_atomically(vlm: VLM, out: Path, extra: dict[str, str] | None = None) -> Path:
    """save_pretrained model and processor into a temporary folder, then move it into place."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint folder is for everyone to read
    try:
        vlm.model.save_pretrained(tmp)
        vlm.processor.save_pretrained(tmp)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def train(recipe: Recipe, out: Path | None = None, vision_steps: int | None = None, vqa_steps: int | None = None,
          train_scenes: int | None = None, progress: bool = True) -> tuple[VLM, dict]:
    """Train an organism from its recipe; returns the VLM and a log (losses, timings)."""
    torch.manual_seed(recipe.seed)
    t0 = time.time()
    world = World(recipe.world)
    tokenizer = build_tokenizer(recipe)
    model, processor = build(recipe, tokenizer)
    vlm = wrap(model, processor, template=recipe.template, name=recipe.name)
    bank = SceneBank.render(world, train_scenes or recipe.train_scenes, seed=recipe.seed, progress=progress)
    normalise = pixel_normaliser(processor)
    t1 = time.time()
    if vision_steps is not None:
        recipe_v = Recipe(**{**recipe.__dict__, "vision_steps": vision_steps})
    else:
        recipe_v = recipe
    vision_losses = pretrain_vision(vlm, recipe_v, bank, normalise, progress)
    t2 = time.time()
    vqa_losses = train_vqa(vlm, recipe, world, bank, normalise, vqa_steps, progress)
    t3 = time.time()
    log = {"seconds": {"setup": t1 - t0, "vision": t2 - t1, "vqa": t3 - t2},
           "vision_loss": [float(np.mean(vision_losses[max(0, i - 50):i + 1])) for i in range(0, len(vision_losses), 50)],
           "vqa_loss": [float(np.mean(vqa_losses[max(0, i - 50):i + 1])) for i in range(0, len(vqa_losses), 50)],
           "threads": torch.get_num_threads()}
    if out is not None:
        save_atomically(vlm, out)
    return vlm, log


def retrain(name: str, out: Path, seed: int | None = None, vqa_steps: int | None = None,
            vision_steps: int | None = None, train_scenes: int | None = None, evaluate_after: bool = True,
            progress: bool = True, threads: int | None = None) -> dict:
    """Train organism ``name`` into ``out``, measure it on held-out scenes and write its card.

    ``threads`` sets torch's CPU threads for the run (restored afterwards): the arithmetic, and so the
    trained organism, depends on it, so the shipped checkpoint is repeated only with the count its card records."""
    recipe = get_recipe(name)
    changes = {k: v for k, v in {"seed": seed, "vqa_steps": vqa_steps, "vision_steps": vision_steps,
                                  "train_scenes": train_scenes}.items() if v is not None}
    recipe = replace(recipe, **changes)
    if threads is not None and threads < 1:
        raise ValueError(f"threads {threads} must be at least 1")
    before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        vlm, log = train(recipe, out=Path(out), progress=progress)
        if not evaluate_after:
            return {}
        metrics = evaluate(vlm, recipe, progress=progress)
        card = card_dict(recipe, vlm, log, metrics)
    finally:
        torch.set_num_threads(before)
    write_card(Path(out), card)
    return card

