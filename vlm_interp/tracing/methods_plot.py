"""Pictures of the methods beyond patching: knockout curves, logit-lens grids and image maps, attention maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..example import Example
from ..figures import pyplot, save_figure
from ..prompts import token_label


def _save(fig, path) -> Path:
    plt = pyplot()
    try:
        return save_figure(fig, Path(path))
    finally:
        plt.close(fig)


def plot_knockout(result, path, kind: str = "relative") -> Path:
    """One line per edge over the layer windows: the answer's relative change (or change) with the edge cut."""
    plt = pyplot()
    data = result.relative() if kind == "relative" else result.effect()
    if "head" in data.dims:
        data = data.mean("head")
    fig, ax = plt.subplots(figsize=(5, 3))
    layers = list(data.coords["layer"].values)
    for edge in data.coords["edge"].values:
        values = data.sel(edge=edge).values * (100 if kind == "relative" else 1)
        ax.plot(layers, values, marker="o", label=str(edge))
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.set_xticks(layers)
    a = result.attrs
    ax.set_xlabel(f"layer (window {a['window']})")
    ax.set_ylabel(f"{'relative change (%)' if kind == 'relative' else 'change'} in {a['metric']}")
    ax.set_title(f"knockout {a['tower']}.{a['component']}: {a['question']} -> {a['answer']!r} "
                 f"(uncut {a['clean_score']:.3f})", fontsize=8)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_lens(lens, path, component: str = "hidden", quantity: str = "prob") -> Path:
    """Layers x positions heatmap of the answer's ``quantity`` with each cell's top token written in it."""
    plt = pyplot()
    data = lens.data.sel(component=component, quantity=quantity)
    n_layers, n_pos = data.shape
    fig, ax = plt.subplots(figsize=(min(24, 2 + 0.45 * n_pos), 1 + 0.45 * n_layers))
    im = ax.imshow(data.values, aspect="auto", origin="lower", cmap="viridis")
    tops = lens.attrs["top_tokens"][component]
    for layer in range(n_layers):
        for k in range(n_pos):
            ax.text(k, layer, token_label(tops[layer][k][0])[:6], ha="center", va="center", fontsize=5, color="white")
    ax.set_xticks(range(n_pos), [token_label(t) for t in data.coords["token"].values], rotation=90, fontsize=6)
    ax.set_yticks(range(n_layers))
    ax.set_ylabel(f"lm.{component} layer")
    fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01, label=f"{quantity} of {lens.attrs['answer']!r}")
    ax.set_title(f"logit lens: {lens.attrs['question']} (top token in each cell)", fontsize=8)
    return _save(fig, path)


def plot_lens_image(lens, example: Example, path, component: str = "hidden", layer: int | None = None,
                    show: str = "top") -> Path:
    """The image tokens' lens readings on the patch grid of one layer (default: each layer in a panel)."""
    plt = pyplot()
    if show not in ("top", "prob"):
        raise ValueError(f"show must be 'top' or 'prob', got {show!r}")
    boxes = example.boxes.get(lens.attrs["tower"], {})
    positions = [int(p) for p in lens.data.coords["position"].values]
    on_image = [(k, p) for k, p in enumerate(positions) if p in boxes]
    if not on_image:
        raise ValueError(f"no position read by this lens covers an image patch (the {lens.attrs['tower']} tower's "
                         "image tokens may be Q-Former queries, which cover no patch; else read tokens='image')")
    layers = list(range(lens.data.sizes["layer"])) if layer is None else [layer]
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 3.4), squeeze=False)
    probs = lens.data.sel(component=component, quantity="prob").values
    tops = lens.attrs["top_tokens"][component]
    for ax, l in zip(axes[0], layers):
        ax.imshow(np.asarray(example.image), alpha=0.5 if show == "top" else 1.0)
        if show == "prob":
            heat = np.zeros(example.image_hw)
            for k, p in on_image:
                y0, x0, y1, x1 = (int(round(v)) for v in boxes[p])
                heat[max(0, y0):y1, max(0, x0):x1] = probs[l, k]
            ax.imshow(heat, alpha=0.6, cmap="magma")
        else:
            for k, p in on_image:
                y0, x0, y1, x1 = boxes[p]
                ax.text((x0 + x1) / 2, (y0 + y1) / 2, token_label(tops[l][k][0])[:5], ha="center", va="center",
                        fontsize=4, color="black")
        ax.set_title(f"lm.{component} layer {l}", fontsize=8)
        ax.axis("off")
    what = "top token" if show == "top" else f"P({lens.attrs['answer']!r})"
    fig.suptitle(f"logit lens over the image tokens: {what} per patch", fontsize=8)
    return _save(fig, path)


def plot_attention(maps, example: Example, path, layer: int | None = None, knockout=None) -> Path:
    """Head-averaged attention per layer over the image, rollout, one layer's heads, and knockout effects if given."""
    plt = pyplot()
    layers = list(maps.data.coords["layer"].values)
    layer = layers[-1] if layer is None else layer
    mean = maps.mean_heads()
    heads = list(maps.data.coords["head"].values)
    panels = [(f"layer {l}, heads averaged", mean.sel(layer=l)) for l in layers]
    if "rollout" in maps.attrs:
        panels.append(("rollout (all layers)", maps.rollout().isel(layer=-1)))
    panels += [(f"layer {layer}, head {h}", maps.data.sel(layer=layer, head=h)) for h in heads]
    n = len(panels) + (knockout is not None)
    cols = min(6, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax, (title, values) in zip(flat, panels):
        ax.imshow(np.asarray(example.image))
        ax.imshow(maps.on_image(values, example), alpha=0.6, cmap="inferno")
        ax.set_title(title, fontsize=7)
        ax.axis("off")
    if knockout is not None:
        ax = flat[len(panels)]
        rel = knockout.relative()
        if "head" in rel.dims:
            rel = rel.mean("head")
        for edge in rel.coords["edge"].values:
            ax.plot(list(rel.coords["layer"].values), 100 * rel.sel(edge=edge).values, marker="o", label=str(edge))
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_xticks(list(rel.coords["layer"].values))
        ax.set_xlabel("layer", fontsize=6)
        ax.set_title("knockout (causal): relative change %", fontsize=7)
        ax.legend(fontsize=5)
    for ax in flat[n:]:
        ax.axis("off")
    a = maps.attrs
    fig.suptitle(f"{a['tower']}.{a['component']} attention from {a['query']!r}: {a['question']}\n{a['causal']}",
                 fontsize=7)
    return _save(fig, path)
