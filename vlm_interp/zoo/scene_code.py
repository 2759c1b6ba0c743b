"""The scene code: a per-patch one-hot summary of the scene graph (owner's shape, owner's colour, row, column).

The oracle diagnostic feeds it to the language model in place of the vision tower's output, and the "code"
vision stage trains the tower and the projector's first layer to compute it from pixels. Both share this layout.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .scene_bank import SceneBank
from .shapes import WorldConfig


def grid_cells(grid: int) -> torch.Tensor:
    """(grid * grid, 2) the (row, column) of every patch, in the tower's patch order."""
    return torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij"), -1).reshape(-1, 2)


def code_slices(config: WorldConfig) -> dict[str, slice]:
    """Where each one-hot block sits in the code: shape (class 0 = background), colour (0 = background), row,
    column. Dimensions after the last block are zero in the code."""
    sizes = {"shape": len(config.shapes) + 1, "colour": len(config.colors) + 1, "row": config.grid,
             "column": config.grid}
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = slice(start, start + size)
        start += size
    return out


def code_targets(bank: SceneBank, index: torch.Tensor, config: WorldConfig) -> dict[str, torch.Tensor]:
    """(len(index), patches) int64 class of every patch in each block of the code."""
    cells = grid_cells(config.grid).expand(len(index), -1, -1)
    return {"shape": bank.patch_shape[index], "colour": bank.patch_color[index], "row": cells[..., 0],
            "column": cells[..., 1]}


def one_hot_code(targets: dict[str, torch.Tensor], config: WorldConfig, width: int,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(*targets' shape, width) the code of per-patch classes ``targets`` (as ``code_targets`` gives them): each
    block one-hot (see ``code_slices``), zeros in the remaining dimensions."""
    slices = code_slices(config)
    used = slices["column"].stop
    if used > width:
        raise ValueError(f"the code needs {used} dimensions, the tower is {width} wide")
    code = torch.zeros(*targets["shape"].shape, width, dtype=dtype)
    for name, sl in slices.items():
        code[..., sl] = F.one_hot(targets[name], sl.stop - sl.start).to(dtype)
    return code


def patch_code(bank: SceneBank, index: Sequence[int] | torch.Tensor, config: WorldConfig, width: int) -> torch.Tensor:
    """(len(index), 1 + patches, width): a zero row for the CLS token, then every patch's code (see
    ``one_hot_code``)."""
    index = torch.as_tensor(index, dtype=torch.long)
    code = torch.zeros(len(index), 1 + config.grid ** 2, width)
    code[:, 1:] = one_hot_code(code_targets(bank, index, config), config, width)
    return code


__all__ = ["code_slices", "code_targets", "grid_cells", "one_hot_code", "patch_code"]
