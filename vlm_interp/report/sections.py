"""Sections of a report, read off a result's labels (duck-typed): traces, head traces, comparisons, and any
other labelled result (logit lens, knockout, attention maps, dataset means) by its dimensions.

A result is anything with ``data`` (an xarray ``DataArray``) and ``attrs``; a trace also has ``rr()``.
``boxes`` maps a tower to ``{position: (y0, x0, y1, x1)}`` in image pixels, as ``Example.boxes`` does.
"""

from __future__ import annotations

import itertools

import numpy as np

from ..prompts import token_label
from . import charts
from .page import Section, esc, facts, table

ALWAYS_SHOWN = ("question", "answer", "model", "metric", "clean_score", "corrupt_score", "corruption")


def _label(key: str) -> str:
    return {"clean_score": "clean score", "corrupt_score": "corrupted score", "corruption": "corrupted (how)",
            "checkpoint": "checkpoint"}.get(key, key.replace("_", " "))


def _fmt(value):
    """A setting as text: floats to 4 places, a dict (a corruption's record) as ``kind: key=value, ...`` with long
    lists counted rather than written out."""
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict):
        parts = [f"{k}={_fmt(v)}" if not isinstance(v, (list, tuple)) or len(v) <= 6 else f"{k}=({len(v)} items)"
                 for k, v in value.items() if k != "kind"]
        return (f"{value['kind']}: " if "kind" in value else "") + ", ".join(parts)
    return value


def summary(attrs: dict, extra: dict | None = None) -> str:
    """The question, answer, scores and corruption (and the other scalar settings) of a result."""
    items = {_label(k): _fmt(attrs[k]) for k in ALWAYS_SHOWN if k in attrs}
    for k, v in attrs.items():
        if k not in ALWAYS_SHOWN and k != "causal" and isinstance(v, (str, int, float)) and not isinstance(v, bool) \
                and v != "":
            items[_label(k)] = _fmt(v)
    if "clean_score" in attrs and "corrupt_score" in attrs:
        items["total effect"] = f"{attrs['clean_score'] - attrs['corrupt_score']:.4f}"
    items.update(extra or {})
    return facts(items)


def _token_axis(data, attrs: dict) -> tuple[list[str], list[str], list[int | None]]:
    """Labels, groups and (single) sequence positions of a result's token axis."""
    n = data.sizes["position"]
    tokens = [token_label(t) for t in data.coords["token"].values] if "token" in data.coords else \
        [str(p) for p in data.coords["position"].values]
    groups = [str(g) for g in data.coords["group"].values] if "group" in data.coords else [""] * n
    if "positions" in attrs:  # a trace's token axis: each entry lists the positions it restores
        seq = [p[0] if len(p) == 1 else None for p in attrs["positions"]]
    else:
        seq = [int(p) for p in data.coords["position"].values]
    return tokens, groups, seq


def _image_columns(seq, boxes: dict | None) -> list[int]:
    if not boxes:
        return []
    return [k for k, p in enumerate(seq) if p is not None and p in boxes]


def _overlay(image, boxes: dict, seq, tokens, maps: dict, title: str, value_name: str, steps=None, slider="layer"):
    cols = _image_columns(seq, boxes)
    return charts.image_overlay(image, [boxes[seq[k]] for k in cols], {n: m[:, cols] for n, m in maps.items()},
                                title, value_name, slider=slider, steps=steps, tokens=[tokens[k] for k in cols])


def trace_sections(trace, image=None, boxes: dict | None = None, title: str = "Causal trace") -> list[Section]:
    """A trace's summary, one token heatmap per component (or head maps), and the effects over the image."""
    data, attrs = trace.data, trace.attrs
    tower = attrs.get("tower", "lm")
    normalised = hasattr(trace, "rr") and attrs.get("clean_score") != attrs.get("corrupt_score") \
        and attrs.get("values") != "recovery rate"  # a dataset's mean trace holds recovery rates already
    values = trace.rr() if normalised else data
    value_name = "recovery rate" if normalised or attrs.get("values") == "recovery rate" else \
        attrs.get("metric", "value")
    tower_boxes = (boxes or {}).get(tower) if image is not None else None
    window = int(attrs.get("window", 1))
    head = Section(title).add(summary(attrs))
    sections = [head]
    if "head" in data.dims:
        maps = Section("Head maps (layer x head)")
        for comp in values.coords["component"].values:
            grid = values.sel(component=comp).transpose("layer", "head", "position").values
            pages = {f"{k}: {t}": grid[:, :, k] for k, t in enumerate(data.coords["token"].values)}
            maps.add(charts.layer_grid(grid[:, :, 0], list(values.coords["head"].values),
                                       f"{tower}.{comp}: {value_name} per head", value_name, pages=pages,
                                       site=f"{tower}.{comp}.LAYER.HEAD"))
        return sections + [maps]
    tokens, groups, seq = _token_axis(data, attrs)
    heat = Section("Per component: layers x tokens")
    heat.add("<p class='note'>Hover a cell for its token, layer, site and value. Image tokens are collapsed into "
             "one column (their mean); the 'all tokens' button expands them.</p>")
    comps = [str(c) for c in values.coords["component"].values]
    for comp in comps:
        grid = values.sel(component=comp).transpose("layer", "position").values
        raw = data.sel(component=comp).transpose("layer", "position").values if normalised else None
        layers = [int(l) for l in values.coords["layer"].values]
        heat.add(charts.token_heatmap(grid, tokens, groups, f"{tower}.{comp}.", f"{tower}.{comp}: {value_name}",
                                      value_name, raw=raw, raw_name=attrs.get("metric", "value"), layers=layers,
                                      site_suffix=f" (window {window})" if window > 1 else ""))
    sections.append(heat)
    if image is not None and tower_boxes and not _image_columns(seq, tower_boxes):
        heat.add("<p class='note'>No image overlay: no entry of this trace's token axis is a single image token "
                 "(trace with tokens='each' to see effects per patch).</p>")
    if tower_boxes and _image_columns(seq, tower_boxes):
        over = Section("Effects over the image")
        over.add("<p class='note'>Each patch shows the effect of restoring its image token alone; the slider moves "
                 "through the layers, the buttons through the components.</p>")
        maps = {f"{tower}.{c}": values.sel(component=c).transpose("layer", "position").values for c in comps}
        over.add(_overlay(image, tower_boxes, seq, tokens, maps, f"{value_name} of single image tokens", value_name,
                          steps=[int(l) for l in values.coords["layer"].values]))
        sections.append(over)
    return sections


def labelled_sections(result, title: str, image=None, boxes: dict | None = None) -> list[Section]:
    """Any labelled result by its dimensions: ``layer`` x ``position`` slices become token heatmaps (and
    image overlays where positions cover the image); ``layer`` x anything else becomes a layer grid."""
    data, attrs = result.data, result.attrs
    section = Section(title).add(summary(attrs))
    if "causal" in attrs:
        section.add(f"<p class='note'>{esc(attrs['causal'])}</p>")
    tower = attrs.get("keys_tower", attrs.get("tower", "lm"))
    name = str(data.name or "value")
    if "layer" in data.dims and "position" in data.dims:
        tokens, groups, seq = _token_axis(data, attrs)
        per_head = "head" in data.dims
        rest = [d for d in data.dims if d not in ("layer", "position", "head")]
        for combo in itertools.product(*[list(data.coords[d].values) for d in rest]):
            where = dict(zip(rest, combo))
            part = data.sel(where) if where else data
            label = ", ".join(f"{d} {v}" for d, v in where.items())
            grid = (part.mean("head") if per_head else part).transpose("layer", "position").values
            layers = [int(l) for l in data.coords["layer"].values]
            site = f"{tower}.{where.get('component', attrs.get('component', ''))}.".replace("..", ".")
            tops = attrs.get("top_tokens", {}).get(str(where.get("component", ""))) \
                if isinstance(attrs.get("top_tokens"), dict) else None  # the logit lens's top tokens per cell
            notes = [[" | ".join(map(str, cell[:3])) for cell in row] for row in tops] if tops else None
            section.add(charts.token_heatmap(grid, tokens, groups, site, f"{title}: {label or name}"
                                             + (" (mean of heads)" if per_head else ""), name, layers=layers,
                                             notes=notes, notes_name="top tokens"))
            tower_boxes = (boxes or {}).get(tower) if image is not None else None
            if tower_boxes and _image_columns(seq, tower_boxes):
                maps = {"mean of heads": grid} if per_head else {label or name: grid}
                if per_head:
                    maps.update({f"head {h}": part.sel(head=h).transpose("layer", "position").values
                                 for h in data.coords["head"].values})
                section.add(_overlay(image, tower_boxes, seq, tokens, maps, f"{title} over the image: {label or name}",
                                     name, steps=layers))
    elif "layer" in data.dims and len(data.dims) >= 2:
        rest = [d for d in data.dims if d != "layer"]
        across, pages_dim = rest[0], rest[1] if len(rest) > 1 else None
        grid = data.transpose("layer", *rest).values
        pages = None
        if pages_dim is not None:
            grid = grid.reshape(grid.shape[0], grid.shape[1], -1)
            labels = [str(v) for v in data.coords[pages_dim].values]
            pages = {f"{pages_dim} {v}": grid[:, :, k] for k, v in enumerate(labels)}
            grid = grid[:, :, 0]
        section.add(charts.layer_grid(grid, [str(v) for v in data.coords[across].values], title, name,
                                      xlabel=across, layers=[int(l) for l in data.coords["layer"].values],
                                      pages=pages, page_name=pages_dim or ""))
    else:
        raise ValueError(f"{title}: a result with dimensions {list(data.dims)} has no chart in the report; it needs a "
                         "'layer' dimension (with 'position', or another one such as 'head' or 'edge')")
    return [section]


def _interval(row: dict, metric: str) -> str:
    return f"{row[metric]:.3f} [{row[f'{metric}_lo']:.3f}, {row[f'{metric}_hi']:.3f}]"


def _finite(value) -> bool:
    try:
        return bool(np.isfinite(float(value)))
    except (TypeError, ValueError):
        return False


def long_comparison_sections(table_rows: list[dict], test_rows: list[dict], title: str) -> list[Section]:
    """A benchmark suite's long table (benchmark, split, source, metric, value, lo, hi, n per system): the table,
    one grouped plot per benchmark and metric (logits where there are, as the suite's own plot), the tests."""
    rows = [{"system": r["system"], "benchmark": r["benchmark"], "split": r["split"], "source": r["source"],
             "metric": r["metric"],
             "value [95% CI]": (f"{r['value']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]" if _finite(r.get("lo"))
                                else f"{r['value']:.3f}") if _finite(r["value"]) else "",
             "n": r.get("n")} for r in table_rows]
    main = Section(title).add(table(rows, caption="every benchmark, split, source and metric (bootstrap intervals)"))
    plots = Section("Grouped plots")
    for part, metric in dict.fromkeys((r["benchmark"], r["metric"]) for r in table_rows):
        mine = [r for r in table_rows if r["benchmark"] == part and r["metric"] == metric and _finite(r["value"])]
        source = "logits" if any(r["source"] == "logits" for r in mine) else "generation"
        mine = [r for r in mine if r["source"] == source]
        if mine:
            plots.add(charts.grouped_bars(mine, "split", "system", "value", f"{part}: {metric} ({source})", lo="lo",
                                          hi="hi", unit_range=all(0 <= r["value"] <= 1 for r in mine)))
    tests = Section("Paired tests (exact McNemar, same questions)")
    tests.add(table(test_rows, digits=4) if test_rows else
              "<p class='note'>One system only: there is no pair to test.</p>")
    return [main, plots, tests]


def comparison_sections(table_rows: list[dict], test_rows: list[dict], title: str = "Comparison") -> list[Section]:
    """The comparison's table with 95% intervals, its grouped plot per answer source, and the paired tests
    (a benchmark suite's long table, with ``benchmark``, ``metric`` and ``value`` columns, in its own layout)."""
    if table_rows and {"benchmark", "metric", "value"} <= set(table_rows[0]):
        return long_comparison_sections(table_rows, test_rows, title)
    rows = [{"system": r["system"], "split": r["split"], "source": r["source"],
             "accuracy [95% CI]": _interval(r, "accuracy"),
             **({"F1 [95% CI]": _interval(r, "f1")} if "f1_lo" in r else {"F1": r.get("f1")}),
             "yes ratio": r.get("yes_ratio"), "n": int(r["n"])} for r in table_rows]
    main = Section(title).add(table(rows, caption="POPE per system, split and answer source (bootstrap intervals)"))
    plots = Section("Grouped plot")
    for source in dict.fromkeys(r["source"] for r in table_rows):
        mine = [r for r in table_rows if r["source"] == source]
        plots.add(charts.grouped_bars(mine, "split", "system", "accuracy", f"POPE accuracy ({source})"))
    tests = Section("Paired tests (exact McNemar, same questions)")
    tests.add(table(test_rows, digits=4) if test_rows else
              "<p class='note'>One system only: there is no pair to test.</p>")
    return [main, plots, tests]
