"""Oracle image features: the scene graph's per-patch code in place of the vision tower's output.

A diagnostic for organism research. It separates what a language model can learn from what the vision
features let it learn: with this code a fresh shapes-llava LM binds the named object's position and learns
relations, with the trained tower it does not (results/notes/organisms-v3-runs.md, session 7).
"""

from __future__ import annotations

import torch

from ..model import VLM
from .scene_code import patch_code
from .train import VISION_MODULE


class OracleVision:
    """Context manager: while active, the last layer of a LLaVA vision tower returns ``code`` (set it before
    every forward) instead of its own output, so the projector and the LM see the scene graph's code."""

    def __init__(self, vlm: VLM):
        if vlm.family != "llava":
            raise ValueError(f"oracle features replace a LLaVA tower's selected layer; {vlm.family!r} is not LLaVA")
        tower = vlm.model.get_submodule(VISION_MODULE["llava"])
        self.layer = tower.encoder.layers[-1]
        self.code: torch.Tensor | None = None
        self._handle = None

    def _replace(self, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if self.code is None or self.code.shape != hidden.shape:
            raise ValueError(f"oracle code of shape {None if self.code is None else tuple(self.code.shape)} does not "
                             f"match the tower's output {tuple(hidden.shape)}: set .code for this batch first")
        return (self.code,) + tuple(output[1:]) if isinstance(output, tuple) else self.code

    def __enter__(self) -> "OracleVision":
        # first in line: transformers records hidden states with its own hook on the same layer (installed on the
        # first forward), and that one must see the code, not the tower's output
        self._handle = self.layer.register_forward_hook(self._replace, prepend=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self._handle = None
        self.code = None


__all__ = ["OracleVision", "patch_code"]
