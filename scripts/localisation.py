"""Does causal tracing find the queried object? Per-patch effect maps against the shapes world's ground truth.

On held-out shapes-world scenes (the zoo's evaluation seed, disjoint from training), existence
questions about an object that is present (its shape unique in the scene) and that the model
answers right. For each example, several probes give a per-patch map; each map is scored by
the AUROC of its values against the object's patches (from the scene graph). Probes:

* causal tracing on LLaVA: restore (clean into noisy) or noise (noisy into clean) one image
  token or a 3x3 neighbourhood of patches at each LM layer and component, and restore one
  vision-tower patch or a 3x3 neighbourhood under noise on the patch embeddings;
* input attributions (the non-causal baselines): captum pixel integrated gradients and patch
  feature ablation, summed onto the same patch grid;
* InstructBLIP, in Q-Former terms: restore/noise vision patches under noise on the patch
  embeddings (the Q-Former reads the vision tower's output), the Q-Former's cross-attention
  over patches, and that attention weighted by the causal effect of each query.

Writes ``OUT/localisation.md`` and ``OUT/localisation.json`` atomically. Reproduce with::

    python scripts/localisation.py --limit 100

(``--llava`` / ``--instructblip`` take other organisms, such as retrained ones; ``--instructblip none``
skips it.)
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

import vlm_interp as vi
from vlm_interp.corruptions import noise
from vlm_interp.example import Example
from vlm_interp.files import atomic_write
from vlm_interp.hooks import Hook
from vlm_interp.hallucination.compare import markdown_table, slug
from vlm_interp.hallucination.stats import bootstrap_ci
from vlm_interp.tracing import trace
from vlm_interp.tracing.baselines import patch_feature_ablation, patch_grid, patch_positions, pixel_integrated_gradients
from vlm_interp.tracing.dataset import model_is_right
from vlm_interp.tracing.groundtruth import map_auroc, patch_neighbourhoods
from vlm_interp.zoo.evaluate import EVAL_SEED
from vlm_interp.zoo.shapes import Scene, World, WorldConfig
from vlm_interp.zoo.tasks import existence_question

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


# ---------------------------------------------------------------- world and examples


def world_for(model: str) -> World:
    """The shapes world an organism was trained on (its card's recipe), else the zoo's default world."""
    from vlm_interp.zoo.organisms import ORGANISM_WORLD

    card_path = None
    if model.startswith("zoo:"):
        from vlm_interp.zoo import organism_path

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


# ---------------------------------------------------------------- probes


def _trace_maps(vlm, item: Item, corrupt: Example, components: list[str], name: str, *, direction: str = "restore",
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
    """The tower whose positions patch maps use: the LM for LLaVA, the vision tower otherwise."""
    return "lm" if vlm.family == "llava" else "vision"


def llava_probes(vlm, item: Item, ctx: Context) -> Maps:
    """The main causal-tracing probes of a LLaVA organism on one example (noise on the image embeddings)."""
    emb = noise(vlm, item.example, scale=ctx.scale, tokens="image", seed=ctx.noise_seed)
    maps = _trace_maps(vlm, item, emb, ["lm.hidden", "lm.attn", "lm.mlp"], "restore 1 patch", ctx=ctx)
    maps |= _trace_maps(vlm, item, emb, ["lm.hidden", "lm.mlp"], "restore 3x3", neighbourhood=True, ctx=ctx)
    return maps


def llava_explore(vlm, item: Item, ctx: Context) -> Maps:
    """Further LLaVA probes, run on a subset: the noising direction, windows, noise scales."""
    ex = item.example
    emb = noise(vlm, ex, scale=ctx.scale, tokens="image", seed=ctx.noise_seed)
    maps = _trace_maps(vlm, item, emb, ["lm.hidden"], "noise 1 patch", direction="noise", ctx=ctx)
    maps |= _trace_maps(vlm, item, emb, ["lm.hidden"], "noise 3x3", direction="noise", neighbourhood=True, ctx=ctx)
    maps |= _trace_maps(vlm, item, emb, ["lm.mlp"], "restore 1 patch, window 4", window=4, ctx=ctx)
    for scale in ctx.extra.get("scales", ()):
        other = noise(vlm, ex, scale=scale, tokens="image", seed=ctx.noise_seed)
        maps |= _trace_maps(vlm, item, other, ["lm.hidden", "lm.mlp"], f"restore 1 patch [{scale} noise]", ctx=ctx)
    return maps


def llava_vision_probes(vlm, item: Item, ctx: Context) -> Maps:
    """LLaVA's vision tower: noise on the CLIP patch embeddings (main scale and 10 sd), restore one patch or a
    3x3 neighbourhood of each vision site."""
    maps: Maps = {}
    for scale in dict.fromkeys((ctx.scale, "10sd")):
        patches = noise(vlm, item.example, scale=scale, tokens="image", place="patches", seed=ctx.noise_seed)
        sites = ["vision.hidden", "vision.attn", "vision.mlp"]
        maps |= _trace_maps(vlm, item, patches, sites, f"restore 1 patch [patch-embedding {scale} noise]", ctx=ctx)
        maps |= _trace_maps(vlm, item, patches, sites, f"restore 3x3 [patch-embedding {scale} noise]",
                            neighbourhood=True, ctx=ctx)
    return maps


def attribution_probes(vlm, item: Item, ctx: Context) -> Maps:
    """The input-attribution baselines (captum) on one example."""
    ex, steps = item.example, ctx.ig_steps
    return {
        ("pixel IG (black baseline, signed)", "input"): pixel_integrated_gradients(vlm, ex, steps=steps,
                                                                                  baseline="black").values,
        ("pixel IG (black baseline, |.|)", "input"): pixel_integrated_gradients(vlm, ex, steps=steps, baseline="black",
                                                                               reduce="abs").values,
        ("pixel IG (mean baseline, |.|)", "input"): pixel_integrated_gradients(vlm, ex, steps=steps, baseline="mean",
                                                                              reduce="abs").values,
        ("patch feature ablation (black)", "input"): patch_feature_ablation(vlm, ex, baseline="black",
                                                                            batch_size=ctx.batch_size).values,
        ("patch feature ablation (mean)", "input"): patch_feature_ablation(vlm, ex, baseline="mean",
                                                                           batch_size=ctx.batch_size).values,
    }


def cross_attention(vlm, ex: Example) -> dict[int, torch.Tensor]:
    """Q-Former cross-attention weights per layer, (heads, queries, vision positions), from one clean forward.

    Computed from the attention module's own query/key projections on the inputs it receives
    (seen by call hooks of the hook engine), so it does not depend on the attention implementation.
    """
    layers = vlm.adapter.layers_with("qformer", "xattn")
    grabbed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def grab(layer: int) -> Callable:
        def see(args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            grabbed[layer] = (hidden.detach(), kwargs["encoder_hidden_states"].detach())
        return see

    hooks = [Hook(vlm.adapter.module_path("qformer", "hidden", layer) + ".crossattention.attention", fn=grab(layer),
                  kind="call", name=f"Q-Former cross-attention inputs {layer}") for layer in layers]
    with torch.no_grad(), vlm.attach(hooks):  # a layer whose cross-attention never ran is an error
        vlm.logits(ex.inputs)
    out = {}
    for layer, (hidden, enc) in grabbed.items():
        attn = vlm.model.get_submodule(vlm.adapter.module_path("qformer", "hidden", layer) + ".crossattention.attention")
        heads, width = attn.num_attention_heads, attn.attention_head_size
        with torch.no_grad():
            q = attn.query(hidden).view(*hidden.shape[:2], heads, width).transpose(1, 2)
            k = attn.key(enc).view(*enc.shape[:2], heads, width).transpose(1, 2)
            out[layer] = torch.softmax(q @ k.transpose(-1, -2) * attn.scaling, -1)[0]
    return out


def instructblip_probes(vlm, item: Item, ctx: Context) -> Maps:
    """Q-Former-terms probes of an InstructBLIP organism on one example (noise on the patch embeddings)."""
    ex = item.example
    patches = noise(vlm, ex, scale=ctx.scale, tokens="image", place="patches", seed=ctx.noise_seed)
    maps = _trace_maps(vlm, item, patches, ["vision.hidden"], "restore 1 patch", ctx=ctx)
    maps |= _trace_maps(vlm, item, patches, ["vision.hidden"], "restore 3x3", neighbourhood=True, ctx=ctx)
    maps |= _trace_maps(vlm, item, patches, ["vision.hidden"], "noise 3x3", direction="noise", neighbourhood=True,
                        ctx=ctx)
    # the Q-Former: where its queries look, plain and weighted by each query's causal effect
    attn = cross_attention(vlm, ex)
    n_query = len(ex.positions("image", "qformer"))
    tr = trace(vlm, ex, patches, components=["qformer.xattn"], tokens={str(q): [q] for q in range(n_query)},
               batch_size=ctx.batch_size, progress=False)
    image = ex.positions("image", "vision")
    for layer, weights in attn.items():
        per_query = weights.mean(0)[:, image].numpy()  # (queries, patches), mean over heads
        maps[("Q-Former cross-attention (mean over queries)", str(layer))] = per_query.mean(0)
        effect = np.clip(tr.data.sel(component="xattn", layer=layer).values - tr.attrs["corrupt_score"], 0, None)
        maps[("Q-Former cross-attention weighted by query restore effect", str(layer))] = effect @ per_query
    return maps


def instructblip_explore(vlm, item: Item, ctx: Context) -> Maps:
    """Further InstructBLIP probes on a subset: attention and MLP sites, the single-patch noising direction."""
    patches = noise(vlm, item.example, scale=ctx.scale, tokens="image", place="patches", seed=ctx.noise_seed)
    maps = _trace_maps(vlm, item, patches, ["vision.attn", "vision.mlp"], "restore 1 patch", ctx=ctx)
    maps |= _trace_maps(vlm, item, patches, ["vision.hidden"], "noise 1 patch", direction="noise", ctx=ctx)
    return maps


# ---------------------------------------------------------------- scoring and report


def score(items: list[Item], probe: Callable[[object, Item, Context], Maps], vlm, ctx: Context,
          desc: str) -> list[dict]:
    """AUROC of every map of every example: one row per (example, probe, layer)."""
    rows = []
    for n, item in enumerate(tqdm(items, desc=desc)):
        # the rest of the image once the object is taken out, to ask where else a map puts its effect
        on_object = set(item.object_positions)
        rest = [p for p in item.positions if p not in on_object]
        keep = [item.positions.index(p) for p in rest]
        for (name, layer), values in probe(vlm, item, ctx).items():
            rows.append({"example": n, "scene_seed": item.scene_seed, "shape": item.shape, "probe": name,
                         "layer": layer, "auroc": map_auroc(values, item.object_positions, item.positions),
                         "auroc_partner": map_auroc(values[keep], item.partner_positions, rest)
                         if item.partner_positions else None,
                         "auroc_others": map_auroc(values[keep], item.other_positions, rest)
                         if item.other_positions else None})
    return rows


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


def table(summary: list[dict]) -> str:
    """A Markdown table of the summary rows."""
    return _table(["probe", "layer", "mean AUROC", "95% CI", "share >= 0.9", "n"],
                  [[r["probe"], r["layer"], f"{r['mean']:.3f}", f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]",
                    f"{r['share_at_least_0.9']:.2f}", r["n"]] for r in summary])


def _table(header: list[str], rows: list[list]) -> str:
    """Rows of pre-formatted cells as a Markdown table, through the project's own table writer."""
    return markdown_table(pd.DataFrame(rows, columns=header, dtype=object)).rstrip("\n")


def run_model(model: str, probes: list[tuple[Callable, int]], args: argparse.Namespace, ctx: Context) -> dict:
    """Select examples for one organism, run each probe on its first ``limit`` examples, and summarise.

    Each probe set's rows are kept in ``OUT/localisation-parts`` under a fingerprint of everything they
    depend on, so an interrupted or extended study reruns only the sets that are missing."""
    start = time.time()
    vlm = vi.load(model)
    world = world_for(model)
    items, skipped = select(vlm, world, max(limit for _, limit in probes), args.seed, args.max_scenes)
    rows, seconds = [], {}
    for probe, limit in probes:
        part = Path(args.out) / "localisation-parts" / f"{slug(model)}-{probe.__name__}.json"
        key = part_key(model, probe, limit, args, ctx)
        saved = json.loads(part.read_text()) if part.exists() else None
        if saved is None or saved["key"] != key:
            t = time.time()
            saved = {"key": key, "rows": score(items[:limit], probe, vlm, ctx, desc=f"{probe.__name__} {model}"),
                     "seconds": round(time.time() - t, 1)}
            part.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(part, json.dumps(saved))
        rows += saved["rows"]
        seconds[probe.__name__] = saved["seconds"]
    summary = summarise(rows, args.n_boot, args.seed)
    return {"model": model, "family": vlm.family, "n_examples": len(items), "skipped": skipped,
            "scenes_seen": sum(skipped.values()) + len(items), "summary": summary, "best": best_layers(summary),
            "by_kind": by_kind(rows, world, summary), "rows": rows, "seconds": round(time.time() - start, 1),
            "seconds_per_probe_set": seconds}


def part_key(model: str, probe: Callable, limit: int, args: argparse.Namespace, ctx: Context) -> dict:
    """What a probe set's rows depend on: the checkpoint's weights, the examples, the probe function's code and
    the settings. (Helpers the probe calls and ``score`` are not covered: after changing one, delete the parts
    it affects from OUT/localisation-parts.)"""
    from vlm_interp.zoo import organism_path

    weights = sorted(Path(organism_path(model[4:]) if model.startswith("zoo:") else model).glob("*.safetensors"))
    digest = hashlib.sha256(b"".join(w.read_bytes() for w in weights)).hexdigest() if weights else model
    code = hashlib.sha256(inspect.getsource(probe).encode()).hexdigest()
    return {"model": model, "weights": digest, "probe": probe.__name__, "code": code, "limit": limit,
            "seed": args.seed, "max_scenes": args.max_scenes, "context": asdict(ctx)}


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


def kind_table(rows: list[dict]) -> str:
    """A Markdown table of the by-kind rows."""
    return _table(["probe", "layer", "example kind", "n", "mean AUROC", "share >= 0.9"],
                  [[r["probe"], r["layer"], f"{r['kind']}: {r['value']}", r["n"], f"{r['mean']:.3f}",
                    f"{r['share_at_least_0.9']:.2f}"] for r in rows])


def markdown(results: list[dict], command: str, ctx: Context, discussion: str) -> str:
    """The results file: command, setup, one table per organism, best layers, and the discussion."""
    parts = ["# Object localisation: causal tracing vs input attributions on the shapes-world organisms", "",
             "Reproduce:", "", "```bash", command, "```", "",
             f"Held-out scenes `world.scene(({ctx.extra['seed']}, i))` (the zoo's evaluation seed; training uses the "
             "recipe seed). One positive existence question per scene about an object whose shape occurs once; "
             "examples the model answers wrongly are skipped (ROME's filter). Ground truth: the patches the "
             "object's mask touches (scene graph). Each map is scored by AUROC against those patches (0.5 = "
             "chance), averaged over examples with a 95% percentile bootstrap interval. Noise: "
             f"{ctx.scale} Gaussian, seed {ctx.noise_seed}; metric: probability of 'yes'. IG: {ctx.ig_steps} "
             "Gauss-Legendre steps.", ""]
    for res in results:
        parts += [f"## {res['model']} ({res['family']})", "",
                  f"{res['n_examples']} examples from {res['scenes_seen']} scenes; skipped: "
                  + ", ".join(f"{k}: {v}" for k, v in res["skipped"].items()) + f". Runtime {res['seconds']} s "
                  f"({', '.join(f'{k}: {v} s' for k, v in res['seconds_per_probe_set'].items())}); "
                  "`n` in the tables is the number of examples a probe ran on.", "",
                  "Best layer per probe (chosen on these examples):", "", table(res["best"]), "",
                  "By kind of example, for the best causal probe and the best input attribution on all examples:",
                  "", kind_table(res["by_kind"]), "",
                  "<details><summary>Every probe and layer</summary>", "", table(res["summary"]), "", "</details>", ""]
    parts += ["## Discussion", "", discussion.strip(), ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run both organisms, write the Markdown and JSON results."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--llava", default="zoo:shapes-llava", help="LLaVA organism ('none' to skip)")
    p.add_argument("--instructblip", default="zoo:shapes-instructblip", help="InstructBLIP organism ('none' to skip)")
    p.add_argument("--limit", type=int, default=100, help="examples per organism")
    p.add_argument("--seed", type=int, default=EVAL_SEED, help="scene seed (default: the zoo's evaluation seed)")
    p.add_argument("--max-scenes", type=int, default=2000)
    p.add_argument("--noise-seed", type=int, default=0)
    p.add_argument("--scale", default="3sd")
    p.add_argument("--explore", type=int, default=20, help="examples for the exploratory LLaVA probes")
    p.add_argument("--extra-scales", default="1sd,10sd", help="noise scales for the exploratory probes ('' for none)")
    p.add_argument("--ig-steps", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results")
    p.add_argument("--discussion", default=None, help="Markdown file with the discussion to include")
    p.add_argument("--render-only", action="store_true", help="rewrite the Markdown from OUT/localisation.json")
    args = p.parse_args(argv)
    out = Path(args.out)
    discussion = Path(args.discussion).read_text() if args.discussion else "(no discussion given: pass --discussion FILE)"
    if args.render_only:
        saved = json.loads((out / "localisation.json").read_text())
        ctx = Context(**saved["meta"]["context"])
        atomic_write(out / "localisation.md", markdown(saved["results"], saved["meta"]["command"], ctx, discussion))
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ctx = Context(scale=args.scale, noise_seed=args.noise_seed, batch_size=args.batch_size, ig_steps=args.ig_steps,
                  extra={"seed": args.seed, "scales": [s for s in args.extra_scales.split(",") if s]})
    results = []
    if args.llava != "none":
        results.append(run_model(args.llava, [(llava_probes, args.limit), (llava_vision_probes, args.limit),
                                              (attribution_probes, args.limit),
                                              (llava_explore, min(args.explore, args.limit))], args, ctx))
    if args.instructblip != "none":
        results.append(run_model(args.instructblip, [(instructblip_probes, args.limit), (attribution_probes, args.limit),
                                                     (instructblip_explore, min(args.explore, args.limit))], args, ctx))
    command = "python scripts/localisation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": command, "python": platform.python_version(), "torch": torch.__version__,
            "vlm_interp": getattr(vi, "__version__", ""), "args": vars(args),
            "context": {"scale": ctx.scale, "noise_seed": ctx.noise_seed, "batch_size": ctx.batch_size,
                        "ig_steps": ctx.ig_steps, "extra": ctx.extra}}
    atomic_write(out / "localisation.json", json.dumps({"meta": meta, "results": results}, indent=1))
    atomic_write(out / "localisation.md", markdown(results, command, ctx, discussion))
    for res in results:
        print(f"\n{res['model']}: {res['n_examples']} examples, skipped {res['skipped']}")
        print(table(res["best"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
