"""Oracle image features: the scene graph's per-patch code in place of the vision tower's output.

A diagnostic for organism research. It separates what a language model can learn from what the vision
features let it learn: with this code a fresh shapes-llava LM binds the named object's position and learns
relations, with the trained tower it does not (docs/research/organism-training-2.md, round 7).
"""

from __future__ import annotations

import torch

from ..hooks import AttachedHooks
from ..model import VLM
from ..sites import Site
from .scene_code import patch_code


class OracleVision:
    """Context manager: while active, the last layer of the vision tower returns ``code`` (set it before every
    forward) instead of its own output, so the per-patch projector (LLaVA's) and the LM see the scene graph's code.

    The replacement is a hook of the hook engine at ``vision.hidden.<last layer>``: it runs before transformers'
    own hooks on that layer (which record hidden states and must see the code), and a block in which the
    tower never ran is an error."""

    def __init__(self, vlm: VLM):
        if not vlm.adapter.adapter.patch_projector:
            raise ValueError(f"oracle features replace the vision tower's output where a per-patch projector maps it "
                             f"into the LM; the {vlm.family} adapter names no such projector (patch_projector)")
        self.vlm = vlm
        self.site = Site("vision", "hidden", vlm.adapter.n_layers["vision"] - 1)
        self.code: torch.Tensor | None = None
        self._hooks: AttachedHooks | None = None

    def _replace(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.code is None or self.code.shape != hidden.shape:
            raise ValueError(f"oracle code of shape {None if self.code is None else tuple(self.code.shape)} does not "
                             f"match the tower's output {tuple(hidden.shape)}: set .code for this batch first")
        return self.code

    def __enter__(self) -> "OracleVision":
        self._hooks = self.vlm.attach([self.vlm.hook(self.site, self._replace)])
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._hooks.__exit__(*exc)
        finally:
            self._hooks = None
            self.code = None


__all__ = ["OracleVision", "patch_code"]
