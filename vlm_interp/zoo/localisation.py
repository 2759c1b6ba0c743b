"""Does causal tracing find the queried object? The study's examples, per-patch maps and their scores.

On held-out shapes-world scenes, existence questions about an object that is present (its shape unique in the
scene) and that the model answers right (:func:`select`). A probe turns one example into per-patch maps
(:func:`trace_maps` makes them from a trace over single patches or 3x3 neighbourhoods); :func:`score` rates
each map by the AUROC of its values against the object's patches (from the scene graph), :func:`summarise` and
:func:`best_layers` average them with bootstrap intervals, and :func:`by_kind` breaks the best probes down by
the kind of example. ``scripts/localisation.py`` runs the probes and writes the report.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from ..example import Example
from ..hallucination.stats import bootstrap_ci
from ..tracing import trace
from ..tracing.baselines import patch_grid, patch_positions
from ..tracing.dataset import model_is_right
from ..tracing.groundtruth import map_auroc, patch_neighbourhoods
from . import organism_path
from .organisms import ORGANISM_WORLD
from .shapes import Scene, World, WorldConfig
from .tasks import existence_question

Maps = dict[tuple[str, str], np.ndarray]  # (probe, layer label) -> values in patch (row-major) order


@dataclass
class Item:
    """One held-out example: the scene, the queried object, the prepared example and the ground-truth positions."""

    scene_seed: list[int]
    obj: int
    shape: str
    example: Example
    positions: list[int]  # the positions maps are reported on, one per patch in row-major order
    object_positions: list[int]
    grid: tuple[int, int]
    partner_positions: list[int] = field(default_factory=list)  # the co-occurrence partner's patches, minus the object's
    other_positions: list[int] = field(default_factory=list)  # the other objects' patches, minus object and partner


@dataclass
class Context:
    """Settings shared by the probes."""

    scale: str = "3sd"
    noise_seed: int = 0
    batch_size: int = 64
    ig_steps: int = 32
    extra: dict = field(default_factory=dict)



def world_for(model: str) -> World:
    """The shapes world an organism was trained on (its card's recipe), else the zoo's default world."""
    card_path = None
    if model.startswith("zoo:"):
        card_path = organism_path(model[4:]) / "card.json"
    elif Path(model, "card.json").exists():
        card_path = Path(model, "card.json")
    if card_path is None or not card_path.exists():
        return World(ORGANISM_WORLD)
    world = json.loads(card_path.read_text())["recipe"]["world"]
    tuples = {k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
              for k, v in world.items()}
    return World(WorldConfig(**tuples))


def select(vlm, world: World, n: int, seed: int, max_scenes: int) -> tuple[list[Item], dict[str, int]]:
    """``n`` held-out positive existence examples answered right; counts of the scenes skipped and why."""
    rng = np.random.default_rng([seed, 0x10C])
    items: list[Item] = []
    skipped = {"no shape occurs exactly once": 0, "model answers otherwise": 0, "object outside the view": 0}
    bar = tqdm(total=n, desc=f"select {vlm.name}", leave=False)
    for i in range(max_scenes):
        if len(items) >= n:
            break
        scene: Scene = world.scene((seed, i))
        unique = scene.unique_indices()
        if not unique:
            skipped["no shape occurs exactly once"] += 1
            continue
        k = unique[int(rng.integers(len(unique)))]
        obj = scene.objects[k]
        ex = vlm.prepare(scene.pil(), existence_question(obj.shape), answer="yes")
        if not model_is_right(vlm, ex):
            skipped["model answers otherwise"] += 1
            continue
        rows, cols, _ = patch_grid(vlm, ex)
        if (rows, cols) != scene.grid_shape:
            raise ValueError(f"the model's patch grid {rows}x{cols} is not the world's {scene.grid_shape}")
        _, positions = patch_positions(vlm, ex)
        on = [positions[p] for p in obj.patches]
        if not on:
            skipped["object outside the view"] += 1
            continue
        partner = world.config.partner(obj.shape)
        around = {"partner": [], "other": []}
        for m, o in enumerate(scene.objects):
            if m != k:
                around["partner" if o.shape == partner else "other"] += [positions[p] for p in o.patches]
        partner_on = sorted(set(around["partner"]) - set(on))
        items.append(Item([seed, i], k, obj.shape, ex, positions, on, (rows, cols), partner_on,
                          sorted(set(around["other"]) - set(on) - set(partner_on))))
        bar.update()
    bar.close()
    if len(items) < n:
        print(f"warning: only {len(items)} usable examples in {max_scenes} scenes", file=sys.stderr)
    return items, skipped



def trace_maps(vlm, item: Item, corrupt: Example, components: list[str], name: str, *, direction: str = "restore",
                neighbourhood: bool = False, ctx: Context, window: int = 1, metric: str = "prob") -> Maps:
    """Per-layer patch maps from one trace over single patches (or 3x3 neighbourhoods) of one tower."""
    tower = components[0].split(".")[0]
    positions = item.positions if tower == "lm" or tower == patch_tower(vlm) else item.example.positions("image", tower)
    if neighbourhood:
        tokens = patch_neighbourhoods(positions, *item.grid)
    else:
        tokens = {str(p): [p] for p in positions}
    tr = trace(vlm, item.example, corrupt, components=components, tokens=tokens, direction=direction,
               batch_size=ctx.batch_size, progress=False, window=window, metric=metric,
               other="no" if metric == "logit_diff" else None)
    # signed effect: restoring brings the answer back / noising takes it away (bigger = more object);
    # |effect|: any change of the answer, either way
    reference = tr.attrs["corrupt_score"] if direction == "restore" else tr.attrs["clean_score"]
    sign = 1.0 if direction == "restore" else -1.0
    out: Maps = {}
    for comp in tr.data.coords["component"].values:
        for layer in vlm.adapter.layers_with(tower, str(comp)):
            effect = sign * (tr.data.sel(component=comp, layer=layer).values - reference)
            out[(f"{name} {tower}.{comp}", str(layer))] = effect
            out[(f"{name} {tower}.{comp} |effect|", str(layer))] = np.abs(effect)
    return out


def patch_tower(vlm) -> str:
    """The tower whose positions patch maps use: the adapter's patch-map tower (the LM for LLaVA, whose image tokens
    are the patches; the vision tower for the BLIP families)."""
    tower = vlm.adapter.adapter.patch_map_tower
    if tower is None:
        raise ValueError(f"patch maps need a tower whose image tokens are the image's patches one for one; the "
                         f"{vlm.family} adapter names none (patch_map_tower)")
    return tower



def score_example(n: int, item: Item, probe: Callable[[object, Item, Context], Maps], vlm,
                  ctx: Context) -> list[dict]:
    """AUROC of every map of one example (the ``n``-th): one row per (probe, layer)."""
    # the rest of the image once the object is taken out, to ask where else a map puts its effect
    on_object = set(item.object_positions)
    rest = [p for p in item.positions if p not in on_object]
    keep = [item.positions.index(p) for p in rest]
    return [{"example": n, "scene_seed": item.scene_seed, "shape": item.shape, "probe": name,
             "layer": layer, "auroc": map_auroc(values, item.object_positions, item.positions),
             "auroc_partner": map_auroc(values[keep], item.partner_positions, rest) if item.partner_positions else None,
             "auroc_others": map_auroc(values[keep], item.other_positions, rest) if item.other_positions else None}
            for (name, layer), values in probe(vlm, item, ctx).items()]


def score(items: list[Item], probe: Callable[[object, Item, Context], Maps], vlm, ctx: Context,
          desc: str) -> list[dict]:
    """AUROC of every map of every example: one row per (example, probe, layer)."""
    return [row for n, item in enumerate(tqdm(items, desc=desc)) for row in score_example(n, item, probe, vlm, ctx)]


def summarise(rows: list[dict], n_boot: int, seed: int) -> list[dict]:
    """Mean AUROC with a 95% bootstrap interval per (probe, layer), in first-seen order."""
    keys = list(dict.fromkeys((r["probe"], r["layer"]) for r in rows))
    out = []
    for probe, layer in keys:
        values = np.array([r["auroc"] for r in rows if r["probe"] == probe and r["layer"] == layer], float)
        values = values[~np.isnan(values)]
        lo, hi = bootstrap_ci(values, np.mean, n_boot=n_boot, seed=seed)
        out.append({"probe": probe, "layer": layer, "n": int(len(values)), "mean": float(np.mean(values)),
                    "ci_low": lo, "ci_high": hi, "share_at_least_0.9": float(np.mean(values >= 0.9))})
    return out


def best_layers(summary: list[dict]) -> list[dict]:
    """Per probe, the layer with the highest mean AUROC (chosen on the same examples: optimistic)."""
    best: dict[str, dict] = {}
    for row in summary:
        if row["probe"] not in best or row["mean"] > best[row["probe"]]["mean"]:
            best[row["probe"]] = row
    return sorted(best.values(), key=lambda r: -r["mean"])



def by_kind(rows: list[dict], world: World, summary: list[dict]) -> list[dict]:
    """Mean AUROC of the best causal probe and of the best attribution baseline (at their best layers) by
    the kind of example: weak (small or faint) object, its co-occurrence partner in the scene, object count;
    and, where the rows have them, the AUROC of the same maps against the partner's patches and against the
    other objects' patches, with the queried object left out (is the effect on the partner, the prior?)."""
    full = max(r["n"] for r in summary)
    candidates = [r for r in best_layers(summary) if r["n"] == full]
    causal = [r for r in candidates if r["layer"] != "input"][:1]
    baseline = [r for r in candidates if r["layer"] == "input"][:1]
    out = []
    for best in causal + baseline:
        chosen = [r for r in rows if r["probe"] == best["probe"] and r["layer"] == best["layer"]]
        kinds: dict[tuple[str, str], list[float]] = {}
        for r in chosen:
            scene = world.scene(tuple(r["scene_seed"]))
            obj = next(o for o in scene.objects if o.shape == r["shape"])
            partner = world.config.partner(obj.shape)
            for kind in (("object", "weak" if obj.weak else "not weak"),
                         ("partner", "present" if partner and partner in scene.shape_set() else "absent"),
                         ("objects in scene", str(len(scene.objects)))):
                kinds.setdefault(kind, []).append(r["auroc"])
        for (what, value), aurocs in sorted(kinds.items()):
            a = np.asarray(aurocs, float)
            out.append({"probe": best["probe"], "layer": best["layer"], "kind": what, "value": value, "n": len(a),
                        "mean": float(np.nanmean(a)), "share_at_least_0.9": float(np.mean(a >= 0.9))})
        for field_, what in (("auroc_partner", "the partner's patches"), ("auroc_others", "other objects' patches")):
            a = np.asarray([r[field_] for r in chosen if r.get(field_) is not None], float)
            if len(a):
                out.append({"probe": best["probe"], "layer": best["layer"], "kind": "AUROC against",
                            "value": f"{what}, object left out", "n": len(a), "mean": float(np.nanmean(a)),
                            "share_at_least_0.9": float(np.mean(a >= 0.9))})
    return out



__all__ = ["Context", "Item", "Maps", "best_layers", "by_kind", "patch_tower", "score", "select", "summarise",
           "trace_maps", "world_for"]
