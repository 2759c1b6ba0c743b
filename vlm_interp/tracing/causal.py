"""Causal tracing over a grid: components x layers x positions (or heads), batched."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import xarray as xr

from ..errors import SiteError
from ..example import Example
from ..sites import HEAD_COMPONENTS, Site
from .engine import Cell, capture, run_cells, same_layout, score_runs
from .metrics import make_metric
from .results import Trace

DIRECTIONS = ("restore", "noise")


def _positions(example: Example, tower: str, tokens) -> tuple[list[int], list[str], list[str]]:
    """Positions (each a list) of the token axis with a label and a group name for each."""
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


def _window(layer: int, window: int, n_layers: Sequence[int]) -> list[int]:
    """ROME's window of ``window`` layers centred on ``layer``, clipped to the layers that exist."""
    lo, hi = layer - window // 2, layer - (-window // 2)
    return [l for l in n_layers if lo <= l < hi]


def trace(vlm, clean: Example, corrupt: Example, components: Sequence[str] = ("lm.hidden", "lm.attn", "lm.mlp"),
          tokens="each", window: int = 1, metric: str = "prob", answer: str | None = None, other: str | None = None,
          direction: str = "restore", batch_size: "int | str" = "auto", progress: bool = True,
          fast_path: "bool | str" = "auto") -> Trace:
    """Effect on the answer of restoring each component at each layer and position.

    ``components`` are ``tower.component`` names (``lm.hidden``, ``vision.mlp``,
    ``qformer.xattn``, ``lm.head``...); all must be in one tower. ``tokens`` is ``"each"``
    (every position), ``"all"``, a list of token-group names, or ``{label: positions}``.
    ``direction="restore"`` patches clean activations into the corrupted run (ROME);
    ``"noise"`` patches corrupted activations into the clean run. Head components give a
    (layer, head, position) grid. ``batch_size`` is the number of cells per forward or
    ``"auto"`` (from the free memory; see :func:`~vlm_interp.tracing.engine.run_cells`).
    ``fast_path``: ``"auto"`` (the fast path for LM sites where it applies, else a warning and
    whole-model forwards), ``True`` (require it) or ``False`` (whole-model forwards only).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    same_layout(clean, corrupt)
    specs = [c.split(".") for c in components]
    if any(len(s) != 2 for s in specs):
        raise SiteError(f"components are 'tower.component' names such as 'lm.attn', got {list(components)}")
    towers = {t for t, _ in specs}
    if len(towers) != 1:
        raise SiteError(f"trace one tower at a time; got {sorted(towers)}")
    tower = towers.pop()
    base, source_ex = (corrupt, clean) if direction == "restore" else (clean, corrupt)
    m = make_metric(vlm, clean, metric, answer, other)
    clean_score, corrupt_score = score_runs(vlm, [clean, corrupt], m)
    positions, labels, group_of = _positions(clean, tower, tokens)
    heads = [c for _, c in specs if c in HEAD_COMPONENTS]
    if heads and len(heads) != len(specs):
        raise SiteError("trace head components separately from whole components (their grids differ)")
    cells, coords = [], []
    for _, comp in specs:
        layers = vlm.adapter.layers_with(tower, comp)
        for layer in layers:
            span = _window(layer, window, layers)
            head_range = range(vlm.adapter.n_heads[tower]) if comp in HEAD_COMPONENTS else [None]
            for head in head_range:
                sites = tuple(Site(tower, comp, l, head) for l in span)
                for k, pos in enumerate(positions):
                    cells.append(Cell(sites, tuple(pos)))
                    coords.append((comp, layer, head, k))
    source = capture(vlm, source_ex, {s for c in cells for s in c.sites})
    values = run_cells(vlm, base, source, cells, m, batch_size=batch_size, progress=progress,
                       desc=f"trace {tower}", fast_path=fast_path).numpy()
    comps = [c for _, c in specs]
    n_layers = vlm.adapter.n_layers[tower]
    shape = [len(comps), n_layers] + ([vlm.adapter.n_heads[tower]] if heads else []) + [len(positions)]
    grid = np.full(shape, np.nan)
    for (comp, layer, head, k), v in zip(coords, values):
        index = (comps.index(comp), layer) + ((head,) if heads else ()) + (k,)
        grid[index] = v
    dims = ["component", "layer"] + (["head"] if heads else []) + ["position"]
    coords_out = {"component": comps, "layer": list(range(n_layers)), "position": list(range(len(positions))),
                  "token": ("position", labels), "group": ("position", group_of)}
    if heads:
        coords_out["head"] = list(range(vlm.adapter.n_heads[tower]))
    attrs = {"model": vlm.name, "tower": tower, "metric": metric, "answer": answer or clean.answer,
             "other": other or "", "direction": direction, "window": window,
             "clean_score": clean_score, "corrupt_score": corrupt_score,
             "corruption": corrupt.meta.get("corruption", ""), "question": clean.question,
             "positions": [list(p) for p in positions]}
    return Trace(xr.DataArray(grid, dims=dims, coords=coords_out, attrs=attrs, name="effect"))
