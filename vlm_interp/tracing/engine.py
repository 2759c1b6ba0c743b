"""The batched patch runner: one forward of many rows, each row restoring a different cell.

ROME's trick, generalised: capture the source activations once (the clean run, when
restoring), repeat the base input (the corrupted run) over a batch, and in every row write
the source values of that row's cell (a site, or a window of sites, at some positions).
Every write goes through :mod:`vlm_interp.hooks`, so hooks are removed on exit and a site
that never ran is an error. Corruptions that live inside the model (noise on embeddings)
are applied to every row by :func:`vlm_interp.corruptions.applied`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from ..corruptions.base import applied, check_layout
from ..errors import SiteError
from ..example import Example
from ..hooks import Hook
from ..sites import Site
from .metrics import Metric


@dataclass(frozen=True)
class Cell:
    """What one batch row restores: the same positions at one or several sites."""

    sites: tuple[Site, ...]
    positions: tuple[int, ...]


def repeat_inputs(inputs: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """Model inputs of one example repeated ``rows`` times along the batch dimension."""
    return {k: v.repeat(rows, *([1] * (v.dim() - 1))) if torch.is_tensor(v) else v for k, v in inputs.items()}


def capture(vlm, example: Example, sites: Iterable[Site]) -> dict[Site, torch.Tensor]:
    """The activations of ``example`` (with its edits) at ``sites``, detached; one forward."""
    hooks = {site: vlm.hook(site, capture=True) for site in dict.fromkeys(sites)}
    with torch.no_grad(), applied(vlm, example), vlm.hooks(hooks.values()):
        vlm.logits(example.inputs)
    return {site: hook.value for site, hook in hooks.items()}


def _writer(site: Site, rows: list[tuple[int, tuple[int, ...]]], value: torch.Tensor, batch: int):
    """An edit function writing ``value`` at each row's positions (rows may span several sub-rows)."""
    def write(t: torch.Tensor) -> torch.Tensor:
        sub, rest = divmod(t.shape[0], batch)
        if rest or value.shape[0] != sub:
            raise SiteError(f"{site}: the patched tensor has {t.shape[0]} rows for a batch of {batch}, and the "
                            f"source has {value.shape[0]}; source and base runs must have the same layout")
        top = max(p for _, pos in rows for p in pos)
        if top >= t.shape[1] or t.shape[1] != value.shape[1]:
            raise SiteError(f"{site}: position {top} or source length {value.shape[1]} does not fit the "
                            f"sequence of length {t.shape[1]} there")
        t = t.clone()
        for r, pos in rows:
            idx = list(pos)
            t[r * sub:(r + 1) * sub, idx] = value[:, idx].to(t.dtype)
        return t

    return write


def run_cells(vlm, base: Example, source: dict[Site, torch.Tensor], cells: Sequence[Cell], metric: Metric,
              batch_size: int = 32, progress: bool = True, desc: str = "patching") -> torch.Tensor:
    """``metric`` of the base run with each cell's sites restored from ``source``; shape (len(cells),)."""
    out = torch.empty(len(cells))
    answer_at = vlm.answer_start(base)
    missing = {s for c in cells for s in c.sites} - set(source)
    if missing:
        raise SiteError(f"no source activations for sites {sorted(s.name for s in missing)}")
    starts = range(0, len(cells), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress or len(starts) < 2, leave=False):
        chunk = cells[start:start + batch_size]
        rows_by_site: dict[Site, list[tuple[int, tuple[int, ...]]]] = {}
        for r, cell in enumerate(chunk):
            if not cell.positions:
                raise SiteError(f"cell at {[s.name for s in cell.sites]} restores no position")
            for site in cell.sites:
                rows_by_site.setdefault(site, []).append((r, cell.positions))
        hooks: list[Hook] = [vlm.hook(site, _writer(site, rows, source[site], len(chunk)))
                             for site, rows in rows_by_site.items()]
        with torch.no_grad(), applied(vlm, base), vlm.hooks(hooks):
            logits = vlm.logits(repeat_inputs(base.inputs, len(chunk)))
        out[start:start + len(chunk)] = metric(logits[:, answer_at])
    return out


def score_runs(vlm, examples: Sequence[Example], metric: Metric) -> list[float]:
    """``metric`` of each example run as it is (with its edits)."""
    values = []
    for ex in examples:
        with torch.no_grad(), applied(vlm, ex):
            values.append(float(metric(vlm.logits(ex.inputs)[:, vlm.answer_start(ex)])[0]))
    return values


def same_layout(clean: Example, corrupt: Example) -> None:
    """Patching needs both runs to have the same tokens at the same places."""
    check_layout(clean, corrupt, what="corrupted example")
