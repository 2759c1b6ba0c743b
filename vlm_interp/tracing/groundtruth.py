"""Does tracing find the object? Per-patch effects scored against the shapes world's object masks."""

from __future__ import annotations

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .causal import trace


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
    from ..corruptions import noise
    from ..zoo.tasks import existence_question
    from .dataset import model_is_right

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
