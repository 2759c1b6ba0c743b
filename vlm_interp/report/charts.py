"""Interactive charts of the report (plotly figures): token heatmaps, image overlays, head maps, grouped bars.

Each function takes plain arrays and labels, so every kind of result (traces, lens, knockout,
attention maps, comparisons) draws through the same few charts. Interaction is plotly's own:
hover labels, buttons (``updatemenus``) and sliders that restyle traces; no JavaScript of ours.
"""

from __future__ import annotations

import base64
import io
from typing import Sequence

import numpy as np

Box = tuple[float, float, float, float]  # (y0, x0, y1, x1) in image pixels
COLORSCALE = "Viridis"


def _go():
    import plotly.graph_objects as go

    return go


def _round(values: np.ndarray, digits: int = 5) -> np.ndarray:
    """Values for the page: rounded, as float32 (plotly writes them as a typed array; NaN stays NaN)."""
    return np.round(np.asarray(values, dtype=float), digits).astype(np.float32)


def collapse_columns(values: np.ndarray, groups: Sequence[str], collapse: Sequence[str] = ("image",)) -> tuple:
    """Average the columns of ``groups`` in ``collapse`` into one column placed where the first of them was.

    Returns ``(values, kept)``: ``kept[j]`` is the list of original columns the ``j``-th column stands for.
    """
    members = [k for k, g in enumerate(groups) if g in collapse]
    if len(members) < 2:
        return values, [[k] for k in range(len(groups))]
    kept, cols = [], []
    for k in range(len(groups)):
        if k == members[0]:
            kept.append(members)
            with np.errstate(all="ignore"):
                column = np.nanmean(values[:, members], axis=1) if np.isfinite(values[:, members]).any() else \
                    np.full(values.shape[0], np.nan)
            cols.append(column)
        elif k not in members:
            kept.append([k])
            cols.append(values[:, k])
    return np.stack(cols, axis=1), kept


def token_heatmap(values: np.ndarray, tokens: Sequence[str], groups: Sequence[str], site: str, title: str,
                  value_name: str = "value", raw: np.ndarray | None = None, raw_name: str = "",
                  layers: Sequence[int] | None = None, collapse: Sequence[str] = ("image",),
                  notes: Sequence[Sequence[str]] | None = None, notes_name: str = "", site_suffix: str = ""):
    """Layers (rows) x tokens (columns); image tokens collapsed into one column, a button expands them.

    Hovering a cell shows its token (``position: text``, the column's name), layer, site (``site`` followed by
    the layer and ``site_suffix``) and value; also ``raw`` (the metric before normalising) and ``notes[i][k]``
    (text per cell, such as the logit lens's top tokens) when given. Only those travel per cell, so a real
    model's trace stays small (numbers as typed arrays).
    """
    go = _go()
    values = np.asarray(values, dtype=float)
    layers = list(range(values.shape[0])) if layers is None else list(layers)
    labels = [f"{k}: {t} ({g})" if g in ("image", "object") else f"{k}: {t}"
              for k, (t, g) in enumerate(zip(tokens, groups))]
    fig = go.Figure()
    collapsed, kept = collapse_columns(values, groups, collapse)
    variants = [("all tokens", values, [[k] for k in range(values.shape[1])])]
    if len(kept) < values.shape[1]:
        variants.insert(0, ("image collapsed", collapsed, kept))
    for v, (name, grid, columns) in enumerate(variants):
        names = [labels[c[0]] if len(c) == 1 else f"<{groups[c[0]]}> x{len(c)}" for c in columns]
        hover = f"token %{{x}}<br>layer %{{y}}<br>site {site}%{{y}}{site_suffix}<br>{value_name} %{{z:.3f}}"
        extra = {}
        if raw is not None:
            with np.errstate(all="ignore"):
                extra["customdata"] = _round(np.stack([np.nanmean(raw[:, c], axis=1) for c in columns], axis=1))
            hover += f"<br>{raw_name} %{{customdata:.4f}}"
        if notes is not None:
            extra["text"] = [[notes[i][c[0]] if len(c) == 1 else "(per token)" for c in columns]
                             for i in range(len(layers))]
            hover += f"<br>{notes_name} %{{text}}"
        fig.add_trace(go.Heatmap(z=_round(grid), x=names, y=layers, hovertemplate=hover + "<extra></extra>",
                                 colorscale=COLORSCALE, colorbar={"title": value_name}, name=name, visible=v == 0,
                                 **extra))
    fig.update_layout(title=title, xaxis={"type": "category", "tickangle": -90, "automargin": True},
                      yaxis={"title": "layer", "dtick": 1}, height=260 + 22 * len(layers),
                      margin={"l": 60, "r": 20, "t": 60, "b": 40})
    if len(variants) > 1:
        buttons = [{"label": name, "method": "restyle", "args": [{"visible": [w == v for w in range(len(variants))]}]}
                   for v, (name, _, _) in enumerate(variants)]
        fig.update_layout(updatemenus=[{"type": "buttons", "direction": "right", "buttons": buttons,
                                        "x": 1, "xanchor": "right", "y": 1.12, "yanchor": "bottom"}])
    return fig


def image_uri(image) -> str:
    """A PIL image as a PNG data URI (inlined: the page needs no file beside it)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def patch_grid(boxes: Sequence[Box]) -> tuple[list[float], list[float], list[list[int | None]]]:
    """Cell edges (x, y) covering every box, and for each cell the index of the box that covers it (or None).

    A regular patch grid gives one cell per patch; overlapping boxes (tiles over a base view) are cut at
    every box edge, and the later box wins where boxes overlap.
    """
    xs = sorted({float(b[1]) for b in boxes} | {float(b[3]) for b in boxes})
    ys = sorted({float(b[0]) for b in boxes} | {float(b[2]) for b in boxes})
    owner: list[list[int | None]] = [[None] * (len(xs) - 1) for _ in range(len(ys) - 1)]
    for k, (y0, x0, y1, x1) in enumerate(boxes):
        for r in range(ys.index(float(y0)), ys.index(float(y1))):
            for c in range(xs.index(float(x0)), xs.index(float(x1))):
                owner[r][c] = k
    return xs, ys, owner


def _on_grid(values: np.ndarray, owner) -> list[list[float | None]]:
    return [[None if k is None or not np.isfinite(values[k]) else float(round(values[k], 5)) for k in row]
            for row in owner]


def image_overlay(image, boxes: Sequence[Box], maps: dict[str, np.ndarray], title: str, value_name: str = "value",
                  slider: str = "layer", steps: Sequence | None = None, tokens: Sequence[str] | None = None):
    """The image with per-patch values over it: a slider over ``steps`` (layers), a button per map (component).

    ``maps[name]`` is (steps x boxes). Moving the slider restyles every map's heatmap to that step;
    the buttons choose which map is shown.
    """
    go = _go()
    names = list(maps)
    first = next(iter(maps.values()))
    steps = list(range(first.shape[0])) if steps is None else list(steps)
    xs, ys, owner = patch_grid(boxes)
    lo = float(np.nanmin([np.nanmin(m) for m in maps.values()])) if any(np.isfinite(m).any() for m in maps.values()) \
        else 0.0
    hi = float(np.nanmax([np.nanmax(m) for m in maps.values()])) if any(np.isfinite(m).any() for m in maps.values()) \
        else 1.0
    start = int(np.nanargmax([np.nanmax(m[s]) if np.isfinite(m[s]).any() else -np.inf
                              for s in range(len(steps)) for m in maps.values()]) // len(maps)) \
        if any(np.isfinite(m).any() for m in maps.values()) else 0
    fig = go.Figure(go.Image(source=image_uri(image), hoverinfo="skip", name="image"))
    token_grid = None
    if tokens is not None:
        token_grid = [[("" if k is None else str(tokens[k])) for k in row] for row in owner]
    hover = ("x %{x:.0f}, y %{y:.0f}" + ("<br>token %{text}" if token_grid else "") +
             f"<br>{value_name} %{{z:.3f}}<extra>%{{fullData.name}}</extra>")
    for i, name in enumerate(names):
        fig.add_trace(go.Heatmap(z=_on_grid(maps[name][start], owner), x=xs, y=ys, text=token_grid, opacity=0.6,
                                 zmin=lo, zmax=hi, colorscale="Magma", hovertemplate=hover, name=name,
                                 visible=i == 0, colorbar={"title": value_name}))
    trace_ids = list(range(1, 1 + len(names)))
    fig.update_layout(
        title={"text": title, "y": 0.98, "yanchor": "top"}, height=600, width=560,
        margin={"l": 10, "r": 10, "t": 110, "b": 10},
        xaxis={"visible": False, "range": [0, image.width]},
        yaxis={"visible": False, "range": [image.height, 0], "scaleanchor": "x"},
        sliders=[{"active": start, "currentvalue": {"prefix": f"{slider} "}, "pad": {"t": 10},
                  "steps": [{"label": str(s), "method": "restyle",
                             "args": [{"z": [_on_grid(maps[n][k], owner) for n in names]}, trace_ids]}
                            for k, s in enumerate(steps)]}])
    if len(names) > 1:
        fig.update_layout(updatemenus=[{"type": "buttons", "direction": "right", "x": 0, "y": 1.02,
                                        "xanchor": "left", "yanchor": "bottom", "buttons": [
                                            {"label": n, "method": "restyle",
                                             "args": [{"visible": [True] + [m == n for m in names]}]}
                                            for n in names]}])
    return fig


def layer_grid(values: np.ndarray, columns: Sequence[str], title: str, value_name: str = "value",
               xlabel: str = "head", layers: Sequence[int] | None = None, pages: dict[str, np.ndarray] | None = None,
               page_name: str = "token", site: str = ""):
    """Layers x ``columns`` (heads, edges): one heatmap; ``pages`` adds a slider over further slices (tokens)."""
    go = _go()
    layers = list(range(values.shape[0])) if layers is None else list(layers)
    hover = (f"layer %{{y}}<br>{xlabel} %{{x}}" + (f"<br>site {site}" if site else "") +
             f"<br>{value_name} %{{z:.3f}}<extra></extra>")
    first = values if pages is None else next(iter(pages.values()))
    fig = go.Figure(go.Heatmap(z=_round(first), x=[str(c) for c in columns], y=layers, colorscale="RdBu_r",
                               zmid=0, hovertemplate=hover, colorbar={"title": value_name}))
    fig.update_layout(title=title, xaxis={"title": xlabel, "type": "category"}, yaxis={"title": "layer", "dtick": 1},
                      height=300 + 18 * len(layers), margin={"l": 60, "r": 20, "t": 60, "b": 40})
    if pages is not None and len(pages) > 1:
        fig.update_layout(sliders=[{"active": 0, "currentvalue": {"prefix": f"{page_name} "}, "pad": {"t": 40},
                                    "steps": [{"label": str(name), "method": "restyle",
                                               "args": [{"z": [_round(grid)]}, [0]]}
                                              for name, grid in pages.items()]}])
    return fig


def _gap(a, b) -> float:
    """``a - b`` for an error bar, 0 where either is missing (no interval)."""
    try:
        value = float(a) - float(b)
    except (TypeError, ValueError):
        return 0.0
    return abs(value) if np.isfinite(value) else 0.0


def grouped_bars(rows: Sequence[dict], group: str, series: str, metric: str, title: str, lo: str | None = None,
                 hi: str | None = None, unit_range: bool = True):
    """Bars of ``metric`` grouped by ``group`` (splits), one series per ``series`` (system), with intervals
    from ``lo`` and ``hi`` (default ``metric_lo`` and ``metric_hi``; a missing bound draws no bar)."""
    go = _go()
    lo, hi = lo or f"{metric}_lo", hi or f"{metric}_hi"
    fig = go.Figure()
    for name in dict.fromkeys(r[series] for r in rows):
        mine = [r for r in rows if r[series] == name]
        fig.add_trace(go.Bar(
            name=str(name), x=[str(r[group]) for r in mine], y=[r[metric] for r in mine],
            error_y={"type": "data", "symmetric": False, "array": [_gap(r.get(hi), r[metric]) for r in mine],
                     "arrayminus": [_gap(r[metric], r.get(lo)) for r in mine]},
            hovertemplate=f"{name}<br>%{{x}}<br>{metric} %{{y:.3f}}<extra></extra>"))
    axis = {"title": metric, **({"range": [0, 1]} if unit_range else {})}
    fig.update_layout(title=title, barmode="group", yaxis=axis,
                      height=420)
    return fig
