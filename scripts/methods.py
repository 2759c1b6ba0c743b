"""Ground truth for the methods beyond patching on the shapes-world organisms: knockout, logit lens, attention maps.

On held-out shapes-world scenes (the zoo's evaluation seed, disjoint from training), positive
existence questions ("Is there a star in the image?") about an object whose shape occurs once,
answered right by the model (ROME's filter). Per example:

* attention knockout, single-layer windows, metric P(yes): cut object -> last, and as the control
  the same number of non-object image tokens -> last (drawn per example from a recorded seed); also
  Zhang et al.'s edges image -> question, image -> last, question -> last. InstructBLIP: the Q-Former's
  cross-attention from its queries to the object's patches vs as many other patches, and the LM edges;
* logit lens over the image tokens (shapes-llava): is the object's shape word the top token of its
  patches? Its rank and AUROC of its probability against the object's patches, per layer;
* attention maps (correlational), for comparison: AUROC of the last token's head-averaged attention
  over the image tokens, and of rollout, against the object's patches.

Writes ``OUT/methods.md`` and ``OUT/methods.json`` atomically. Reproduce with::

    python scripts/methods.py --n 120 --threads 1
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

import vlm_interp as vi
from vlm_interp.errors import VLMInterpError
from vlm_interp.files import atomic_write
from vlm_interp.hallucination.compare import markdown_table
from vlm_interp.hallucination.stats import bootstrap_ci
from vlm_interp.tracing.attention import attention_maps
from vlm_interp.tracing.dataset import model_is_right
from vlm_interp.tracing.groundtruth import auroc
from vlm_interp.tracing.knockout import knockout, make_cut, run_cuts
from vlm_interp.tracing.lens import logit_lens
from vlm_interp.tracing.metrics import make_metric
from vlm_interp.zoo.evaluate import EVAL_SEED
from vlm_interp.zoo.shapes import World, WorldConfig
from vlm_interp.zoo.tasks import existence_question


def world_for(model: str) -> World:
    """The shapes world an organism was trained on (its card's recipe)."""
    from vlm_interp.zoo import organism_path
    from vlm_interp.zoo.organisms import ORGANISM_WORLD

    card = organism_path(model[4:]) / "card.json" if model.startswith("zoo:") else Path(model, "card.json")
    if not card.exists():
        return World(ORGANISM_WORLD)
    world = json.loads(card.read_text())["recipe"]["world"]
    return World(WorldConfig(**{k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list)
                                else v for k, v in world.items()}))


def checkpoint_hash(model: str) -> str:
    from vlm_interp.zoo import organism_path

    folder = organism_path(model[4:]) if model.startswith("zoo:") else Path(model)
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def select(vlm, world: World, n: int, seed: int, max_scenes: int):
    """``n`` (scene key, shape, example with the object group, a shape absent from the scene) answered right; counts
    of what was skipped."""
    rng = np.random.default_rng([seed, 0x3E7])
    items, skipped = [], {"no shape occurs exactly once": 0, "model answers otherwise": 0, "object not seen": 0,
                          "every shape present": 0}
    for i in tqdm(range(max_scenes), desc=f"select {vlm.name}", leave=False):
        if len(items) >= n:
            break
        scene = world.scene((seed, i))
        unique = scene.unique_indices()
        if not unique:
            skipped["no shape occurs exactly once"] += 1
            continue
        obj = scene.objects[unique[int(rng.integers(len(unique)))]]
        ex = vlm.prepare(scene.pil(), existence_question(obj.shape), answer="yes", region=obj.mask)
        tower = "lm" if ex.groups["lm"].get("object") else "vision"
        if not ex.groups[tower].get("object"):
            skipped["object not seen"] += 1
            continue
        if not model_is_right(vlm, ex):
            skipped["model answers otherwise"] += 1
            continue
        absent = [shape for shape in world.config.shapes if shape not in {o.shape for o in scene.objects}]
        if not absent:  # the lens's control word is a shape the scene does not hold
            skipped["every shape present"] += 1
            continue
        items.append(([seed, i], obj.shape, ex, absent[int(rng.integers(len(absent)))]))
    return items, skipped


def control(example, tower: str, key, control_seed: int) -> list[int]:
    """As many image tokens as the object has, none on it, drawn from a seed recorded with the example."""
    image = [p for p in example.groups[tower]["image"] if p not in set(example.groups[tower]["object"])]
    rng = np.random.default_rng([control_seed, *key])
    return sorted(rng.choice(image, size=len(example.groups[tower]["object"]), replace=False).tolist())


def interval(values) -> tuple[float, float, float]:
    values = np.asarray(values, float)
    lo, hi = bootstrap_ci(values, np.mean, seed=0)
    return float(values.mean()), lo, hi


# ---------------------------------------------------------------- knockout


def knockout_rows(vlm, items, control_seed: int, tower: str, component: str, target: str) -> pd.DataFrame:
    """Relative change of P(yes) per example, layer and edge (object, control and, in the LM, Zhang's edges)."""
    keys_tower = vlm.adapter.attention(tower, component).keys or tower
    layers = vlm.adapter.layers_with(tower, component)
    rows = []
    for key, shape, ex, _ in tqdm(items, desc=f"knockout {vlm.name} {tower}.{component}", leave=False):
        edges = {}
        if ex.groups[keys_tower].get("object"):  # LLaVA's LM, the Q-Former's cross-attention (not InstructBLIP's LM)
            edges = {"object": ("object", target),
                     "control": (("control", control(ex, keys_tower, key, control_seed)), target)}
        if tower == "lm":
            edges |= {"image->question": ("image", "question"), "image->last": ("image", "last"),
                      "question->last": ("question", "last")}
        cuts, labels = [], []
        for layer in layers:
            for name, (source, tgt) in edges.items():
                cuts.append(make_cut(vlm, ex, source, tgt, [layer], None, tower, component)[1])
                labels.append((layer, name))
        metric = make_metric(vlm, ex)
        with torch.no_grad():
            clean = float(metric(vlm.logits(ex.inputs)[:, vlm.answer_start(ex)])[0])
        values = run_cuts(vlm, ex, cuts, metric, tower, component, batch_size=len(cuts), progress=False)
        for (layer, name), v in zip(labels, values.tolist()):
            rows.append({"key": key[1], "layer": layer, "edge": name, "clean": clean, "cut": v,
                         "relative": (v - clean) / clean, "object_tokens": len(ex.groups[keys_tower].get("object", []))})
    return pd.DataFrame(rows)


def knockout_table(frame: pd.DataFrame) -> pd.DataFrame:
    out = []
    for (layer, edge), g in frame.groupby(["layer", "edge"], sort=True):
        mean, lo, hi = interval(100 * g["relative"])
        out.append({"layer": layer, "edge": edge, "mean relative change of P(yes) %": mean, "95% CI": f"[{lo:.2f}, "
                    f"{hi:.2f}]", "n": len(g)})
    return pd.DataFrame(out)


def object_vs_control(frame: pd.DataFrame) -> pd.DataFrame:
    out = []
    for layer, g in frame.groupby("layer"):
        wide = g.pivot(index="key", columns="edge", values="relative")
        diff = 100 * (wide["object"] - wide["control"])
        mean, lo, hi = interval(diff)
        out.append({"layer": layer, "object - control (points of relative change)": mean, "95% CI": f"[{lo:.2f}, "
                    f"{hi:.2f}]", "share object drop > control drop": float((diff < 0).mean()), "n": len(diff)})
    return pd.DataFrame(out)


# ---------------------------------------------------------------- lens and attention maps


def lens_rows(vlm, items) -> pd.DataFrame:
    """Per example and site: the asked shape word on the object's patches vs the other image tokens (LLaVA), or on
    the image tokens at all (Q-Former queries, which cover no patch)."""
    rows = []
    for key, shape, ex, absent in tqdm(items, desc=f"lens {vlm.name}", leave=False):
        lens = logit_lens(vlm, ex, ["lm.input", "lm.hidden"], tokens="image", answer=shape, k=5)
        other = logit_lens(vlm, ex, ["lm.input", "lm.hidden"], tokens="image", answer=absent, k=5)
        positions = [int(p) for p in lens.data.coords["position"].values]
        on = np.array([p in set(ex.groups["lm"].get("object", positions)) for p in positions])
        sites = [("input", 0)] + [("hidden", layer) for layer in range(lens.data.sizes["layer"])]  # input.L+1 = hidden.L
        for comp, layer in sites:
            top1 = lens.hits([shape], comp, top=1).values[layer]
            top5 = lens.hits([shape], comp, top=5).values[layer]
            prob = lens.data.sel(component=comp, quantity="prob", layer=layer).values
            rank = lens.data.sel(component=comp, quantity="rank", layer=layer).values
            absent_rank = other.data.sel(component=comp, quantity="rank", layer=layer).values
            row = {"key": key[1], "site": f"lm.{comp}.{layer}", "top1 on object": top1[on].mean(),
                   "top5 on object": top5[on].mean(), "any object patch top1": float(top1[on].any()),
                   "median rank on object": float(np.median(rank[on])),
                   "absent top5 on object": other.hits([absent], comp, top=5).values[layer][on].mean(),
                   "absent median rank on object": float(np.median(absent_rank[on]))}
            if not on.all():
                row |= {"top1 off object": top1[~on].mean(), "median rank off object": float(np.median(rank[~on])),
                        "auroc": auroc(prob, on)}
            rows.append(row)
    return pd.DataFrame(rows)


def lens_table(frame: pd.DataFrame) -> pd.DataFrame:
    out = []
    patches = "auroc" in frame
    for site, g in frame.groupby("site", sort=False):
        where = "object patches" if patches else "image tokens"
        row = {"site": site, f"shape word top-1 on {where}": g["top1 on object"].mean()}
        if patches:
            row["top-1 on other image tokens"] = g["top1 off object"].mean()
        row |= {f"top-5 on {where}": g["top5 on object"].mean(),
                "absent shape's word top-5 there": g["absent top5 on object"].mean(),
                "examples with one of them at top-1": g["any object patch top1"].mean()}
        if patches:
            mean, lo, hi = interval(g["auroc"])
            row |= {"median rank on / off object": f"{g['median rank on object'].median():.0f} / "
                                                   f"{g['median rank off object'].median():.0f}",
                    "AUROC of P(shape word)": mean, "95% CI": f"[{lo:.3f}, {hi:.3f}]"}
        else:
            row["median rank (absent shape's word)"] = (f"{g['median rank on object'].median():.0f} "
                                                       f"({g['absent median rank on object'].median():.0f})")
        out.append({**row, "n": len(g)})
    return pd.DataFrame(out)


def attention_rows(vlm, items, tower: str = "lm", component: str = "attn", query: str = "last") -> pd.DataFrame:
    """AUROC against the object's patches of the query's attention over the image, per layer (and rollout)."""
    rows = []
    for key, shape, ex, _ in tqdm(items, desc=f"attention {vlm.name} {tower}.{component}", leave=False):
        maps = attention_maps(vlm, ex, tower, component, query=query)
        keys = maps.attrs["keys_tower"]
        image = ex.groups[keys]["image"]
        on = np.array([p in set(ex.groups[keys]["object"]) for p in image])
        for layer in maps.data.coords["layer"].values:
            rows.append({"key": key[1], "map": f"{tower}.{component} layer {int(layer)}, heads averaged",
                         "auroc": auroc(maps.mean_heads().sel(layer=layer).values[image], on)})
        if "rollout" in maps.attrs:
            rows.append({"key": key[1], "map": "rollout", "auroc": auroc(maps.rollout().isel(layer=-1).values[image],
                                                                         on)})
    return pd.DataFrame(rows)


def attention_table(frame: pd.DataFrame, query: str) -> pd.DataFrame:
    out = []
    for name, g in frame.groupby("map", sort=False):
        mean, lo, hi = interval(g["auroc"])
        out.append({f"attention from {query} (correlational)": name, "AUROC vs object patches": mean,
                    "95% CI": f"[{lo:.3f}, {hi:.3f}]", "n": len(g)})
    return pd.DataFrame(out)


def summary(frames: dict, tower: str, target: str) -> list[str]:
    """The findings in words, from the same frames as the tables."""
    ko = frames["knockout"]
    diff = object_vs_control(ko).set_index("layer")
    read = int(diff.iloc[:, 0].idxmin())
    at = ko[ko["layer"] == read]
    obj, ctl = (interval(100 * at[at["edge"] == e]["relative"]) for e in ("object", "control"))
    rest = diff.drop(index=read).iloc[:, 0].abs().max() if len(diff) > 1 else float("nan")
    lines = [f"- Knockout ({tower}, one layer at a time): cutting object -> {target} at layer {read} changes P(yes) by "
             f"{obj[0]:.1f}% [{obj[1]:.1f}, {obj[2]:.1f}], cutting as many other image tokens -> {target} by "
             f"{ctl[0]:.2f}% [{ctl[1]:.2f}, {ctl[2]:.2f}]: object minus control {diff.iloc[:, 0][read]:.1f} points "
             f"{diff.iloc[:, 1][read]}, the object cut hurting more in {100 * diff.iloc[:, 2][read]:.0f}% of examples. "
             f"At the other layers the difference is at most {rest:.2f} points."]
    flow = frames.get("knockout_lm", ko)
    zhang = {e: interval(100 * flow[(flow["layer"] == 0) & (flow["edge"] == e)]["relative"])
             for e in ("image->last", "image->question", "question->last")}
    lines.append("- Information flow at LM layer 0 (Zhang et al.'s edges): " + ", ".join(
        f"{e} {m:.1f}% [{lo:.1f}, {hi:.1f}]" for e, (m, lo, hi) in zhang.items()) + ".")
    lens = frames["lens"]
    on = lens.groupby("site")["top1 on object"].mean()
    if "auroc" in lens:
        off = lens.groupby("site")["top1 off object"].mean()
        au = lens.groupby("site")["auroc"].mean()
        verdict = "does not decode" if on.max() < 0.1 and au.max() < 0.6 else "partly decodes"
        lines.append(f"- Logit lens: it {verdict} the shape word on the object's patches. The shape word is the top "
                     f"token of at most {100 * on.max():.1f}% of the object's patches at any site (on other image "
                     f"tokens: at most {100 * off.max():.1f}%), and P(shape word) ranks the object's patches at "
                     f"AUROC {au.min():.2f} to {au.max():.2f} across sites (0.5 = chance).")
    else:
        top5 = lens.groupby("site")[["top5 on object", "absent top5 on object"]].mean()
        lines.append(f"- Logit lens on the Q-Former queries in the LM: the asked shape word is among the top 5 tokens of "
                     f"up to {100 * top5['top5 on object'].max():.0f}% of query positions (a shape absent from the "
                     f"scene: up to {100 * top5['absent top5 on object'].max():.0f}%); the queries also read the "
                     "question inside the Q-Former, so this need not come from the image.")
    maps = frames["attention"].groupby("map", sort=False)["auroc"].mean()
    lines.append(f"- Attention maps (correlational): the best map, {maps.idxmax()}, ranks the object's patches at AUROC "
                 f"{maps.max():.2f}; where a query looks is not what the answer depends on; the knockout rows measure that.")
    return lines + [""]


# ---------------------------------------------------------------- organisms


def refusals(vlm, ex) -> list[str]:
    """The methods that do not apply to this organism, with the library's reasons."""
    out = []
    for what, run in [("knockout lm.attn", lambda: knockout(vlm, ex, progress=False)),
                      ("knockout text.xattn", lambda: knockout(vlm, ex, [("image", "question")], "text", "xattn",
                                                               progress=False)),
                      ("logit lens lm.hidden", lambda: logit_lens(vlm, ex)),
                      ("attention maps vision.attn", lambda: attention_maps(vlm, ex, "vision", query="image"))]:
        try:
            run()
            out.append(f"{what}: runs")
        except VLMInterpError as err:
            out.append(f"{what}: {type(err).__name__}: {err}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=120)
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    parser.add_argument("--control-seed", type=int, default=0)
    parser.add_argument("--llava", default="zoo:shapes-llava")
    parser.add_argument("--instructblip", default="zoo:shapes-instructblip")
    parser.add_argument("--blip", default="zoo:shapes-blip")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started, out, record, text = time.time(), Path(args.out), {}, []
    command = "python scripts/methods.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text += ["# Knockout, logit lens and attention maps: ground truth on the shapes-world organisms", "",
             f"Reproduce: `{command}` (vlm-interp at transformers {__import__('transformers').__version__}, "
             f"torch {torch.__version__}; {datetime.date.today().isoformat()}).", "",
             f"Held-out scenes `world.scene(({args.seed}, i))` (the zoo's evaluation seed); one positive existence "
             "question per scene about an object whose shape occurs once, skipped when the model answers otherwise. "
             "Metric: P(yes), first answer token. Relative change = (P cut - P uncut) / P uncut. Intervals: 95% "
             f"percentile bootstrap over examples. Control tokens: seed `[{args.control_seed}, {args.seed}, i]`.", ""]

    for name, model, tower, component, target in [("llava", args.llava, "lm", "attn", "last"),
                                                  ("instructblip", args.instructblip, "qformer", "xattn", "image")]:
        vlm = vi.load(model)
        items, skipped = select(vlm, world_for(model), args.n, args.seed, 20 * args.n)
        text += [f"## {model} ({vlm.family})", "",
                 f"Checkpoint sha256 `{checkpoint_hash(model)}`. {len(items)} examples; skipped: "
                 + ", ".join(f"{k}: {v}" for k, v in skipped.items()) + ".", ""]
        findings = len(text)  # the findings in words go here, before the tables
        frames = {"knockout": knockout_rows(vlm, items, args.control_seed, tower, component, target)}
        if tower != "lm":
            frames["knockout_lm"] = knockout_rows(vlm, items, args.control_seed, "lm", "attn", "last")
        main_table = object_vs_control(frames["knockout"])
        text += [f"### Knockout: object -> {target} vs control -> {target} ({tower}.{component}, one layer at a time)",
                 "", markdown_table(main_table), markdown_table(knockout_table(frames["knockout"]))]
        if "knockout_lm" in frames:
            text += ["### Knockout in the LM (queries are the image tokens)", "",
                     markdown_table(knockout_table(frames["knockout_lm"]))]
        frames["lens"] = lens_rows(vlm, items)
        query = "last" if tower == "lm" else "image"
        frames["attention"] = attention_rows(vlm, items, tower, component, query)
        text += ["### Logit lens over the image tokens: the asked shape word" + (" on the object's own patches"
                 if tower == "lm" else " on the Q-Former queries in the LM (they cover no patch)"), "",
                 markdown_table(lens_table(frames["lens"])),
                 f"### Attention maps of {tower}.{component} (correlational), same examples", "",
                 markdown_table(attention_table(frames["attention"], f"the {query} token(s)"))]
        text[findings:findings] = summary(frames, tower, target)
        record[model] = {"sha256": checkpoint_hash(model), "skipped": skipped, "n": len(items),
                         **{k: f.to_dict(orient="records") for k, f in frames.items()}}
    blip = vi.load(args.blip)
    scene = world_for(args.blip).scene((args.seed, 0))
    ex = blip.prepare(scene.pil(), existence_question(scene.objects[0].shape), answer="yes",
                      region=scene.objects[0].mask)
    reasons = refusals(blip, ex)
    text += [f"## {args.blip} (blip)", "", f"Checkpoint sha256 `{checkpoint_hash(args.blip)}`. What applies:", ""]
    text += [f"- {r}" for r in reasons] + [""]
    record[args.blip] = {"sha256": checkpoint_hash(args.blip), "refusals": reasons}
    text += [f"Runtime {time.time() - started:.0f} s at {args.threads} thread(s).", ""]
    record["command"], record["runtime_s"] = command, time.time() - started
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "methods.md", "\n".join(text))
    atomic_write(out / "methods.json", json.dumps(record, default=float))
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
