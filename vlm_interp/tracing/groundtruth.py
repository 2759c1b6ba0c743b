"""Does tracing find the object? Per-patch effects scored against the shapes world's object masks."""

from __future__ import annotations

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..corruptions import noise
from .causal import trace
from .dataset import model_is_right


def auroc(scores, labels) -> float:
    """Area under the ROC curve: the chance a positive outscores a negative (ties count half)."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    pos, neg = scores[labels], scores[~labels]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def object_localisation(vlm, world, n: int = 100, seed: int = 20_001, component: str = "hidden",
                        scale: str = "3sd", noise_seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """AUROC, per LM layer, of single-image-token restoration effects against the queried object's patches.

    Existence questions about objects that are present (and answered right by the model, as ROME
    filters), noise on all image embeddings, restore one image token at a time.
    """
    from ..zoo.tasks import existence_question  # upward (zoo); listed in the layers contract's ignore_imports

    rng = np.random.default_rng(seed)
    rows, used, tried = [], 0, 0
    bar = tqdm(total=n, desc="object localisation", disable=not progress)
    while used < n and tried < 20 * n:
        scene = world.scene(int(rng.integers(1 << 31)))
        tried += 1
        target = scene.objects[int(rng.integers(len(scene.objects)))]
        if sum(o.shape == target.shape for o in scene.objects) != 1:
            continue
        ex = vlm.prepare(scene.pil(), existence_question(target.shape), answer="yes", region=target.mask)
        if not model_is_right(vlm, ex):
            continue
        image_pos = ex.groups["lm"]["image"]
        on_object = set(ex.groups["lm"]["object"])
        corrupt = noise(vlm, ex, scale=scale, tokens="image", seed=noise_seed)
        tr = trace(vlm, ex, corrupt, components=[f"lm.{component}"], tokens={str(p): [p] for p in image_pos},
                   progress=False)
        effects = tr.data.sel(component=component).values  # (layer, image position)
        labels = [p in on_object for p in image_pos]
        for layer in range(effects.shape[0]):
            rows.append({"example": used, "layer": layer, "auroc": auroc(effects[layer], labels),
                         "total_effect": tr.total_effect, "object_tokens": len(on_object)})
        used += 1
        bar.update()
    bar.close()
    return pd.DataFrame(rows)


def patch_labels(positions, object_positions) -> np.ndarray:
    """Boolean per entry of ``positions``: does that visual token belong to the object?"""
    on = set(int(p) for p in object_positions)
    return np.array([int(p) in on for p in positions], bool)


def map_auroc(values, object_positions, positions=None) -> float:
    """AUROC of a per-position map (a DataArray over ``position``, or an array with ``positions``) against an object.

    Works the same for :func:`~vlm_interp.tracing.trace` rows (``tokens="each"``) and for the
    patch maps of :mod:`~vlm_interp.tracing.baselines`: higher values should mean "on the object".
    """
    if positions is None:
        if not hasattr(values, "coords") or "position" not in values.coords:
            raise ValueError("give positions= for a plain array; a DataArray needs a 'position' coordinate")
        positions = [int(p) for p in values.coords["position"].values]
    values = np.asarray(getattr(values, "values", values), float)
    if values.shape != (len(positions),):
        raise ValueError(f"a map of shape {values.shape} for {len(positions)} positions; select one layer first")
    return auroc(values, patch_labels(positions, object_positions))


def patch_neighbourhoods(positions, rows: int, cols: int, radius: int = 1) -> dict[str, list[int]]:
    """For each patch (``positions`` in row-major grid order), the positions of its (2r+1)x(2r+1) neighbourhood.

    Keys are the centre positions as strings, ready for ``trace(..., tokens=...)``; the
    neighbourhood is clipped at the grid's edges.
    """
    positions = list(positions)
    if len(positions) != rows * cols:
        raise ValueError(f"{len(positions)} positions for a {rows}x{cols} grid")
    out = {}
    for k, centre in enumerate(positions):
        r, c = divmod(k, cols)
        out[str(centre)] = [positions[rr * cols + cc]
                            for rr in range(max(0, r - radius), min(rows, r + radius + 1))
                            for cc in range(max(0, c - radius), min(cols, c + radius + 1))]
    return out
