"""Oracle image features: the scene graph's per-patch code in place of the vision tower's output.

A diagnostic for organism research. It separates what a language model can learn from what the vision
features let it learn: with this code a fresh shapes-llava LM binds the named object's position and learns
relations, with the trained tower it does not (results/notes/organisms-v3-runs.md, session 7).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..model import VLM
from .shapes import WorldConfig
from .train import VISION_MODULE, SceneBank, grid_cells


def patch_code(bank: SceneBank, index: Sequence[int] | torch.Tensor, config: WorldConfig, width: int) -> torch.Tensor:
    """(len(index), 1 + patches, width): a zero row for the CLS token, then for every patch the one-hot shape
    of the object that owns it (class 0 = background), its colour (0 = background), its own row and its own
    column, and zeros in the remaining dimensions."""
    index = torch.as_tensor(index, dtype=torch.long)
    grid, n_shapes, n_colors = config.grid, len(config.shapes) + 1, len(config.colors) + 1
    used = n_shapes + n_colors + 2 * grid
    if used > width:
        raise ValueError(f"the code needs {used} dimensions, the tower is {width} wide")
    cells = grid_cells(grid)
    parts = [F.one_hot(bank.patch_shape[index], n_shapes), F.one_hot(bank.patch_color[index], n_colors),
             F.one_hot(cells[:, 0], grid).expand(len(index), -1, -1),
             F.one_hot(cells[:, 1], grid).expand(len(index), -1, -1)]
    code = torch.zeros(len(index), 1 + grid * grid, width)
    code[:, 1:, :used] = torch.cat(parts, -1).float()
    return code


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
