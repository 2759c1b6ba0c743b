"""The grid a tracing method fills: its cells, their coordinates and labels, and the trace's attributes.

Exact tracing (:func:`~vlm_interp.tracing.trace`) and its gradient estimates
(:mod:`.attribution`) answer one question about one grid, so one :class:`GridPlan` serves
them all: :func:`plan_grid` checks the request, scores the clean and corrupted runs and fixes
the rows (component x layer [x head]) and the token axis; :meth:`GridPlan.trace` lays the
value of every cell out as a :class:`Trace`. A method only says how a cell's value is found:
patched forwards (:func:`exact_values`), or gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import xarray as xr

from ..errors import SiteError
from ..example import Example
from ..sites import HEAD_COMPONENTS, Site
from .engine import Cell, run_cells, same_layout, score_runs, site_activations
from .metrics import Metric, make_metric
from .results import Trace

DIRECTIONS = ("restore", "noise")
Key = tuple[str, int, "int | None"]  # (component, layer, head) of one row of the grid


def token_axis(example: Example, tower: str, tokens) -> tuple[list[list[int]], list[str], list[str]]:
    """The grid's token axis: positions (each a list), with a label and a group name for each.

    ``tokens`` is ``"each"`` (every position), ``"all"`` (one cell of all positions), a list
    of token-group names, or ``{label: positions}``.
    """
    groups = example.groups.get(tower, {})
    if tower == "lm":
        seq_len = example.n_tokens
    else:
        seq_len = 1 + max((p for g in groups.values() for p in g), default=-1)
    if isinstance(tokens, str) and tokens in ("each", "all"):
        if tokens == "all":
            return [list(range(seq_len))], ["all"], ["all"]
        member = {}
        for name in ("text", "question", "image", "object", "last"):
            for p in groups.get(name, []):
                member[p] = name
        texts = example.tokens if tower == "lm" and example.tokens else [str(p) for p in range(seq_len)]
        return [[p] for p in range(seq_len)], [texts[p] for p in range(seq_len)], \
            [member.get(p, "") for p in range(seq_len)]
    if isinstance(tokens, dict):
        names = list(tokens)
        return [list(tokens[n]) for n in names], names, names
    names = [tokens] if isinstance(tokens, str) else list(tokens)
    return [example.positions(n, tower) for n in names], names, names


def layer_window(layer: int, window: int, layers: Sequence[int]) -> list[int]:
    """ROME's window of ``window`` layers centred on ``layer``, clipped to the ``layers`` that exist."""
    lo, hi = layer - window // 2, layer - (-window // 2)
    return [l for l in layers if lo <= l < hi]


@dataclass
class GridPlan:
    """One tracing grid: its rows, token axis, metric, the base and source runs, and the trace's attributes."""

    tower: str
    comps: list[str]
    layers: dict[str, list[int]]  # the layers that have each component
    n_layers: int
    n_heads: int
    heads: bool  # head components: a (layer, head, position) grid per component
    positions: list[list[int]]
    labels: list[str]
    group_of: list[str]
    metric: Metric
    base: Example  # the run that is patched: corrupted when restoring, clean when noising
    source: Example  # the run whose activations are written in
    attrs: dict

    @property
    def window(self) -> int:
        return self.attrs["window"]

    @property
    def base_score(self) -> float:
        """The score of the run that is patched."""
        return self.attrs["corrupt_score" if self.attrs["direction"] == "restore" else "clean_score"]

    def heads_of(self, comp: str) -> int:
        """Heads per layer for a head component, 0 for a whole component."""
        return self.n_heads if comp in HEAD_COMPONENTS else 0

    def rows(self) -> Iterator[Key]:
        """Every (component, layer, head) row of the grid, in order."""
        for comp in self.comps:
            n_heads = self.heads_of(comp)
            for layer in self.layers[comp]:
                for head in (range(n_heads) if n_heads else [None]):
                    yield comp, layer, head

    def cells(self) -> Iterator[tuple[Key, int]]:
        """Every cell: a row and an index on the token axis, rows outermost."""
        for key in self.rows():
            for k in range(len(self.positions)):
                yield key, k

    def span(self, comp: str, layer: int) -> list[int]:
        """The layers a row patches together: its window clipped to the layers that have ``comp``."""
        return layer_window(layer, self.window, self.layers[comp])

    def cell(self, key: Key, k: int) -> Cell:
        """What the engine restores for one cell: the row's window of sites at the ``k``-th positions."""
        comp, layer, head = key
        return Cell(tuple(Site(self.tower, comp, at, head) for at in self.span(comp, layer)), tuple(self.positions[k]))

    def trace(self, values: Iterable[float]) -> Trace:
        """The labelled trace holding ``values``, one per cell in the order of :meth:`cells`."""
        shape = [len(self.comps), self.n_layers] + ([self.n_heads] if self.heads else []) + [len(self.positions)]
        grid = np.full(shape, np.nan)
        for ((comp, layer, head), k), value in zip(self.cells(), values, strict=True):
            grid[(self.comps.index(comp), layer) + ((head,) if self.heads else ()) + (k,)] = value
        dims = ["component", "layer"] + (["head"] if self.heads else []) + ["position"]
        coords = {"component": self.comps, "layer": list(range(self.n_layers)),
                  "position": list(range(len(self.positions))),
                  "token": ("position", self.labels), "group": ("position", self.group_of)}
        if self.heads:
            coords["head"] = list(range(self.n_heads))
        return Trace(xr.DataArray(grid, dims=dims, coords=coords, attrs=dict(self.attrs), name="effect"))


def _runs(clean: Example, corrupt: Example, direction: str) -> tuple[Example, Example]:
    """(base, source): restoring patches the clean run into the corrupted one, noising the reverse."""
    return (corrupt, clean) if direction == "restore" else (clean, corrupt)


def _layout(vlm, tower: str, comps: list[str], positions, labels, group_of, metric: Metric, clean: Example,
            corrupt: Example, attrs: dict) -> GridPlan:
    """A plan from checked parts (head components already known to be alone)."""
    heads = any(c in HEAD_COMPONENTS for c in comps)
    layers = {comp: vlm.adapter.layers_with(tower, comp) for comp in comps}  # unknown component -> SiteError
    base, source = _runs(clean, corrupt, attrs["direction"])
    return GridPlan(tower, comps, layers, vlm.adapter.n_layers[tower], vlm.adapter.n_heads[tower], heads,
                    positions, labels, group_of, metric, base, source, attrs)


def plan_grid(vlm, clean: Example, corrupt: Example, components: Sequence[str], tokens="each", window: int = 1,
              metric: str = "prob", answer: str | None = None, other: str | None = None,
              direction: str = "restore", method: str | None = None) -> GridPlan:
    """Check a tracing request and fix its grid; scores the clean and corrupted runs (two forwards).

    Arguments are those of :func:`~vlm_interp.tracing.trace`; ``method`` (an estimate's name)
    is recorded in the attributes when given.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive integer, got {window!r}")
    same_layout(clean, corrupt)
    specs = [c.split(".") for c in components]
    if not specs or any(len(s) != 2 for s in specs):
        raise SiteError(f"components are 'tower.component' names such as 'lm.attn', got {list(components)}")
    towers = {t for t, _ in specs}
    if len(towers) != 1:
        raise SiteError(f"trace one tower at a time; got {sorted(towers)}")
    tower = towers.pop()
    comps = [c for _, c in specs]
    n_head_comps = sum(c in HEAD_COMPONENTS for c in comps)
    if n_head_comps and n_head_comps != len(comps):
        raise SiteError("trace head components separately from whole components (their grids differ)")
    m = make_metric(vlm, clean, metric, answer, other)
    clean_score, corrupt_score = score_runs(vlm, [clean, corrupt], m)
    positions, labels, group_of = token_axis(clean, tower, tokens)
    attrs = {"model": vlm.name, "tower": tower, "metric": metric, "answer": answer or clean.answer,
             "other": other or "", "direction": direction, "window": window,
             "clean_score": clean_score, "corrupt_score": corrupt_score,
             "corruption": corrupt.meta.get("corruption", ""), "question": clean.question,
             "positions": [list(p) for p in positions]}
    if method is not None:
        attrs["method"] = method
    return _layout(vlm, tower, comps, positions, labels, group_of, m, clean, corrupt, attrs)


def plan_of(vlm, tr: Trace, clean: Example, corrupt: Example) -> GridPlan:
    """The plan of an existing trace of ``clean`` and ``corrupt`` (its layout and scores; no forward)."""
    same_layout(clean, corrupt)
    attrs, data = tr.attrs, tr.data
    m = make_metric(vlm, clean, attrs["metric"], attrs["answer"], attrs["other"] or None)
    return _layout(vlm, attrs["tower"], [str(c) for c in data.coords["component"].values],
                   [list(p) for p in attrs["positions"]], [str(t) for t in data.coords["token"].values],
                   [str(g) for g in data.coords["group"].values], m, clean, corrupt, dict(attrs))


def exact_values(vlm, plan: GridPlan, cells: Sequence[tuple[Key, int]], batch_size="auto", progress: bool = True,
                 desc: str = "patching", fast_path="auto") -> np.ndarray:
    """The patched metric value of each of ``cells``: the source run's activations restored in the base run."""
    todo = [plan.cell(key, k) for key, k in cells]
    source = site_activations(vlm, plan.source, {s for c in todo for s in c.sites})
    return run_cells(vlm, plan.base, source, todo, plan.metric, batch_size=batch_size, progress=progress,
                     desc=desc, fast_path=fast_path).numpy()
