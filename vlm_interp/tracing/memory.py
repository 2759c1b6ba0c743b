"""How many cells a batch holds: sized from the free memory (``batch_size="auto"``), halved on running out of it.

The bound a sweep plans is :func:`row_bytes` per row (the activations of one whole-model run,
or of one run starting inside the LM) times the rows per batch; :func:`planned_bytes` gives it,
and ``benchmarks/bench_memory.py`` measures a sweep's peak against it.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch

from ..corruptions.base import applied
from ..example import Example
from ..sites import Site
from . import fast

BatchSize = int | Literal["auto"]
MAX_AUTO_BATCH = 64  # beyond this, bigger batches stop paying on CPU and only cost memory
MEMORY_FRACTION = 0.25  # share of the free memory a sweep may fill with activations
FALLBACK_BATCH = 32  # when the free memory cannot be read


def available_memory(device: torch.device) -> int | None:
    """Bytes free for activations on ``device``: CUDA's free memory, else the system's available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _tower_shapes(vlm, base: Example) -> dict[str, tuple[int, int]]:
    """(positions, width) of every tower's layer-0 output in one run of ``base``, and the vocabulary."""
    shapes: dict[str, tuple[int, int]] = {}

    def recorder(tower: str):
        def record(t: torch.Tensor) -> None:
            shapes.setdefault(tower, (t.shape[-2], t.shape[-1]))
        return record

    hooks = [vlm.hook(Site(t, "hidden", 0), recorder(t), allow_unused=True) for t in vlm.adapter.towers()]
    with torch.no_grad(), applied(vlm, base), vlm.attach(hooks):
        logits = vlm.logits(base.inputs)
    shapes["vocab"] = (logits.shape[1], logits.shape[-1])
    return shapes


def row_bytes(vlm, base: Example, start: fast.LMStart | None = None) -> int:
    """Estimated activation bytes of one batch row: a whole-model run, or a run starting inside the LM."""
    itemsize = next(vlm.model.parameters()).element_size()
    if start is not None:
        n_layers, heads = len(start.layers), vlm.adapter.n_heads[fast.TOWER]
        vocab = start.tail[-1].weight.shape[0] if hasattr(start.tail[-1], "weight") else 0
        return itemsize * (start.seq_len * start.width * (3 * n_layers + 8) + heads * start.seq_len ** 2 + vocab)
    shapes = _tower_shapes(vlm, base)
    total, attention = 0, 0
    for tower, (seq, width) in shapes.items():
        if tower == "vocab":
            total += seq * width  # full logits
            continue
        total += seq * width * (3 * vlm.adapter.n_layers[tower] + 8)
        attention = max(attention, vlm.adapter.n_heads[tower] * seq ** 2)
    return itemsize * (total + attention)


def auto_batch_size(vlm, base: Example, n_cells: int, start: fast.LMStart | None = None) -> int:
    """Rows per batch from the free memory: ``MEMORY_FRACTION`` of it over :func:`row_bytes`, in 1..64."""
    free = available_memory(vlm.device)
    if free is None:
        return max(1, min(FALLBACK_BATCH, n_cells))
    rows = int(MEMORY_FRACTION * free // max(1, row_bytes(vlm, base, start)))
    return max(1, min(MAX_AUTO_BATCH, n_cells, rows))


def _batch_size(vlm, base: Example, batch_size: BatchSize, n_cells: int, start: fast.LMStart | None = None) -> int:
    """``batch_size`` checked, or resolved by :func:`auto_batch_size` when it is ``"auto"``."""
    if batch_size == "auto":
        return auto_batch_size(vlm, base, n_cells, start)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
    return batch_size


class BatchSizeWarning(UserWarning):
    """``batch_size="auto"`` ran out of memory and retries with smaller batches (finished cells are kept)."""


def _back_off(size: int, auto: bool) -> int | None:
    """Half of ``size`` after running out of memory, with a warning; ``None`` where the error must stand (a batch
    size the caller chose, or one row)."""
    if not auto or size == 1:
        return None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    warnings.warn(f"out of memory with {size} cells per batch; retrying with {size // 2} (finished cells are kept)",
                  BatchSizeWarning, stacklevel=3)
    return size // 2




def planned_bytes(vlm, base: Example, batch_size: BatchSize, n_cells: int, start: fast.LMStart | None = None) -> dict:
    """The memory plan of a sweep of ``n_cells`` on ``base``: rows per batch, bytes per row, and their product."""
    rows = _batch_size(vlm, base, batch_size, n_cells, start)
    per_row = row_bytes(vlm, base, start)
    return {"rows": rows, "row_bytes": per_row, "bound": rows * per_row}
