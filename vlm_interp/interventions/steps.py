"""Which absolute positions each LM forward covers, during generate() or a single forward.

With the key/value cache, every generation step feeds only the new token; without it, every
step feeds the whole sequence again. Interventions that touch "the last token of every step"
(IRI) must touch the same absolute positions in both cases: the prompt's last position and
every generated position. :class:`StepTracker` observes the LM's base model (the parent of its
layer list) to learn, at each call, how long the cached past is and how long the prompt was.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from .. import compat
from ..errors import VLMInterpError
from ..hooks import Hook


class InterventionError(VLMInterpError, ValueError):
    """An intervention cannot apply to this model or was configured wrongly."""


def lm_base_path(vlm) -> str:
    """Dotted path of the module that runs the LM's layers (the parent of the layer list)."""
    layers = vlm.adapter.adapter.towers["lm"].layers
    return layers.rsplit(".", 1)[0]


def require_decoder_lm(vlm, what: str) -> None:
    """Interventions on a decoder LM's generation steps need a causal LM tower."""
    if not vlm.decoder.continues_prompt:
        raise InterventionError(
            f"{what} needs a decoder-only language model that reads the image tokens in its own sequence; "
            f"{vlm.family} models {vlm.decoder.not_a_continuation}, so {what} does not apply to them"
        )


def _cache_length(kwargs: dict[str, Any]) -> int:
    """Positions already in the key/value cache a call received (found by type, whatever its keyword)."""
    try:
        return compat.cache_length(compat.find_cache(kwargs)[1])
    except compat.CompatibilityError as err:
        raise InterventionError(str(err)) from None


class StepTracker:
    """Tracks ``start`` (absolute position of the call's first token) and the prompt length.

    A call on an empty cache starts a new sequence, unless it re-feeds the current prompt
    plus generated tokens (generation without the cache), which is recognised from the ids.
    """

    def __init__(self, vlm):
        self.vlm = vlm
        self.path = lm_base_path(vlm)
        self.prompt_len: int | None = None
        self.prompt_ids: torch.Tensor | None = None
        self.start = 0
        self.new_sequence = False
        self.paused = False  # set while an intervention runs extra measuring passes of the LM
        self._last_ids: torch.Tensor | None = None

    def hooks(self) -> list[Hook]:
        """The observer hooks: the LM embedding (ids) and the LM base model (cache length)."""
        embed_path = next(n for n, m in self.vlm.model.named_modules() if m is self.vlm.model.get_input_embeddings())
        return [Hook(embed_path, fn=self._see_ids, kind="call", name="step tracker: ids", allow_unused=True),
                Hook(self.path, fn=self._see_call, kind="call", name="step tracker: LM calls")]

    def _see_ids(self, args: tuple, kwargs: dict) -> None:
        if self.paused:
            return
        ids = args[0] if args else kwargs.get("input")
        if torch.is_tensor(ids) and ids.dim() == 2:
            self._last_ids = ids

    def _see_call(self, args: tuple, kwargs: dict) -> None:
        if self.paused:
            return
        if _EXTRA_RUN:
            raise InterventionError(f"{_EXTRA_RUN[-1]} runs the model again during generation, and an intervention "
                                    "that tracks generation steps (VHR, IRI) is active; they do not stack: "
                                    "run them separately")
        x = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) and args[0].dim() == 2 else None)
        if x is None and ids is None:
            raise InterventionError(f"{self.path} was called without input_ids or inputs_embeds; cannot track steps")
        length = (x if x is not None else ids).shape[1]
        if ids is None and self._last_ids is not None and self._last_ids.shape[1] == length:
            ids = self._last_ids
        past = _cache_length(kwargs)
        continues = past > 0 or (
            self.prompt_ids is not None and ids is not None and length > self.prompt_ids.shape[1]
            and ids.shape[0] == self.prompt_ids.shape[0]
            and torch.equal(ids[:, :self.prompt_ids.shape[1]], self.prompt_ids))
        self.new_sequence = not continues
        if self.new_sequence:
            self.prompt_len = length
            self.prompt_ids = ids.clone() if ids is not None else None
        self.start = past

    def step_positions(self) -> slice:
        """Local indices, in the current call, of the positions that were 'last' at their own step."""
        if self.prompt_len is None:
            raise InterventionError("the step tracker has not seen an LM call yet")
        first = self.prompt_len - 1 - self.start
        return slice(max(0, first), None)


# Set while an intervention runs an extra forward of its own during generation (VCD's contrast run). The
# step tracker of VHR and IRI refuses to see one: their per-sequence state would take it for a new prompt.
_EXTRA_RUN: list[str] = []


@contextlib.contextmanager
def extra_run(what: str) -> Iterator[None]:
    """Mark the forwards inside as an intervention's own extra run (``what`` names it in errors)."""
    _EXTRA_RUN.append(what)
    try:
        yield
    finally:
        _EXTRA_RUN.pop()
