"""Stage 1 of an organism's training: the vision tower learns the shapes world before any question.

Real VLMs start from a pretrained vision encoder; so do the organisms. With a recipe's ``vision_output`` "heads",
linear heads on the tower's tokens classify every patch's shape, colour and position (and which shapes the scene
holds). With "code", the tower (with the first layer of a per-patch projector, where the family has one) learns to
emit the scene code of ``scene_code``: then the projector's hidden activation, or the tower's own output, is that
code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..model import VLM
from .batches import lr_schedule
from .organisms import Recipe
from .scene_bank import SceneBank, faint_patches, relation_targets, visible_presence
from .scene_code import code_slices, code_targets, grid_cells, one_hot_code


def code_layer(vlm: VLM) -> torch.nn.Linear | None:
    """The layer that stage 1 trains, with the tower, to emit the scene code ("code" recipes): the first layer of the
    adapter's per-patch projector where that projector has a hidden activation (two layers or more: LLaVA); None
    where there is none (BLIP's question encoder and InstructBLIP's Q-Former read the tower by cross-attention),
    and the tower's own layer-normed output is the code."""
    path = code_layer_path(vlm)
    return None if path is None else vlm.model.get_submodule(path)


def code_layer_path(vlm: VLM) -> str | None:
    """The module path of :func:`code_layer`'s layer (None where the tower's output is the code)."""
    layers = vlm.adapter.adapter.patch_projector
    return layers[0] if len(layers) > 1 else None


def standardised_code(targets: dict[str, torch.Tensor], config, width: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(batch, patches, width) the scene code as a layer norm with unit weight and zero bias leaves it: every patch's
    code has exactly one hot dimension per block, so all share one mean and spread, and standardising them gives every
    token the norm sqrt(width) that the tower's other outputs have. BLIP's question encoder and InstructBLIP's
    Q-Former read the tower's output through a cross-attention with no norm in between, and from a 0/1 code (norm 2)
    neither learnt to pick out the object a question names (docs/research/organism-training-2.md, round 10)."""
    mean = len(code_slices(config)) / width
    return (one_hot_code(targets, config, width, dtype) - mean) / math.sqrt(mean * (1 - mean))


def tower_code_loss(tokens: torch.Tensor, targets: dict[str, torch.Tensor], config) -> torch.Tensor:
    """How far the tower's output ``tokens`` (batch, patches, width) is from the standardised scene code: squared
    error averaged over dimensions, plus cross-entropy within each block of the code read as logits (which learns
    the per-patch classes faster than a squared error alone; docs/research/organism-training-2.md, round 8)."""
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
            group["lr"] = recipe.vision_lr * lr_schedule(step, recipe.vision_steps)
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


__all__ = ["code_layer", "code_layer_path", "pretrain_vision", "scene_code_loss", "standardised_code", "tower_code_loss"]
