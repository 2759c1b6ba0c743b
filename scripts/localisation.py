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
    accelerate launch --num_processes 4 scripts/localisation.py --limit 100   # examples shared by 4 processes

(``--llava`` / ``--instructblip`` take other organisms, such as retrained ones; ``--instructblip none``
skips it.) The study's examples, maps and scores come from ``vlm_interp.zoo.localisation``; the probes,
the resumable runs and the report are here.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import platform
import shutil
import sys
import time
from dataclasses import asdict
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
from vlm_interp.parallel import process_rank, share, wait
from vlm_interp.hallucination.compare import markdown_table, slug
from vlm_interp.tracing import trace
from vlm_interp.tracing.baselines import patch_feature_ablation, pixel_integrated_gradients
from vlm_interp.zoo.evaluate import EVAL_SEED
from vlm_interp.zoo.localisation import (Context, Item, Maps, best_layers, by_kind, score_example, select, summarise,
                                         trace_maps, world_for)

# ---------------------------------------------------------------- probes


def llava_probes(vlm, item: Item, ctx: Context) -> Maps:
    """The main causal-tracing probes of a LLaVA organism on one example (noise on the image embeddings)."""
    emb = noise(vlm, item.example, scale=ctx.scale, tokens="image", seed=ctx.noise_seed)
    maps = trace_maps(vlm, item, emb, ["lm.hidden", "lm.attn", "lm.mlp"], "restore 1 patch", ctx=ctx)
    maps |= trace_maps(vlm, item, emb, ["lm.hidden", "lm.mlp"], "restore 3x3", neighbourhood=True, ctx=ctx)
    return maps


def llava_explore(vlm, item: Item, ctx: Context) -> Maps:
    """Further LLaVA probes, run on a subset: the noising direction, windows, noise scales."""
    ex = item.example
    emb = noise(vlm, ex, scale=ctx.scale, tokens="image", seed=ctx.noise_seed)
    maps = trace_maps(vlm, item, emb, ["lm.hidden"], "noise 1 patch", direction="noise", ctx=ctx)
    maps |= trace_maps(vlm, item, emb, ["lm.hidden"], "noise 3x3", direction="noise", neighbourhood=True, ctx=ctx)
    maps |= trace_maps(vlm, item, emb, ["lm.mlp"], "restore 1 patch, window 4", window=4, ctx=ctx)
    for scale in ctx.extra.get("scales", ()):
        other = noise(vlm, ex, scale=scale, tokens="image", seed=ctx.noise_seed)
        maps |= trace_maps(vlm, item, other, ["lm.hidden", "lm.mlp"], f"restore 1 patch [{scale} noise]", ctx=ctx)
    return maps


def llava_vision_probes(vlm, item: Item, ctx: Context) -> Maps:
    """LLaVA's vision tower: noise on the CLIP patch embeddings (main scale and 10 sd), restore one patch or a
    3x3 neighbourhood of each vision site."""
    maps: Maps = {}
    for scale in dict.fromkeys((ctx.scale, "10sd")):
        patches = noise(vlm, item.example, scale=scale, tokens="image", place="patches", seed=ctx.noise_seed)
        sites = ["vision.hidden", "vision.attn", "vision.mlp"]
        maps |= trace_maps(vlm, item, patches, sites, f"restore 1 patch [patch-embedding {scale} noise]", ctx=ctx)
        maps |= trace_maps(vlm, item, patches, sites, f"restore 3x3 [patch-embedding {scale} noise]",
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
    maps = trace_maps(vlm, item, patches, ["vision.hidden"], "restore 1 patch", ctx=ctx)
    maps |= trace_maps(vlm, item, patches, ["vision.hidden"], "restore 3x3", neighbourhood=True, ctx=ctx)
    maps |= trace_maps(vlm, item, patches, ["vision.hidden"], "noise 3x3", direction="noise", neighbourhood=True,
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
    maps = trace_maps(vlm, item, patches, ["vision.attn", "vision.mlp"], "restore 1 patch", ctx=ctx)
    maps |= trace_maps(vlm, item, patches, ["vision.hidden"], "noise 1 patch", direction="noise", ctx=ctx)
    return maps


# ---------------------------------------------------------------- scoring and report


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

    Each probe set's rows are kept in ``OUT/localisation-parts``, one file per example, under a fingerprint of
    everything they depend on, so an interrupted or extended study reruns only the examples that are missing;
    under ``accelerate launch`` the examples are shared among the processes."""
    start = time.time()
    vlm = vi.load(model)
    world = world_for(model)
    items, skipped = select(vlm, world, max(limit for _, limit in probes), args.seed, args.max_scenes)
    rows, seconds = [], {}
    for probe, limit in probes:
        part = Path(args.out) / "localisation-parts" / f"{slug(model)}-{probe.__name__}"
        found, seconds[probe.__name__] = score_parts(items[:limit], probe, vlm, ctx, f"{probe.__name__} {model}",
                                                     part, part_key(model, probe, limit, args, ctx))
        rows += found
    summary = summarise(rows, args.n_boot, args.seed)
    return {"model": model, "family": vlm.family, "n_examples": len(items), "skipped": skipped,
            "scenes_seen": sum(skipped.values()) + len(items), "summary": summary, "best": best_layers(summary),
            "by_kind": by_kind(rows, world, summary), "rows": rows, "seconds": round(time.time() - start, 1),
            "seconds_per_probe_set": seconds}


def score_parts(items: list[Item], probe: Callable, vlm, ctx: Context, desc: str, part: Path,
                key: dict) -> tuple[list[dict], float]:
    """Rows of every example (``score_example``) and the seconds they took, each example's kept in ``part/<n>.json``;
    ``part/key.json`` holds what they depend on, and a folder made with another key starts over.

    Under ``accelerate launch`` each process scores its share of the examples (vlm_interp.parallel), then all
    read every example's rows back."""
    rank, world, state = process_rank()
    if rank == 0 and (not (part / "key.json").exists() or json.loads((part / "key.json").read_text()) != key):
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        atomic_write(part / "key.json", json.dumps(key))
    wait(state)
    for n in tqdm(share(range(len(items)), rank, world), desc=desc):
        if not (part / f"{n}.json").exists():
            t = time.time()
            rows = score_example(n, items[n], probe, vlm, ctx)
            atomic_write(part / f"{n}.json", json.dumps({"rows": rows, "seconds": time.time() - t}))
    wait(state)
    saved = [json.loads((part / f"{n}.json").read_text()) for n in range(len(items))]
    return [row for s in saved for row in s["rows"]], round(sum(s["seconds"] for s in saved), 1)


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
    if process_rank()[0] != 0:  # under accelerate launch every process holds the results; the main one writes them
        return 0
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
