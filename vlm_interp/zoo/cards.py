"""Model cards of the organisms: recipe, training log and held-out measurements, as JSON and Markdown."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict
from pathlib import Path

import torch
import transformers

from ..model import VLM
from .organisms import ORGANISM_WORLD, Recipe
from .vision_pretraining import code_layer_path


def _weak_sentence(world: dict) -> str:
    """How often objects are weak, with the partners' own rate when the world sets one."""
    lo, hi = world["weak_contrast_range"]
    faint = f"(small, faint or both; faint ones at contrast {lo}-{hi})"
    if world.get("p_weak_partner") is None:
        return f"{_pct(world['p_weak'])} of objects are weak {faint}."
    return (f"{_pct(world['p_weak'])} of objects drawn on their own and {_pct(world['p_weak_partner'])} of those "
            f"pulled in as partners are weak {faint}, so that a faint partner is often known only from the prior.")


def _benchmark_sentence(world: dict) -> str:
    """Says so when the organism trained on its own variant of the world it is measured on."""
    zoo = json.loads(json.dumps(asdict(ORGANISM_WORLD)))
    if all(zoo.get(k) == v for k, v in world.items()):  # fields newer than the card keep their neutral default
        return ""
    return (" This is its own training variant of the zoo's world; like every organism it is measured on the zoo's "
            f"world itself, where {_weak_sentence(zoo)}")


def architecture(vlm: VLM) -> dict:
    """What a card says about the organism's architecture, from its adapter: the layers of each tower, and the layer
    whose activation a "code" recipe makes the scene code (None: the vision tower's own output is)."""
    return {"towers": dict(vlm.adapter.n_layers), "code_layer": code_layer_path(vlm)}


def card_dict(recipe: Recipe, vlm: VLM, log: dict, metrics: dict) -> dict:
    return {
        "name": recipe.name,
        "trained": True,
        "family": vlm.family,
        "parameters": sum(p.numel() for p in vlm.model.parameters()),
        **architecture(vlm),
        "recipe": recipe.to_dict(),
        "training": log,
        "metrics": metrics,
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version(), "threads": torch.get_num_threads()},
    }


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _stage1(r: dict, code_layer: str | None) -> str:
    """What stage 1 trained the vision tower for, in words (``code_layer``: the card's)."""
    if r.get("vision_output", "heads") == "code":
        code = ("per patch a one-hot of the shape and colour of the object covering it (or background), of its row and "
                "of its column")
        if code_layer is not None:
            return ("the tower and the projector's first layer together, so that the projector's hidden activation "
                    f"({r.get('projector_act')}) is the scene code: {code}, the other dimensions near 0; plus shape "
                    "presence. Both stay frozen during question answering")
        return (f"the tower so that its own output is the scene code: {code}, standardised as its final layer norm "
                "leaves a token (so every token has the same norm); plus shape presence")
    return ("per-patch shape and colour classification, shape presence, and "
            + {"classes": "each patch's own position (row and column classes)",
               "object": "for each object's patches the cell of the object's centre (row and column classes)"}.get(
                r.get("position_target"), "each patch's own position")
            + (", and for each object's patches which shapes lie left of / right of / above / below it"
               if r.get("vision_relations") else ""))


def _curriculum(r: dict) -> str:
    if not r.get("curriculum"):
        return f"first {r['warm_steps']} steps on {r['warm_mix']}, then {r['task_mix']}"
    stages = []
    for first, mix, *limit in r["curriculum"]:
        few = f" (scenes with at most {limit[0]} object{'s' * (limit[0] != 1)})" if limit else ""
        stages.append(f"from {first} {mix}{few}")
    return "tasks by step: " + ", ".join(stages)


def card_markdown(card: dict) -> str:
    """A human-readable card: what the organism is, how it was made, what it scores."""
    r, m, t = card["recipe"], card["metrics"], card["training"]
    pope = m["pope"]
    lines = [
        f"# {card['name']}",
        "",
        f"A model organism of vlm-interp: a `{card['family']}` model of the real transformers class, "
        f"{card['parameters'] / 1e6:.2f} M parameters, trained from scratch on the procedural shapes world "
        "(64x64 images, 8-pixel patches, 1-3 objects of 6 shapes and 6 colours). Ground truth is known for "
        "every scene. The world plants a prior: shapes come in co-occurring pairs "
        f"{', '.join('/'.join(p) for p in r['world']['cooccur_pairs'])} (partner added with probability "
        f"{r['world']['p_cooccur']}), and {_weak_sentence(r['world'])}" + _benchmark_sentence(r["world"]),
        "",
        "## Recipe",
        "",
        f"- tokenizer: byte-level BPE, {r['vocab_size']} tokens, trained on the world's text, its prompt "
        "template and English filler",
        f"- width {r['width']}, {r['heads']} heads ({r['kv_heads']} key/value heads in the LM), vision layers "
        f"{r['vision_layers']}, LM layers {r['lm_layers']}, LM initial weight std {r.get('lm_init_std', 0.02)}"
        + (f"; Q-Former layers {r['qformer_layers']}, {r['query_tokens']} query tokens, initial weight std "
           f"{r.get('qformer_init_std', 0.02)}" if "qformer" in card.get("towers", {}) else ""),
        f"- stage 1, vision pretraining: {r['vision_steps']} steps, batch 64, lr {r['vision_lr']}, "
        + _stage1(r, card.get("code_layer")),
        f"- vision tower {'frozen' if r.get('freeze_vision') else 'trained'} during question answering",
        f"- stage 2, question answering: {r['vqa_steps']} steps, batch {r['batch']}, AdamW lr {r['lr']} "
        f"(warm-up, cosine to 10%); {_curriculum(r)}; {r['train_scenes']} training scenes, seed {r['seed']}",
        f"- prompt template: `{r['template']!r}`",
        f"- training time on {card['environment']['threads']} CPU thread(s): "
        + ", ".join(f"{k} {v:.0f} s" for k, v in t["seconds"].items()),
        "",
        "## Held-out measurements",
        "",
        "Scenes of the zoo's world, drawn from seeds disjoint from training. Answers are read from first-token "
        "logits over the answer set (yes/no, or the six colours).",
        "",
        "| POPE split | accuracy | precision | recall | F1 | yes-ratio | yes-ratio on negatives | n |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for split in ("random", "popular", "adversarial"):
        s = pope[split]
        lines.append(f"| {split} | {_pct(s['accuracy'])} | {_pct(s['precision'])} | {_pct(s['recall'])} | "
                     f"{_pct(s['f1'])} | {_pct(s['yes_ratio'])} | {_pct(s['yes_ratio_on_negatives'])} | {s['n']} |")
    lines += [
        "",
        f"- colour questions: {_pct(m['attribute']['accuracy'])} (n={m['attribute']['n']})",
        f"- relation questions: {_pct(m['relation']['accuracy'])} (n={m['relation']['n']})",
        f"- captions, exact match: {_pct(m['caption']['exact_match'])} (n={m['caption']['n']})",
        f"- recall on weak (small, faint) positives, random split: {_pct(pope.get('weak_positive_recall', float('nan')))}",
        f"- prior excess: yes-ratio on adversarial negatives minus on random negatives = "
        f"{pope['prior_excess_points']:+.1f} points",
        "",
        "Adversarial negatives by whether the queried shape's co-occurrence partner is in the image:",
        "",
        "| queried shape, partner present | n | yes-ratio |",
        "| --- | --- | --- |",
    ]
    for key, v in pope["adversarial_negatives_by_pair"].items():
        lines.append(f"| {key} | {v['n']} | {_pct(v['yes_ratio'])} |")
    return "\n".join(lines) + "\n"


def write_card(folder: Path, card: dict) -> None:
    """Write card.json and card.md (README.md for hub-style folders) into ``folder``."""
    folder = Path(folder)
    (folder / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    (folder / "README.md").write_text(card_markdown(card))
