"""In-model edits: changes to an example that happen inside the model, attached as hooks whenever it runs.

Some corruptions change model inputs (pixels, token ids) and live in ``Example.inputs``.
Others happen inside the model (noise on image embeddings); they are recorded as
:class:`InputEdit` objects in ``Example.edits`` and attached as hooks by :func:`applied`
whenever the example runs. Every run of an example with edits goes through ``applied(vlm,
example)`` (``VLM.score``, ``VLM.generate``, the tracing engine); a hook that never fires is an
error, so an edit is never silently lost.

Batching: an edit's noise has shape ``(rows, k, hidden)``. When the hooked tensor has ``N``
rows and ``N`` is a multiple of ``rows``, the noise is repeated over the batch (the same
corruption in every row, e.g. one row per restored site).
:func:`vlm_interp.corruptions.stack` joins examples into one batch whose edits carry per-row noise.

This is a core module: it knows hooks and errors, not the VLM or the Example classes (any
object with ``.model`` and any object with an ``.edits`` list will do).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import torch

from . import compat
from .errors import CorruptionError
from .hooks import AttachedHooks, Hook


@dataclass(frozen=True, eq=False)
class InputEdit:
    """Noise added to a module's primary tensor at ``index`` along dimension 1.

    ``noise`` has shape ``(rows, len(index), hidden)``; ``length`` is the size of dimension 1
    the edit expects. With ``exact_length`` the size must match (image-feature tensors);
    otherwise longer inputs are fine (prompt plus answer tokens) and shorter calls after the
    first application pass through unchanged (the single-token steps of cached generation).
    ``fold``: the module runs each example's tiles along its batch axis; dimension 1 then runs over
    the tiles in turn (:class:`~vlm_interp.hooks.Hook` ``fold``). ``packed``: the module's tensor has
    no batch axis, its rows' positions follow each other (``length`` each; see
    :class:`~vlm_interp.hooks.Hook`).
    """

    module: str
    kind: Literal["output", "input"]
    index: tuple[int, ...]
    noise: torch.Tensor
    length: int
    exact_length: bool = True
    label: str = "noise"
    fold: bool = False
    packed: bool = False

    def hook(self) -> Hook:
        """A fresh :class:`~vlm_interp.hooks.Hook` that adds the noise (state is per hook)."""
        fired = [False]
        index = list(self.index)

        def add(t: torch.Tensor) -> torch.Tensor | None:
            if self.packed and t.dim() == 3 and t.shape[0] == 1 and self.exact_length and t.shape[1] > self.length \
                    and t.shape[1] % self.length == 0:
                return add(t.reshape(t.shape[1] // self.length, self.length, t.shape[2])).reshape(t.shape)
            if t.dim() < 3 or t.shape[-1] != self.noise.shape[-1]:
                raise CorruptionError(
                    f"{self.label} at {self.module!r} expects (batch, positions, {self.noise.shape[-1]}) "
                    f"but the tensor there has shape {tuple(t.shape)}; the example was corrupted for a "
                    "different model"
                )
            n = t.shape[1]
            if (self.exact_length and n != self.length) or (not self.exact_length and n < self.length):
                if fired[0] and not self.exact_length:
                    return None  # a cached generation step after the prompt was processed
                raise CorruptionError(
                    f"{self.label} at {self.module!r} was built for {self.length} positions but the tensor "
                    f"there has {n}; run the corrupted example with its own inputs (same prompt and image)"
                )
            rows, batch = self.noise.shape[0], t.shape[0]
            if batch % rows:
                raise CorruptionError(
                    f"{self.label} at {self.module!r} holds noise for {rows} rows, but the batch has {batch} "
                    "rows; batch whole examples (stack or repeat them), not parts of one"
                )
            noise = self.noise.to(device=t.device, dtype=t.dtype)
            if batch != rows:
                noise = noise.repeat(batch // rows, 1, 1)
            t = t.clone()
            t[:, index] = t[:, index] + noise
            fired[0] = True
            return t

        return Hook(self.module, fn=add, kind=self.kind, name=f"{self.label} at {self.module}", fold=self.fold,
                    packed=self.packed, input_keywords=compat.LAYER_INPUT_KEYWORDS)


_ACTIVE: set[tuple[int, int]] = set()  # (model, example) pairs whose edits are attached right now


@contextlib.contextmanager
def applied(vlm: Any, example: Any) -> Iterator[AttachedHooks | None]:
    """Attach ``example.edits`` to ``vlm.model`` as hooks while the body runs; removed on exit, error if
    one never fired.

    Nesting for the same model and example attaches the edits once (never twice).
    """
    key = (id(vlm.model), id(example))
    if not example.edits or key in _ACTIVE:
        yield None
        return
    _ACTIVE.add(key)
    try:
        with AttachedHooks(vlm.model, [edit.hook() for edit in example.edits]) as hooks:
            yield hooks
    finally:
        _ACTIVE.discard(key)


__all__ = ["InputEdit", "applied"]
