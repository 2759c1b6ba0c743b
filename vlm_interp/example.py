"""Example: one prepared VQA input with its token groups, ready for scoring and tracing."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .geometry import Box


@dataclass
class Example:
    """Model inputs for one (image, question[, answer]) plus where things are in each tower.

    ``groups[tower][name]`` lists positions in that tower's sequence: ``image`` (visual
    tokens, or Q-Former queries), ``question``, ``text`` (all non-image tokens), ``last``
    (the position whose logits give the answer), and ``object`` when a region was given.
    ``boxes[tower]`` maps visual positions to the box (original-image pixels) they cover.
    ``edits`` are changes that are not model inputs (noise added inside the model); a run
    honours them only through :func:`vlm_interp.edits.applied` (see that module).
    """

    inputs: dict[str, torch.Tensor]
    prompt: str
    question: str
    answer: str | None = None
    answer_ids: list[int] | None = None
    tokens: list[str] = field(default_factory=list)  # the answer-producing tower's input tokens
    groups: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    boxes: dict[str, dict[int, Box]] = field(default_factory=dict)
    image: Any = None
    image_hw: tuple[int, int] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    edits: list[Any] = field(default_factory=list)  # vlm_interp.edits.InputEdit, applied by hooks

    def positions(self, group: str, tower: str = "lm") -> list[int]:
        """Positions of a token group in ``tower``, with an error naming the groups that exist."""
        try:
            return self.groups[tower][group]
        except KeyError:
            have = {t: sorted(g) for t, g in self.groups.items()}
            raise KeyError(f"no token group {group!r} in tower {tower!r}; groups: {have}") from None

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def with_inputs(self, **inputs: torch.Tensor) -> "Example":
        """A copy with some model inputs replaced (for corruptions); groups are kept."""
        return replace(self, inputs={**self.inputs, **inputs})

    def derive(self, **changes: Any) -> "Example":
        """A copy with ``changes`` whose groups, boxes, meta and edits are its own (safe to mutate)."""
        own = {"groups": copy.deepcopy(self.groups), "boxes": copy.deepcopy(self.boxes),
               "meta": dict(self.meta), "edits": list(self.edits), "inputs": dict(self.inputs)}
        return replace(self, **{**own, **changes})
