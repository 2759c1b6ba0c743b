"""Batched evaluation: several prepared examples answered in one forward or one ``generate``.

Each example is prepared on its own (:meth:`VLM.prepare`), so its checks and token groups are
those of a single run; :func:`collate` then joins their inputs as the family's adapter says
(``Adapter.padding``): a decoder LM's prompt is padded on the left with the tokenizer's pad
token and masked, so every row's last prompt token ends the sequence. Inputs the adapter does
not list must have the same shape in every row; :func:`plan` groups examples so that they do.

Where the model's forward takes ``position_ids``, left-padded rows get positions counted from
their first real token (as ``generate`` counts them), so a padded row computes what it computes
alone. Answers (first-token logits, greedy generations) equal one-at-a-time answers; the
probabilities agree to float rounding (the tests check both for every family).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import reduce
from typing import Any, Sequence

import torch

from . import compat
from .errors import VLMInterpError
from .example import Example


class BatchError(VLMInterpError, ValueError):
    """Examples cannot be joined into one batch (different shapes where the family cannot pad, in-model edits)."""


@dataclass
class Batch:
    """Joined inputs of several examples; ``shift[tower][r]`` is the left padding added to row ``r`` of ``tower``."""

    examples: list[Example]
    inputs: dict[str, torch.Tensor]
    shift: dict[str, list[int]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)


def _fill(vlm, key: str, fill: Any) -> float | int:
    """The padding value of one input: a number, or the first set processor attribute of the paths given."""
    if not isinstance(fill, tuple):
        return fill
    for path in fill:
        try:
            value = reduce(getattr, path.split("."), vlm.processor)
        except AttributeError:
            continue
        if value is not None:
            return value
    raise BatchError(f"cannot pad {key!r}: none of {list(fill)} is set on the {type(vlm.processor).__name__}; "
                     "set the tokenizer's pad token (tokenizer.pad_token = ...) or evaluate one example at a time")


def signature(vlm, ex: Example) -> tuple:
    """What must agree between examples of one batch: the shapes of the inputs the family does not pad, and the
    other axes of those it pads."""
    padding = vlm.adapter.adapter.padding
    out = []
    for key, value in sorted(ex.inputs.items()):
        if not torch.is_tensor(value):
            out.append((key, repr(value)))
            continue
        shape = list(value.shape[1:])
        if key in padding:
            shape[padding[key].axis - 1] = -1
        out.append((key, tuple(shape), str(value.dtype)))
    return tuple(out)


def check_batch_size(batch_size: Any) -> int:
    """``batch_size`` if it is a positive whole number, else a clear error."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def plan(vlm, examples: Sequence[Example], batch_size: int) -> list[list[int]]:
    """Indices of ``examples`` in batches of at most ``batch_size`` that :func:`collate` can join, in first-seen
    order of their :func:`signature` (order inside a batch is kept)."""
    check_batch_size(batch_size)
    groups: dict[tuple, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(signature(vlm, ex), []).append(i)
    return [idx[k:k + batch_size] for idx in groups.values() for k in range(0, len(idx), batch_size)]


def collate(vlm, examples: Sequence[Example]) -> Batch:
    """Join the inputs of ``examples`` into one batch (see the module docstring)."""
    examples = list(examples)
    if not examples:
        raise BatchError("collate needs at least one example")
    edited = [ex.question for ex in examples if ex.edits]
    if edited:
        raise BatchError(f"{len(edited)} example(s) carry in-model edits (such as noise on the image embeddings), "
                         "which batched evaluation does not apply; run them one at a time")
    padding = vlm.adapter.adapter.padding
    keys = list(examples[0].inputs)
    if any(list(ex.inputs) != keys for ex in examples):
        raise BatchError("the examples have different model inputs; prepare them with the same model and template")
    inputs: dict[str, Any] = {}
    shift: dict[str, list[int]] = {}
    for key in keys:
        values = [ex.inputs[key] for ex in examples]
        if not torch.is_tensor(values[0]):
            if any(v != values[0] for v in values):
                raise BatchError(f"input {key!r} differs between the examples and is not a tensor to batch")
            inputs[key] = values[0]
            continue
        pad = padding.get(key)
        if pad is None:
            if any(v.shape != values[0].shape for v in values):
                shapes = sorted({tuple(v.shape) for v in values})
                raise BatchError(f"input {key!r} has shapes {shapes}; the {vlm.family} family does not pad it, so "
                                 "a batch holds examples of one shape only (group them with batching.plan)")
            inputs[key] = torch.cat(values)
            continue
        length = max(v.shape[pad.axis] for v in values)
        fill = _fill(vlm, key, pad.fill)
        rows = []
        for v in values:
            size = list(v.shape)
            size[pad.axis] = length - v.shape[pad.axis]
            block = torch.full(size, fill, dtype=v.dtype, device=v.device)
            rows.append(torch.cat([block, v] if pad.side == "left" else [v, block], dim=pad.axis))
        inputs[key] = torch.cat(rows)
        if pad.tower is not None and pad.side == "left":
            shift[pad.tower] = [length - v.shape[pad.axis] for v in values]
    return Batch(examples, inputs, shift)


def _forward_inputs(vlm, batch: Batch) -> dict[str, Any]:
    """The batch's inputs, with positions counted from each row's first real token where the model takes them."""
    inputs = dict(batch.inputs)
    mask = inputs.get("attention_mask")
    if any(batch.shift.get("lm", [])) and mask is not None and compat.accepts_keyword(vlm.model, "position_ids"):
        inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
    return inputs


def answer_positions(vlm, batch: Batch) -> list[int]:
    """Per row, the position of the logits that predict the first answer token."""
    shift = batch.shift.get("lm", [0] * len(batch))
    return [s + vlm.answer_start(ex) for s, ex in zip(shift, batch.examples)]


@torch.no_grad()
def first_token_logits(vlm, batch: Batch) -> torch.Tensor:
    """Logits (rows, vocab) of each row's first answer token, in float32; the active logits processors
    (:attr:`VLM.logits_processors`, such as VCD and PAI) apply, as in :meth:`VLM.first_token_logits`."""
    processors = vlm.logits_processor(batch.inputs)
    logits = vlm.logits(_forward_inputs(vlm, batch))
    rows = torch.arange(len(batch), device=logits.device)
    out = logits[rows, torch.tensor(answer_positions(vlm, batch), device=logits.device)].float()
    return out if processors is None else processors(batch.inputs["input_ids"], out)


@torch.no_grad()
def generate(vlm, batch: Batch, max_new_tokens: int = 20, **kw: Any) -> list[str]:
    """Greedy (by default) generations of every row, as :meth:`VLM.generate` gives them one at a time (with the
    active logits processors, as there)."""
    kw.setdefault("do_sample", False)
    processors = vlm.logits_processor(batch.inputs)
    if processors is not None:
        processors.extend(kw.get("logits_processor") or [])
        kw["logits_processor"] = processors
    out = vlm.model.generate(**batch.inputs, max_new_tokens=max_new_tokens, **kw)
    out = vlm.decoder.generated(out, batch.inputs)
    return [vlm.tokenizer.decode(row, skip_special_tokens=True).strip() for row in out]


__all__ = ["Batch", "BatchError", "answer_positions", "check_batch_size", "collate", "first_token_logits", "generate", "plan",
           "signature"]
