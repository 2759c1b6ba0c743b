"""Pictures of traces: ROME-style heatmaps, head maps, and effects overlaid on the image."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..example import Example
from ..figures import pyplot, save_figure, signed_limits
from ..prompts import token_label

if TYPE_CHECKING:  # only for annotations: Trace.plot imports this module
    from .results import Trace


def _collapse_image(trace: Trace, values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Average the image-token columns into one column labelled 'image tokens (mean of N)'.

    Image tokens of the ``object`` group keep their own columns, marked '(object)'.
    """
    groups = list(trace.data.coords["group"].values)
    labels = [token_label(t) for t in trace.data.coords["token"].values]
    labels = [f"{t} (object)" if g == "object" else t for t, g in zip(labels, groups)]
    image_cols = [k for k, g in enumerate(groups) if g == "image"]  # object tokens stay separate
    if len(image_cols) < 2:
        return values, labels
    keep, names = [], []
    for k in range(len(labels)):
        if k == image_cols[0]:
            keep.append(np.nanmean(values[..., image_cols], axis=-1))
            names.append(f"image tokens (mean of {len(image_cols)})")
        elif k not in image_cols:
            keep.append(values[..., k])
            names.append(labels[k])
    return np.stack(keep, axis=-1), names


def corruption_text(corruption) -> str:
    """A short phrase for what a trace's corruption did (its record, or the text a saved trace keeps)."""
    if isinstance(corruption, dict):
        kind = corruption.get("kind", "corruption")
        if kind == "noise":
            return (f"noise ({corruption.get('scale_spec', corruption.get('scale'))}) on the {corruption.get('tokens')} "
                    f"{corruption.get('place')}")
        return " ".join(str(corruption.get(k)) for k in ("kind", "spec", "description") if corruption.get(k)) or kind
    return str(corruption or "the corrupted input")[:80]


def plot_trace(trace: Trace, path: "str | Path", collapse_image: bool = True, normalise: bool = True) -> Path:
    """One heatmap per component: layers (rows) x token positions (columns), ROME style.

    Token labels are readable text; image tokens collapse into one labelled column (the object's stay apart); the
    colour scale of each component is centred at zero, so effects of either sign read the same way.
    """
    plt = pyplot()
    data = trace.rr() if normalise else trace.data
    comps = list(data.coords["component"].values)
    fig, axes = plt.subplots(len(comps), 1, figsize=(min(18, 2.5 + 0.3 * data.sizes["position"]), 1.6 + 1.8 * len(comps)),
                             squeeze=False)
    for ax, comp in zip(axes[:, 0], comps):
        values = data.sel(component=comp).values  # (layer, position)
        labels = [token_label(t) for t in data.coords["token"].values]
        if collapse_image:
            values, labels = _collapse_image(trace, values)
        low, high = signed_limits(values)
        im = ax.imshow(values, aspect="auto", cmap="RdBu_r", vmin=low, vmax=high, origin="lower")
        ax.set_ylabel(f"{trace.attrs['tower']}.{comp}\nlayer")
        ax.set_yticks(range(values.shape[0]))
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01, label="recovery rate" if normalise else trace.attrs["metric"])
    a = trace.attrs
    restored = "restoring" if a.get("direction", "restore") == "restore" else "corrupting"
    axes[0, 0].set_title(f"{a['question']} -> {a['answer']!r}. Corrupted: {corruption_text(a.get('corruption'))} "
                         f"({a['metric']} {a['clean_score']:.3f} clean, {a['corrupt_score']:.3f} corrupted).\n"
                         f"Each cell: {restored} one site at one layer and one token "
                         f"(window {a.get('window', 1)}).", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, Path(path))


def plot_heads(trace: Trace, path: "str | Path", position: int = 0, normalise: bool = True) -> Path:
    """Layer x head heatmap of a head trace at one token-axis entry."""
    plt = pyplot()
    data = (trace.rr() if normalise else trace.data).isel(position=position)
    comps = list(data.coords["component"].values)
    fig, axes = plt.subplots(1, len(comps), figsize=(3.5 * len(comps), 3), squeeze=False)
    for ax, comp in zip(axes[0], comps):
        im = ax.imshow(data.sel(component=comp).values, aspect="auto", cmap="RdBu_r", origin="lower")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(f"{trace.attrs['tower']}.{comp}", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.05)
    return save_figure(fig, Path(path))


def strongest_image_site(trace: Trace, component: str | None = None, layer: int | None = None) -> tuple[str, int]:
    """The component and layer (among those not given) where restoring one image token recovers the most."""
    every = trace.rr()
    image_cols = [k for k, g in enumerate(every.coords["group"].values) if g in ("image", "object")]
    comps = [component] if component is not None else [str(c) for c in every.coords["component"].values]
    layers = [layer] if layer is not None else list(range(every.sizes["layer"]))
    return max(((c, int(j)) for c in comps for j in layers),
               key=lambda cl: np.nanmax(every.sel(component=cl[0]).values[cl[1], image_cols]))


def plot_image_effects(trace: Trace, example: Example, path: "str | Path", component: str | None = None,
                       layer: int | None = None, tower: str = "lm") -> Path:
    """Effects of restoring single image tokens drawn over the image on the patch grid.

    Without ``component`` and ``layer``: the site and layer where restoring one image token matters most.
    """
    plt = pyplot()
    component, layer = strongest_image_site(trace, component, layer)
    values = trace.rr().sel(component=component).values[layer]
    positions = [p[0] for p in trace.attrs["positions"]]
    heat = np.full(example.image_hw, np.nan)
    for k, pos in enumerate(positions):
        box = example.boxes.get(tower, {}).get(pos)
        if box is None or len(trace.attrs["positions"][k]) != 1:
            continue
        y0, x0, y1, x1 = (int(round(v)) for v in box)
        heat[max(0, y0):y1, max(0, x0):x1] = values[k]
    low, high = signed_limits(heat)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.imshow(np.asarray(example.image))
    im = ax.imshow(heat, alpha=0.6, cmap="RdBu_r", vmin=low, vmax=high)
    fig.colorbar(im, ax=ax, fraction=0.046, label="recovery rate")
    ax.set_title(f"Restoring one image token at {tower}.{component} layer {layer}\n"
                 f"after {corruption_text(trace.attrs.get('corruption'))}", fontsize=8)
    ax.axis("off")
    return save_figure(fig, Path(path))
