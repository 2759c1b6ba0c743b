"""How well a gradient estimate of a tracing grid ranks its cells like exact patching.

:func:`agreement` compares an estimate (:mod:`.attribution`) with exact patching per
component: rank and linear correlation and the overlap of the top cells. The exact values
come from a ``trace`` of the same grid, or, on a budget, from patching only a seeded sample
of cells exactly (the same engine as ``trace``, on the estimate's own grid plan).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..example import Example
from .grid import exact_values, plan_of
from .results import Trace

LAYOUT_ATTRS = ("tower", "metric", "answer", "other", "direction", "window", "positions")


def _cells_frame(tr: Trace) -> pd.DataFrame:
    """One row per non-NaN cell of a trace: component, layer, head, position, value."""
    data = tr.data
    dims = [d for d in ("component", "layer", "head", "position") if d in data.dims]
    frame = data.transpose(*dims).to_dataframe(name="value").reset_index()[dims + ["value"]]
    return frame.dropna(subset=["value"]).reset_index(drop=True)


def _check_comparable(estimate: Trace, exact: Trace) -> None:
    """Both traces must describe the same grid (dims, labels, positions, metric, direction)."""
    problems = []
    if tuple(estimate.data.dims) != tuple(exact.data.dims):
        problems.append(f"dims {tuple(estimate.data.dims)} vs {tuple(exact.data.dims)}")
    else:
        for dim in estimate.data.dims:
            a, b = estimate.data.coords[dim].values, exact.data.coords[dim].values
            if len(a) != len(b) or not np.array_equal(a, b):
                problems.append(f"{dim} labels {list(a)[:6]} vs {list(b)[:6]}")
    for key in LAYOUT_ATTRS:
        if estimate.attrs.get(key) != exact.attrs.get(key):
            problems.append(f"{key} {estimate.attrs.get(key)!r:.60} vs {exact.attrs.get(key)!r:.60}")
    if problems:
        raise ValueError("the estimate and the exact trace describe different grids: " + "; ".join(problems)
                         + ". Compare traces made with the same components, tokens, window, metric and direction.")


def _spearman(a: pd.Series, b: pd.Series) -> float:
    """Spearman's rank correlation: Pearson correlation of the ranks (ties share their mean rank)."""
    return float(a.rank().corr(b.rank()))


def _top_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Share of the ``k`` largest entries of ``a`` that are also among the ``k`` largest of ``b``."""
    if k < 1:
        return float("nan")
    top_a = set(np.argsort(-a, kind="stable")[:k].tolist())
    top_b = set(np.argsort(-b, kind="stable")[:k].tolist())
    return len(top_a & top_b) / k


def _sample(frame: pd.DataFrame, sample: int | None, seed: int) -> pd.DataFrame:
    """At most ``sample`` cells per component, drawn with a seeded generator (all when None)."""
    if sample is None:
        return frame
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 2:
        raise ValueError(f"sample must be an integer of at least 2 cells per component, got {sample!r}")
    rng = np.random.default_rng(seed)
    parts = []
    for _, part in frame.groupby("component", sort=False):
        pick = rng.choice(len(part), size=min(sample, len(part)), replace=False)
        parts.append(part.iloc[np.sort(pick)])
    return pd.concat(parts).reset_index(drop=True)


def _exact_on(vlm, clean: Example, corrupt: Example, estimate: Trace, cells: pd.DataFrame,
              batch_size: int, progress: bool) -> np.ndarray:
    """Exact patched metric values of the chosen cells only (the same engine as ``trace``)."""
    plan = plan_of(vlm, estimate, clean, corrupt)
    heads = "head" in cells.columns
    keys = [((str(row.component), int(row.layer), int(row.head) if heads else None), int(row.position))
            for row in cells.itertuples(index=False)]
    return exact_values(vlm, plan, keys, batch_size=batch_size, progress=progress, desc="exact patching (sample)")


def agreement_cells(estimate: Trace, exact: Trace | None = None, *, sample: int | None = None, seed: int = 0,
                    vlm=None, clean: Example | None = None, corrupt: Example | None = None, batch_size: int = 32,
                    progress: bool = False) -> pd.DataFrame:
    """The compared cells of :func:`agreement`: component, layer, [head,] position, estimate, exact.

    With ``exact`` (a ``trace`` of the same grid) all cells, or a seeded ``sample`` of cells
    per component. Without it, pass ``vlm``, ``clean``, ``corrupt`` and ``sample``: only the
    sampled cells are patched exactly (the engine of ``trace``), a check on a budget.
    """
    frame = _cells_frame(estimate)
    if exact is not None:
        _check_comparable(estimate, exact)
        cells = _sample(frame, sample, seed)
        keys = [c for c in cells.columns if c != "value"]
        truth = cells[keys].merge(_cells_frame(exact), how="left", on=keys)
        if truth["value"].isna().any():
            raise ValueError("the exact trace has no value at some cells the estimate has; "
                             "they describe different grids")
        cells = cells.assign(exact=truth["value"].to_numpy())
    else:
        if vlm is None or clean is None or corrupt is None or sample is None:
            raise ValueError("without an exact trace, pass vlm=, clean=, corrupt= and sample= (cells per component) "
                             "so that the sampled cells can be patched exactly")
        cells = _sample(frame, sample, seed)
        cells = cells.assign(exact=_exact_on(vlm, clean, corrupt, estimate, cells, batch_size, progress))
    return cells.rename(columns={"value": "estimate"})


def agreement(estimate: Trace, exact: Trace | None = None, *, top_k: int = 10, sample: int | None = None,
              seed: int = 0, vlm=None, clean: Example | None = None, corrupt: Example | None = None,
              batch_size: int = 32, progress: bool = False) -> pd.DataFrame:
    """Per component: Spearman and Pearson correlation and top-k overlap of an estimate with exact patching.

    Cells are chosen as in :func:`agreement_cells` (all, or a seeded ``sample`` per component,
    patched exactly on their own when no ``exact`` trace is given). Top-k overlap ranks cells
    by the size of their effect (|value - base score|). The last row, ``all``, pools every
    component.
    """
    cells = agreement_cells(estimate, exact, sample=sample, seed=seed, vlm=vlm, clean=clean, corrupt=corrupt,
                            batch_size=batch_size, progress=progress)
    attrs = estimate.attrs
    base = attrs["corrupt_score"] if attrs["direction"] == "restore" else attrs["clean_score"]
    rows = [_agreement_row(str(comp), part, base, top_k) for comp, part in cells.groupby("component", sort=False)]
    rows.append(_agreement_row("all", cells, base, top_k))
    return pd.DataFrame(rows)


def _agreement_row(name: str, cells: pd.DataFrame, base: float, top_k: int) -> dict:
    """One row of :func:`agreement`: correlations and top-k overlap of one set of cells."""
    est, ex = cells["estimate"].astype(float), cells["exact"].astype(float)
    k = min(top_k, len(cells))
    return {"component": name, "cells": len(cells), "spearman": _spearman(est, ex), "pearson": float(est.corr(ex)),
            "top_k": k, "top_k_overlap": _top_overlap(np.abs(est.to_numpy() - base), np.abs(ex.to_numpy() - base), k)}
