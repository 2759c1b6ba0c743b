"""Pictures of traces: ROME-style heatmaps, head maps, and effects overlaid on the image."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..example import Example
from ..figures import pyplot, save_figure

if TYPE_CHECKING:  # only for annotations: Trace.plot imports this module
    from .results import Trace


def _collapse_image(trace: Trace, values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Average the image-token columns into one column labelled '<image> x N'.

    Image tokens of the ``object`` group keep their own columns, marked '(object)'.
    """
    groups = list(trace.data.coords["group"].values)
    labels = list(trace.data.coords["token"].values)
    labels = [f"{t} (object)" if g == "object" else t for t, g in zip(labels, groups)]
    image_cols = [k for k, g in enumerate(groups) if g == "image"]  # object tokens stay separate
    if len(image_cols) < 2:
        return values, labels
    keep, names = [], []
    for k in range(len(labels)):
        if k == image_cols[0]:
            keep.append(np.nanmean(values[..., image_cols], axis=-1))
            names.append(f"<image> x{len(image_cols)}")
        elif k not in image_cols:
            keep.append(values[..., k])
            names.append(labels[k])
    return np.stack(keep, axis=-1), names


def plot_trace(trace: Trace, path: "str | Path", collapse_image: bool = True, normalise: bool = True) -> Path:
    """One heatmap per component: layers (rows) x token positions (columns), ROME style."""
    plt = pyplot()
    data = trace.rr() if normalise else trace.data
    comps = list(data.coords["component"].values)
    fig, axes = plt.subplots(len(comps), 1, figsize=(min(18, 2 + 0.28 * data.sizes["position"]), 1.2 + 1.6 * len(comps)),
                             squeeze=False)
    for ax, comp in zip(axes[:, 0], comps):
        values = data.sel(component=comp).values  # (layer, position)
        labels = list(data.coords["token"].values)
        if collapse_image:
            values, labels = _collapse_image(trace, values)
        im = ax.imshow(values, aspect="auto", cmap="Purples" if comp == "hidden" else "Greens" if comp == "mlp"
                       else "Reds", origin="lower")
        ax.set_ylabel(f"{comp}\nlayer")
        ax.set_yticks(range(values.shape[0]))
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
        fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01, label="recovery rate" if normalise else trace.attrs["metric"])
    a = trace.attrs
    axes[0, 0].set_title(f"{a['question']} -> {a['answer']!r}: {a['metric']} clean {a['clean_score']:.3f}, "
                         f"corrupted {a['corrupt_score']:.3f}", fontsize=8)
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


def plot_image_effects(trace: Trace, example: Example, path: "str | Path", component: str = "hidden",
                       layer: int | None = None, tower: str = "lm") -> Path:
    """Effects of restoring single image tokens drawn over the image on the patch grid."""
    plt = pyplot()
    data = trace.rr().sel(component=component)
    if layer is None:  # the layer where image tokens matter most
        image_cols = [k for k, g in enumerate(data.coords["group"].values) if g == "image"]
        layer = int(np.nanargmax(np.nanmax(data.values[:, image_cols], axis=1)))
    values = data.sel(layer=layer).values
    positions = [p[0] for p in trace.attrs["positions"]]
    heat = np.zeros(example.image_hw)
    for k, pos in enumerate(positions):
        box = example.boxes.get(tower, {}).get(pos)
        if box is None or len(trace.attrs["positions"][k]) != 1:
            continue
        y0, x0, y1, x1 = (int(round(v)) for v in box)
        heat[max(0, y0):y1, max(0, x0):x1] = values[k]
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(np.asarray(example.image))
    im = ax.imshow(heat, alpha=0.55, cmap="magma")
    fig.colorbar(im, ax=ax, fraction=0.046, label="recovery rate")
    ax.set_title(f"{tower}.{component} layer {layer}: restoring single image tokens", fontsize=8)
    ax.axis("off")
    return save_figure(fig, Path(path))
