"""Model inputs from shapes-world questions, for training and for the cards' measurements.

Prompts and answers are tokenized once through the same ``VLM.prepare``/``encode_answer`` path that inference
uses, so training, evaluation and inference see the same token ids; images go straight from uint8 arrays to
the processor's pixel values. How an answer is fed (after the prompt, or to a separate answer decoder) is the
decoder strategy's (``VLM.decoder.teacher_forced``).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..example import Example
from ..model import VLM
from .tasks import QA


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
    """Token ids of prompts and answers, computed once through ``VLM.prepare``/``encode_answer``.

    A prompt's ids are every token-id input the processor gives for it: ``input_ids``, and for models whose
    Q-Former reads the question too, ``qformer_input_ids``."""

    def __init__(self, vlm: VLM, canvas: int):
        self.vlm = vlm
        self.blank = np.zeros((canvas, canvas, 3), np.uint8)
        self._examples: dict[str, Example] = {}
        self._prompts: dict[str, dict[str, list[int]]] = {}
        self._answers: dict[tuple[str, str], list[int]] = {}

    def example(self, question: str) -> Example:
        """The question prepared on a blank image (its token ids and groups hold for every image)."""
        if question not in self._examples:
            self._examples[question] = self.vlm.prepare(self.blank, question)
        return self._examples[question]

    def prompt(self, question: str) -> dict[str, list[int]]:
        if question not in self._prompts:
            inputs = self.example(question).inputs
            self._prompts[question] = {k: v[0].tolist() for k, v in inputs.items() if k.endswith("input_ids")}
        return self._prompts[question]

    def answer(self, question: str, answer: str) -> list[int]:
        key = (question, answer)
        if key not in self._answers:
            self._answers[key] = self.vlm.encode_answer(self.example(question), answer)
        return self._answers[key]


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def token_inputs(rows: list[list[int]], pad: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """Right-padded ``<prefix>input_ids`` and the ``<prefix>attention_mask`` that marks the real tokens."""
    return {f"{prefix}input_ids": _pad(rows, pad), f"{prefix}attention_mask": _pad([[1] * len(r) for r in rows], 0)}


def make_batch(vlm: VLM, cache: PromptCache, pixels: torch.Tensor, qas: list[QA]) -> dict[str, torch.Tensor]:
    """Model inputs with labels for one training batch (answer tokens and EOS are the targets): each token-id row
    right-padded with its attention mask (``decoder_input_ids`` gets ``decoder_attention_mask``)."""
    tok = vlm.tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id
    rows: dict[str, list[list[int]]] = {}
    labels = []
    for qa in qas:
        prompt = cache.prompt(qa.question)
        fed, label = vlm.decoder.teacher_forced(vlm.model, prompt["input_ids"],
                                                cache.answer(qa.question, qa.answer) + [eos])
        for key, ids in {**prompt, **fed}.items():
            rows.setdefault(key, []).append(ids)
        labels.append(label)
    batch = {"pixel_values": pixels, "labels": _pad(labels, -100)}
    for key, ids in rows.items():
        batch.update(token_inputs(ids, pad, key.removesuffix("input_ids")))
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


def lr_schedule(step: int, total: int, warmup: int = 100) -> float:
    """The learning rate's factor at ``step`` of ``total``: linear warm-up over ``warmup`` steps, then a cosine
    from 1 down to 0.1."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


__all__ = ["PromptCache", "answer_loss", "lr_schedule", "make_batch", "pixel_normaliser", "token_inputs"]
