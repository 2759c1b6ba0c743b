"""Sweeps spread over the processes of an ``accelerate launch``: which process this is, its share, the barrier.

Every sweep that shards (POPE, dataset tracing, head scoring, the localisation study) follows one
pattern: each process takes every ``world``-th item from its ``rank`` on, keeps each result in a
file of its own (so an interrupted run resumes and no two processes write the same file), waits
for the others, and then reads every result back, checking that none is missing. Alone (no
``accelerate launch``, or one process) it is the plain loop.
"""

from __future__ import annotations

import os
from typing import Any, Sequence, TypeVar

import torch

from .errors import VLMInterpError

T = TypeVar("T")


def process_rank() -> tuple[int, int, Any]:
    """(rank, world size, accelerate state) of this process: (0, 1, None) unless launched by accelerate."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    try:
        from accelerate import PartialState
    except ImportError:
        raise VLMInterpError("this process was launched with several workers but accelerate is not installed; "
                             "pip install 'vlm-interp[dist]'") from None
    # cpu=True lets accelerate form a gloo group on machines without GPUs (MULTI_CPU)
    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.num_processes, state


def share(items: Sequence[T], rank: int, world: int) -> list[T]:
    """This process's share of ``items``: every ``world``-th one from position ``rank`` on."""
    return [item for k, item in enumerate(items) if k % world == rank]


def wait(state: Any) -> None:
    """Wait until every process reaches this point (nothing to wait for alone)."""
    if state is not None:
        state.wait_for_everyone()


def unique_keys(keys: Sequence[str], what: str) -> list[str]:
    """``keys`` as a list, or an error naming the repeats (a key names one result file, written by one process)."""
    keys = list(keys)
    seen: set[str] = set()
    repeats = sorted({k for k in keys if k in seen or seen.add(k)})
    if repeats:
        raise VLMInterpError(f"{what}: keys {repeats[:5]} repeat; each key names one result file, so keys must be "
                             "unique")
    return keys


__all__ = ["process_rank", "share", "unique_keys", "wait"]
