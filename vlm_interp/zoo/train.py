"""Training of the model organisms: vision pretraining, then visual question answering.

Real VLMs start from a pretrained vision encoder; so do the organisms. Stage 1 trains the
vision tower alone to say, for every patch, which shape and colour cover it (and which
shapes the scene holds). Stage 2 trains the whole model on the shapes world's questions
with the ordinary language-modelling loss on the answer tokens. The data are tokenized
through the same ``VLM.prepare`` path that inference uses, so training and inference agree.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..loading import wrap
from ..model import VLM
from .organisms import Recipe, build, build_tokenizer
from .scene_code import code_slices, code_targets, grid_cells, one_hot_code
from .shapes import Scene, World
from .tasks import QA, make_qa

def patch_owners(scene: Scene) -> np.ndarray:
    """(P,) index of the object that owns each patch (covers over 10% of it, and more than any earlier
    object does, so on a tie the earlier object keeps it), -1 for background."""
    owner = np.full(int(np.prod(scene.grid_shape)), -1)
    best = np.zeros(owner.shape)
    for k, o in enumerate(scene.objects):
        cov = np.asarray(o.patch_coverage, dtype=float).reshape(-1)
        take = (cov > 0.1) & (cov > best)
        owner[take] = k
        best = np.maximum(best, cov)
    return owner


def faint_patches(bank: "SceneBank", min_contrast: float) -> torch.Tensor:
    """(N, P) bool: the patches owned (as in ``patch_owners``) by an object of contrast below ``min_contrast``."""
    return (bank.patch_shape > 0) & (bank.patch_contrast < min_contrast)


def visible_presence(bank: "SceneBank", config, min_contrast: float) -> torch.Tensor:
    """(N, n_shapes) float: which shapes the scene holds at contrast ``min_contrast`` or more."""
    out = torch.zeros(bank.presence.shape)
    for i, scene in enumerate(bank.scenes):
        for o in scene.objects:
            if o.contrast >= min_contrast:
                out[i, config.shapes.index(o.shape)] = 1.0
    return out


@dataclass
class SceneBank:
    """Pre-rendered scenes: uint8 images plus per-patch shape/colour targets."""

    scenes: list[Scene]
    images: torch.Tensor  # (N, H, W, 3) uint8
    patch_shape: torch.Tensor  # (N, P) int64, 0 = background, 1 + shape index
    patch_color: torch.Tensor  # (N, P) int64, 0 = background, 1 + colour index
    presence: torch.Tensor  # (N, n_shapes) float
    patch_home: torch.Tensor  # (N, P, 2) int64: (row, column) cell of the owning object's centre, grid = background
    patch_contrast: torch.Tensor  # (N, P) float64: the owning object's contrast, 0 = background

    @classmethod
    def render(cls, world: World, n: int, seed: int, progress: bool = True) -> "SceneBank":
        cfg = world.config
        scenes = list(tqdm(world.iter_scenes(n, seed), total=n, desc="render scenes", disable=not progress,
                           leave=False))
        grid = cfg.grid
        images = np.stack([s.image for s in scenes])
        shape_t = np.zeros((n, grid * grid), np.int64)
        color_t = np.zeros((n, grid * grid), np.int64)
        presence = np.zeros((n, len(cfg.shapes)), np.float32)
        home = np.full((n, grid * grid, 2), grid, np.int64)
        contrast = np.zeros((n, grid * grid), np.float64)
        for i, s in enumerate(scenes):
            owner = patch_owners(s)
            for k, o in enumerate(s.objects):
                shape_t[i, owner == k] = 1 + cfg.shapes.index(o.shape)
                color_t[i, owner == k] = 1 + cfg.colors.index(o.color)
                presence[i, cfg.shapes.index(o.shape)] = 1.0
                home[i, owner == k] = [min(int(o.y // cfg.patch_size), grid - 1), min(int(o.x // cfg.patch_size), grid - 1)]
                contrast[i, owner == k] = o.contrast
        return cls(scenes, torch.from_numpy(images), torch.from_numpy(shape_t), torch.from_numpy(color_t),
                   torch.from_numpy(presence), torch.from_numpy(home), torch.from_numpy(contrast))


def relation_targets(bank: SceneBank, config) -> torch.Tensor:
    """(N, P, 4 * n_shapes) float: for each patch owned by an object A (as in ``patch_shape``), whether
    "A <relation> S" holds for some other object of shape S, relation by relation (``tasks.RELATIONS``);
    -1 where the patch is background (no target)."""
    from .tasks import RELATIONS, relation_holds

    grid, n_shapes = config.grid, len(config.shapes)
    out = np.full((len(bank.scenes), grid * grid, len(RELATIONS) * n_shapes), -1.0, np.float32)
    for i, s in enumerate(bank.scenes):
        owner = patch_owners(s)
        for k, a in enumerate(s.objects):
            row = np.zeros(len(RELATIONS) * n_shapes, np.float32)
            for m, b in enumerate(s.objects):
                if m != k:
                    for r, rel in enumerate(RELATIONS):
                        if relation_holds(a, b, rel):
                            row[r * n_shapes + config.shapes.index(b.shape)] = 1.0
            out[i, owner == k] = row
    return torch.from_numpy(out)


def pixel_normaliser(processor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Map uint8 (B, H, W, 3) images to the processor's pixel_values (rescale and normalise)."""
    ip = processor.image_processor
    mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std).view(1, 3, 1, 1)
    scale = ip.rescale_factor

    def normalise(images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() * scale
        return (x - mean) / std

    return normalise


class PromptCache:
    """Token ids of prompts and answers, computed once through ``VLM.prepare``/``encode_answer``."""

    def __init__(self, vlm: VLM, canvas: int):
        self.vlm = vlm
        self.blank = np.zeros((canvas, canvas, 3), np.uint8)
        self._prompts: dict[str, dict[str, list[int]]] = {}
        self._answers: dict[tuple[str, str], list[int]] = {}

    def prompt(self, question: str) -> dict[str, list[int]]:
        if question not in self._prompts:
            ex = self.vlm.prepare(self.blank, question)
            self._prompts[question] = {k: v[0].tolist() for k, v in ex.inputs.items()
                                       if k in ("input_ids", "qformer_input_ids")}
            self._prompts[question]["_example"] = ex  # type: ignore[assignment]
        return self._prompts[question]

    def answer(self, question: str, answer: str) -> list[int]:
        key = (question, answer)
        if key not in self._answers:
            self._answers[key] = self.vlm.encode_answer(self.prompt(question)["_example"], answer)
        return self._answers[key]


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def token_inputs(rows: list[list[int]], pad: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """Right-padded ``<prefix>input_ids`` and the ``<prefix>attention_mask`` that marks the real tokens."""
    return {f"{prefix}input_ids": _pad(rows, pad), f"{prefix}attention_mask": _pad([[1] * len(r) for r in rows], 0)}


def make_batch(vlm: VLM, cache: PromptCache, pixels: torch.Tensor, qas: list[QA]) -> dict[str, torch.Tensor]:
    """Model inputs with labels for one training batch (answer tokens and EOS are the targets)."""
    tok = vlm.tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id
    if vlm.family == "blip":
        questions = [cache.prompt(qa.question)["input_ids"] for qa in qas]
        bos = vlm.model.decoder_start_token_id
        answers = [[bos] + cache.answer(qa.question, qa.answer) + [eos] for qa in qas]
        dec = _pad(answers, pad)
        labels = _pad(answers, -100)
        return {**token_inputs(questions, pad), "pixel_values": pixels, "decoder_input_ids": dec,
                "decoder_attention_mask": (labels != -100).long(), "labels": labels}
    seqs, labels = [], []
    for qa in qas:
        prompt = cache.prompt(qa.question)["input_ids"]
        answer = cache.answer(qa.question, qa.answer) + [eos]
        seqs.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    batch = {**token_inputs(seqs, pad), "pixel_values": pixels, "labels": _pad(labels, -100)}
    if vlm.family == "instructblip":
        batch.update(token_inputs([cache.prompt(qa.question)["qformer_input_ids"] for qa in qas], pad, "qformer_"))
    return batch


def answer_loss(vlm: VLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy on the answer tokens, averaged per sample, so that a one-word answer
    weighs as much as a caption (token-averaged losses let long captions dominate)."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = vlm.logits(inputs)[:, :-1]
    targets = labels[:, 1:]
    mask = targets != -100
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.clamp(min=0).flatten(), reduction="none")
    ce = (ce.view(targets.shape) * mask).sum(1) / mask.sum(1).clamp(min=1)
    return ce


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


def _schedule(step: int, total: int, warmup: int = 100) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


# The layer whose activation is the scene code when a recipe's vision_output is "code": LLaVA's projector has a first
# layer to carry it; BLIP and InstructBLIP have none, so there the vision tower's own (layer-normed) output is the code.
CODE_LAYER = {"llava": "model.multi_modal_projector.linear_1", "blip": None, "instructblip": None}


def code_layer(vlm: VLM) -> torch.nn.Linear | None:
    """The projector layer that stage 1 trains, with the tower, to emit the scene code ("code" recipes), or None
    where the tower's output is the code."""
    if vlm.family not in CODE_LAYER:
        raise ValueError(f"a {vlm.family!r} model has no known place for the scene code; vision_output='code' "
                         f"is for {sorted(CODE_LAYER)} (use vision_output='heads')")
    name = CODE_LAYER[vlm.family]
    return None if name is None else vlm.model.get_submodule(name)


def standardised_code(targets: dict[str, torch.Tensor], config, width: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(batch, patches, width) the scene code as a layer norm with unit weight and zero bias leaves it: every patch's
    code has exactly one hot dimension per block, so all share one mean and spread, and standardising them gives every
    token the norm sqrt(width) that the tower's other outputs have. BLIP's question encoder and InstructBLIP's
    Q-Former read the tower's output through a cross-attention with no norm in between, and from a 0/1 code (norm 2)
    neither learnt to pick out the object a question names (notes, session 10)."""
    mean = len(code_slices(config)) / width
    return (one_hot_code(targets, config, width, dtype) - mean) / math.sqrt(mean * (1 - mean))


def tower_code_loss(tokens: torch.Tensor, targets: dict[str, torch.Tensor], config) -> torch.Tensor:
    """How far the tower's output ``tokens`` (batch, patches, width) is from the standardised scene code: squared
    error averaged over dimensions, plus cross-entropy within each block of the code read as logits (which learns
    the per-patch classes faster than a squared error alone; notes, session 8)."""
    slices = code_slices(config)
    loss = (tokens - standardised_code(targets, config, tokens.shape[-1], tokens.dtype)).pow(2).mean()
    for name, sl in slices.items():
        loss = loss + F.cross_entropy(tokens[..., sl].flatten(0, 1), targets[name].flatten())
    return loss


def scene_code_loss(pre: torch.Tensor, targets: dict[str, torch.Tensor], config) -> torch.Tensor:
    """How far sigmoid(``pre``) (batch, patches, width) is from the scene code: cross-entropy within each
    one-hot block, binary cross-entropy on every dimension (the blocks' one-hots, 0 elsewhere), and the
    squared activation of the dimensions outside the blocks."""
    slices = code_slices(config)
    code = one_hot_code(targets, config, pre.shape[-1], pre.dtype)
    loss = pre.new_zeros(())
    for name, sl in slices.items():
        loss = loss + F.cross_entropy(pre[..., sl].flatten(0, 1), targets[name].flatten())
    rest = slice(slices["column"].stop, None)
    loss = loss + torch.sigmoid(pre[..., rest]).pow(2).mean()
    return loss + F.binary_cross_entropy_with_logits(pre, code) * pre.shape[-1] / 4


def pretrain_vision(vlm: VLM, recipe: Recipe, bank: SceneBank, normalise, progress: bool = True) -> list[float]:
    """Stage 1: per-patch shape and colour classification plus shape presence on the vision tower; with
    ``recipe.vision_output == "code"`` the projector's first layer learns, with the tower, to emit the scene code."""
    tower = vlm.model.get_submodule(vlm.adapter.adapter.vision_root)
    cfg = recipe.world
    width = recipe.width
    grid = cfg.grid
    heads = torch.nn.ModuleDict()
    coder = None
    code = recipe.vision_output == "code"
    if code:
        coder = code_layer(vlm)
        if coder is not None and recipe.projector_act != "sigmoid":
            raise ValueError(f"vision_output='code' needs projector_act='sigmoid' (a code of bounded values), "
                             f"not {recipe.projector_act!r}")
        if coder is None and not recipe.freeze_vision:
            raise ValueError("vision_output='code' on a tower without a projector layer makes the tower's output the "
                             "code, which question answering must not change: set freeze_vision=True")
        faint = faint_patches(bank, recipe.code_min_contrast)
        present = visible_presence(bank, cfg, recipe.code_min_contrast)
        heads["presence"] = torch.nn.Linear(width, len(cfg.shapes))
    elif recipe.vision_output != "heads":
        raise ValueError(f"vision_output {recipe.vision_output!r}: use 'heads' or 'code'")
    else:
        heads["shape"] = torch.nn.Linear(width, len(cfg.shapes) + 1)
        heads["color"] = torch.nn.Linear(width, len(cfg.colors) + 1)
        heads["presence"] = torch.nn.Linear(width, len(cfg.shapes))
        if recipe.position_target == "classes":
            heads["row"] = torch.nn.Linear(width, grid)
            heads["column"] = torch.nn.Linear(width, grid)
        elif recipe.position_target == "object":
            heads["row"] = torch.nn.Linear(width, grid + 1)  # the owning object's centre cell; class grid = background
            heads["column"] = torch.nn.Linear(width, grid + 1)
        elif recipe.position_target == "regression":
            heads["where"] = torch.nn.Linear(width, 2)  # the patch's own (row, column), so position stays readable
        else:
            raise ValueError(f"position_target {recipe.position_target!r}: use 'regression', 'classes' or 'object'")
        present = bank.presence
    relations = None
    if recipe.vision_relations:
        relations = relation_targets(bank, cfg)
        heads["relation"] = torch.nn.Linear(width, relations.shape[-1])
    cells = grid_cells(grid)
    where = (cells.reshape(1, grid * grid, 2).float() + 0.5) / grid - 0.5
    params = list(tower.parameters()) + list(heads.parameters()) + ([] if coder is None else list(coder.parameters()))
    opt = torch.optim.AdamW(params, lr=recipe.vision_lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    losses = []
    tower.train()
    for step in tqdm(range(recipe.vision_steps), desc=f"{recipe.name} vision", disable=not progress):
        for group in opt.param_groups:
            group["lr"] = recipe.vision_lr * _schedule(step, recipe.vision_steps)
        idx = torch.randint(len(bank.scenes), (64,), generator=gen)
        tokens = tower(pixel_values=normalise(bank.images[idx])).last_hidden_state[:, 1:]
        presence = F.binary_cross_entropy_with_logits(heads["presence"](tokens.mean(1)), present[idx])
        if code:
            targets = code_targets(bank, idx, cfg)
            for name in ("shape", "colour"):
                targets[name] = targets[name].masked_fill(faint[idx], 0)
            if coder is None:
                loss = tower_code_loss(tokens, targets, cfg) + presence
            else:
                loss = scene_code_loss(coder(tokens), targets, cfg) + presence
        else:
            loss = (F.cross_entropy(heads["shape"](tokens).flatten(0, 1), bank.patch_shape[idx].flatten())
                    + F.cross_entropy(heads["color"](tokens).flatten(0, 1), bank.patch_color[idx].flatten())
                    + presence)
            if recipe.position_target == "classes":
                for axis, name in enumerate(("row", "column")):
                    loss = loss + F.cross_entropy(heads[name](tokens).flatten(0, 1), cells[:, axis].repeat(len(idx)))
            elif recipe.position_target == "object":
                for axis, name in enumerate(("row", "column")):
                    loss = loss + F.cross_entropy(heads[name](tokens).flatten(0, 1), bank.patch_home[idx][..., axis].flatten())
            else:
                loss = loss + 10 * F.mse_loss(heads["where"](tokens), where.expand(len(idx), -1, -1))
        if relations is not None:
            target = relations[idx]
            known = target >= 0
            loss = loss + F.binary_cross_entropy_with_logits(heads["relation"](tokens)[known], target[known])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    tower.eval()
    return losses


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
                group["lr"] = recipe.lr * _schedule(step, steps)
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
    from dataclasses import replace

    from .cards import card_dict, write_card
    from .evaluate import evaluate
    from .organisms import get_recipe

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
        card = card_dict(recipe, log, metrics, sum(p.numel() for p in vlm.model.parameters()))
    finally:
        torch.set_num_threads(before)
    write_card(Path(out), card)
    return card
