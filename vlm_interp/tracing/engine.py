"""The batched patch runner: one forward of many rows, each row restoring a different cell.

ROME's trick, generalised: capture the source activations once (the clean run, when
restoring), repeat the base input (the corrupted run) over a batch, and in every row write
the source values of that row's cell (a site, or a window of sites, at some positions).
Every write goes through :mod:`vlm_interp.hooks`, so hooks are removed on exit and a site
that never ran is an error. Corruptions that live inside the model (noise on embeddings)
are applied to every row by :func:`vlm_interp.corruptions.applied`.

Cells in the LM of a causal-decoder family skip what their patch cannot change: the base
run is recorded once at the entry of every LM layer, and each batch restarts there, at its
cells' layer and earliest position (:mod:`vlm_interp.tracing.fast`); other cells run
whole-model forwards. ``batch_size="auto"`` sizes batches from the free memory and halves them
on running out of it (:mod:`vlm_interp.tracing.memory`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import torch
from tqdm.auto import tqdm

from ..corruptions.base import applied, check_layout
from ..errors import SiteError
from ..example import Example
from ..hooks import Hook
from ..sites import Site
from . import fast
from .memory import (FALLBACK_BATCH, MAX_AUTO_BATCH, MEMORY_FRACTION, BatchSize, BatchSizeWarning,  # noqa: F401
                     _back_off, _batch_size, auto_batch_size, available_memory, row_bytes)
from .metrics import Metric


@dataclass(frozen=True)
class Cell:
    """What one batch row restores: the same positions at one or several sites."""

    sites: tuple[Site, ...]
    positions: tuple[int, ...]


def repeat_inputs(inputs: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """Model inputs of one example repeated ``rows`` times along the batch dimension."""
    return {k: v.repeat(rows, *([1] * (v.dim() - 1))) if torch.is_tensor(v) else v for k, v in inputs.items()}


def site_activations(vlm, example: Example, sites: Iterable[Site]) -> dict[Site, torch.Tensor]:
    """The activations of ``example`` (with its edits) at ``sites``, detached; one forward."""
    hooks = {site: vlm.hook(site, capture=True) for site in dict.fromkeys(sites)}
    with torch.no_grad(), applied(vlm, example), vlm.attach(hooks.values()):
        vlm.logits(example.inputs)
    return {site: hook.value for site, hook in hooks.items()}


def _writer(site: Site, rows: list[tuple[int, tuple[int, ...]]], value: torch.Tensor, batch: int,
            offset: int | None = None, packed: bool = False):
    """An edit function writing ``value`` at each row's positions (rows may span several sub-rows).

    The patched tensor holds the whole sequence, or (runs that start inside the LM, see
    :mod:`.fast`) the positions from ``offset`` on, sometimes only a span of them. A ``packed``
    tower's tensor holds the rows one after the other on its positions axis (see the adapter's ``Tower.batch_layout``).
    """
    def write(t: torch.Tensor) -> torch.Tensor:
        shape = t.shape
        if packed:
            if t.shape[0] != 1 or t.shape[1] % batch:
                raise SiteError(f"{site}: a packed tensor of shape {tuple(t.shape)} does not hold {batch} rows of "
                                "equal length")
            t = t.reshape(batch, t.shape[1] // batch, t.shape[2])
        sub, rest = divmod(t.shape[0], batch)
        if rest or value.shape[0] != sub:
            raise SiteError(f"{site}: the patched tensor has {t.shape[0]} rows for a batch of {batch}, and the "
                            f"source has {value.shape[0]}; source and base runs must have the same layout")
        top, low = max(p for _, pos in rows for p in pos), min(p for _, pos in rows for p in pos)
        first = offset or 0
        end = t.shape[1] + first
        if top >= end or low < first or (end > value.shape[1] if offset is not None else end != value.shape[1]):
            raise SiteError(f"{site}: positions {low}..{top} or source length {value.shape[1]} do not fit the "
                            f"positions {first}..{end - 1} computed there")
        t = t.clone()
        for r, pos in rows:
            idx = list(pos)
            t[r * sub:(r + 1) * sub, [p - first for p in idx]] = value[:, idx].to(t.device, t.dtype)
        return t.reshape(shape) if packed else t

    return write


def _patch_hooks(vlm, chunk: Sequence[Cell], source: dict[Site, torch.Tensor],
                 offset: int | None = None) -> list[Hook]:
    """One hook per site of ``chunk``, writing each row's cell (row r restores ``chunk[r]``)."""
    rows_by_site: dict[Site, list[tuple[int, tuple[int, ...]]]] = {}
    for r, cell in enumerate(chunk):
        for site in cell.sites:
            rows_by_site.setdefault(site, []).append((r, cell.positions))
    return [vlm.hook(site, _writer(site, rows, source[site], len(chunk), offset, vlm.adapter.packed(site.tower)))
            for site, rows in rows_by_site.items()]


def _check_cells(cells: Sequence[Cell], source: dict[Site, torch.Tensor]) -> None:
    """Every cell restores some position, at sites whose source activations were captured."""
    missing = {s for c in cells for s in c.sites} - set(source)
    if missing:
        raise SiteError(f"no source activations for sites {sorted(s.name for s in missing)}")
    for cell in cells:
        if not cell.positions:
            raise SiteError(f"cell at {[s.name for s in cell.sites]} restores no position")


# ---- running cells ----------------------------------------------------------------------
def _run_whole(vlm, base: Example, source, cells: Sequence[Cell], metric: Metric, size: int, bar,
               auto: bool = False) -> torch.Tensor:
    """The general path: whole-model forwards of the base input, ``size`` cells per batch (halved on running out
    of memory when ``auto``)."""
    out = torch.empty(len(cells))
    answer_at = vlm.answer_start(base)
    lo = 0
    while lo < len(cells):
        chunk = cells[lo:lo + size]
        try:
            with torch.no_grad(), applied(vlm, base), vlm.attach(_patch_hooks(vlm, chunk, source)):
                logits = vlm.logits(repeat_inputs(base.inputs, len(chunk)))
        except (torch.OutOfMemoryError, MemoryError):
            size = _back_off(size, auto)
            if size is None:
                raise
            continue
        out[lo:lo + len(chunk)] = metric(logits[:, answer_at])
        bar.update(len(chunk))
        lo += len(chunk)
    return out


CHUNK_SLACK = 0.15  # a fast-path batch may compute at most this share more than its cells need


@dataclass(frozen=True, order=True)
class _Entry:
    """Where a cell's patched run can start: its earliest layer and position, and whether it patches one layer."""

    layer: int
    # the run starts at ``layer`` at every later position: sites on several layers (a window), or a layer's input,
    # which reaches that layer's later positions through its keys and values
    spread: bool
    first: int
    last: int


def _entry(cell: Cell) -> _Entry:
    """The :class:`_Entry` of one cell."""
    layers = {s.layer for s in cell.sites}
    into_layer = any(s.component == "input" for s in cell.sites)
    return _Entry(min(layers), len(layers) > 1 or into_layer, min(cell.positions), max(cell.positions))


def _chunk_args(entries: Sequence[_Entry]) -> tuple[int, int, int | None]:
    """(layer, position, span_end) for :meth:`fast.LMStart.logits` of a batch with these entries."""
    layer, spread = entries[0].layer, entries[0].spread
    return layer, min(e.first for e in entries), None if spread else max(e.last for e in entries)


def _fast_chunks(start: fast.LMStart, entries: list[_Entry], size: int) -> list[list[int]]:
    """Batches of cell indices, sorted by entry, of at most ``size`` rows and ``CHUNK_SLACK`` wasted work.

    A batch starts at its earliest position, so a cell entering later costs more inside it
    than alone; cutting batches where that waste would pass the slack keeps the work near
    what the cells need, while batching cells with nearby entries. A batch has one entry layer.
    """
    chunks: list[list[int]] = []
    need = 0
    for i in sorted(range(len(entries)), key=lambda i: entries[i]):
        e = entries[i]
        alone = start.cost(1, *_chunk_args([e]))
        head = entries[chunks[-1][0]] if chunks else None
        if head is not None and len(chunks[-1]) < size and (head.layer, head.spread) == (e.layer, e.spread):
            grown = [entries[k] for k in chunks[-1]] + [e]
            if start.cost(len(grown), *_chunk_args(grown)) <= (1 + CHUNK_SLACK) * (need + alone):
                chunks[-1].append(i)
                need += alone
                continue
        chunks.append([i])
        need = alone
    return chunks


def _run_from_lm(vlm, start: fast.LMStart, source, cells: Sequence[Cell], metric: Metric, size: int,
                 bar, auto: bool = False) -> torch.Tensor:
    """The fast path: batches of cells run from their entry layer and position (see :mod:`.fast`); on running out of
    memory (``auto``), the cells not yet done are batched again at half the size."""
    out = torch.empty(len(cells))
    entries = [_entry(c) for c in cells]
    for cell, e in zip(cells, entries):
        if e.last >= start.seq_len:
            raise SiteError(f"cell at {[s.name for s in cell.sites]} restores position {e.last} of a "
                            f"sequence of {start.seq_len}")
    idle = [i for i, e in enumerate(entries) if start.without_effect(e.layer, cells[i].positions, e.spread)]
    if idle:
        out[idle] = metric(start.reference[None]).expand(len(idle))
        bar.update(len(idle))
    pending, done = [i for i in range(len(cells)) if i not in set(idle)], set()
    while pending:
        try:
            for chunk in _fast_chunks(start, [entries[i] for i in pending], size):
                index = [pending[k] for k in chunk]
                batch = [cells[i] for i in index]
                layer, position, span_end = _chunk_args([entries[i] for i in index])
                with torch.no_grad(), vlm.attach(_patch_hooks(vlm, batch, source, start.start_position(position))):
                    logits = start.logits(len(batch), layer, position, span_end)
                out[index] = metric(logits)
                bar.update(len(batch))
                done.update(index)
            pending = []
        except (torch.OutOfMemoryError, MemoryError):
            pending = [i for i in pending if i not in done]
            size = _back_off(size, auto)
            if size is None:
                raise
    return out


FastPath = bool | Literal["auto"]
FAST_PATHS = {"auto": "auto", "fast": True, "general": False}  # the command line's names for the choices


class FastPathWarning(UserWarning):
    """The fast tracing path did not apply, or fell back to whole-model forwards; the numbers are those of the latter."""


class FastPathError(RuntimeError):
    """``fast_path=True`` was requested for and the fast tracing path cannot apply."""


def _lm_start(vlm, base: Example, fast_path: FastPath) -> fast.LMStart | None:
    """The fast path's recorded state, or ``None`` (with a warning, or an error when it was required)."""
    start, why = fast.lm_start(vlm, base)
    if start is None:
        if fast_path is True:
            raise FastPathError(f"fast_path=True, but the fast tracing path cannot apply: {why}; "
                                "use fast_path='auto' (falls back) or False")
        warnings.warn(f"LM cells run whole-model forwards (slower, same numbers): {why}", FastPathWarning,
                      stacklevel=3)
    elif start.why_no_kv:
        warnings.warn(f"the fast tracing path recomputes every position (no key/value reuse): {start.why_no_kv}",
                      FastPathWarning, stacklevel=3)
    return start


def run_cells(vlm, base: Example, source: dict[Site, torch.Tensor], cells: Sequence[Cell], metric: Metric,
              batch_size: BatchSize = "auto", progress: bool = True, desc: str = "patching",
              fast_path: FastPath = "auto") -> torch.Tensor:
    """``metric`` of the base run with each cell's sites restored from ``source``; shape (len(cells),).

    Cells whose sites are all in the LM of a causal-decoder family start at their earliest
    layer and position from the base run's recorded state (:mod:`vlm_interp.tracing.fast`),
    so the vision tower and the unchanged prefix run once; other cells run whole-model
    forwards. Both give the same results. ``fast_path``: ``"auto"`` uses the fast path where
    it applies and otherwise warns (:class:`FastPathWarning`) and runs whole-model forwards,
    also when a fast batch raises anything but running out of memory; ``True`` requires it
    (:class:`FastPathError` when it cannot apply; errors propagate); ``False`` never uses it.

    ``batch_size`` is the number of cells per forward, or ``"auto"``: a quarter of the free
    memory (CUDA free memory, else available RAM) divided by the estimated bytes of one
    row (:func:`row_bytes`: positions x width x (3 x layers + 8) per tower run, one head's
    attention scores per head, the logits), clipped to 1..64 and to the number of cells. A batch
    that runs out of memory under ``"auto"`` is retried at half the size (:class:`BatchSizeWarning`),
    keeping the cells already done; a batch size given as a number lets the error through.
    """
    if fast_path not in (True, False, "auto"):
        raise ValueError(f"fast_path must be 'auto', True or False, got {fast_path!r}")
    _check_cells(cells, source)
    lm_cells = [i for i, c in enumerate(cells) if all(s.tower == fast.TOWER for s in c.sites)] if fast_path else []
    if fast_path is True and len(lm_cells) < len(cells):
        other = sorted({s.name for c in cells for s in c.sites if s.tower != fast.TOWER})
        raise FastPathError(f"fast_path=True, but the fast tracing path only runs sites of the {fast.TOWER!r} tower, "
                            f"not {other[:4]}; use fast_path='auto' or False")
    start = _lm_start(vlm, base, fast_path) if lm_cells else None
    quick = sorted(lm_cells) if start is not None else []
    fast_cells = set(quick)
    rest = [i for i in range(len(cells)) if i not in fast_cells]
    out = torch.empty(len(cells))
    with tqdm(total=len(cells), desc=desc, disable=not progress, leave=False) as bar:
        if quick:
            done, size = bar.n, _batch_size(vlm, base, batch_size, len(quick), start)
            try:
                out[quick] = _run_from_lm(vlm, start, source, [cells[i] for i in quick], metric, size, bar,
                                          batch_size == "auto")
            except (torch.OutOfMemoryError, MemoryError, SiteError):
                raise
            except Exception as err:  # noqa: BLE001 - any other failure of the fast path: fall back, loudly
                if fast_path is True:
                    raise
                warnings.warn(f"the fast tracing path failed ({type(err).__name__}: {err}); its cells run "
                              "whole-model forwards instead (slower, same numbers)", FastPathWarning, stacklevel=2)
                bar.n = done
                rest = sorted(rest + quick)
        if rest:
            size = _batch_size(vlm, base, batch_size, len(rest))
            out[rest] = _run_whole(vlm, base, source, [cells[i] for i in rest], metric, size, bar,
                                   batch_size == "auto")
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
