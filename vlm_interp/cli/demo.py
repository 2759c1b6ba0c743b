"""vlm-interp demo: the main job on an embedded organism."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import DEFAULT_MODEL


def _demo(args: argparse.Namespace) -> int:
    """Render a shapes scene, ask the model about one object, trace where the answer comes from."""
    import numpy as np

    import vlm_interp as vi
    from vlm_interp.corruptions import noise
    from vlm_interp.figures import save_object_overlay
    from vlm_interp.runs import report_run, save_example, write_manifest
    from vlm_interp.tracing import trace
    from vlm_interp.tracing.plot import plot_image_effects, plot_trace
    from vlm_interp.zoo.organisms import ORGANISM_WORLD
    from vlm_interp.zoo.shapes import World
    from vlm_interp.zoo.tasks import existence_question

    vlm = vi.load(args.model)
    scene = World(ORGANISM_WORLD).scene(args.seed)
    target = scene.objects[0]
    question = existence_question(target.shape)
    ex = vlm.prepare(scene.pil(), question, answer="yes", region=target.mask)
    print(vlm.adapter.describe())
    print(f"\nscene (seed {args.seed}): " + ", ".join(f"{o.color} {o.shape}" for o in scene.objects))
    print(f"question: {question}   generated answer: {vlm.generate(ex, max_new_tokens=3)!r}")
    for answer in ("yes", "no"):
        print(f"  P({answer}) = {vlm.score(ex, answer).prob:.4f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = [save_object_overlay(ex, "vision", out / "object_patches.png", title=question)]
    # Causal tracing: noise (3 sd) on the vision tower's patch embeddings, then restore each LM site at each token:
    # the residual stream entering every layer (lm.input.0 is the LM's input embeddings), each layer's output, its
    # attention and its MLP. (Noise on the LM's image embeddings leaves shapes-llava's answer in place: its LM reads
    # a bounded scene code, and noise there does not look like an empty image.)
    corrupt = noise(vlm, ex, scale="3sd", tokens="image", place="patches", seed=0)
    tr = trace(vlm, ex, corrupt, components=["lm.input", "lm.hidden", "lm.attn", "lm.mlp"], tokens="each")
    print(f"\nP(yes) clean {tr.attrs['clean_score']:.4f}, patch embeddings noised {tr.attrs['corrupt_score']:.4f}")
    lm = ex.groups["lm"]
    if tr.total_effect > 0 and lm.get("object"):
        every = tr.rr().transpose("component", "layer", "position")
        rr = every.sel(component="input").values
        image_pos, objects = lm["image"], set(lm["object"])
        for layer in range(rr.shape[0]):
            values = rr[layer, image_pos]
            top = [image_pos[k] for k in np.argsort(-values)[:len(objects)]]
            hit = len(objects & set(top)) / len(objects)
            print(f"  entering lm layer {layer}: restoring single image tokens recovers up to {values.max():.2f} of "
                  f"the answer; {hit:.0%} of the strongest tokens lie on the {target.shape}")
        c, layer, position = np.unravel_index(int(np.nanargmax(every.values)), every.shape)
        print(f"  strongest single cell: lm.{every.coords['component'].values[c]} layer {layer} at position "
              f"{position} ({ex.tokens[position]!r}), recovers {float(every.values[c, layer, position]):.2f}")
        files.append(plot_image_effects(tr, ex, out / "image_effects.png"))
    files.append(plot_trace(tr, out / "trace.png"))
    files.append(tr.save(out / "trace.json"))
    # the heads of every LM layer, restored at the image, the object and the last token
    heads = trace(vlm, ex, corrupt, components=["lm.head"], tokens=["image", "object", "last"] if lm.get("object")
                  else ["image", "last"], progress=False)
    files.append(heads.save(out / "trace_heads.json"))
    files.append(save_example(ex, out))
    write_manifest(out, "demo", vlm=vlm, inputs={"image": f"shapes-world scene, seed {args.seed}",
                                                 "question": question, "answer": "yes", "object": target.shape},
                   corruption=tr.attrs["corruption"], settings={"components": list(tr.data.coords["component"].values),
                                                                "tokens": "each", "metric": "prob"},
                   results=[{"file": "trace.json", "kind": "trace", "title": "Causal trace of every LM site"},
                            {"file": "trace_heads.json", "kind": "trace", "title": "Causal trace of the LM's heads"}],
                   files=files + [out / "image.png"])
    print("\nwrote " + ", ".join(str(f) for f in files))
    print(f"report: {report_run(out)}")
    return 0


def add(sub) -> None:
    """Register this group's commands on the ``vlm-interp`` subparsers."""
    demo = sub.add_parser("demo", help="the main job on an embedded default model: ask about a rendered scene")
    demo.add_argument("--model", default=DEFAULT_MODEL, help=f"model to load (default {DEFAULT_MODEL})")
    demo.add_argument("--seed", type=int, default=1, help="seed of the rendered shapes scene")
    demo.add_argument("--out", default="vlm-interp-demo", help="folder for the pictures, results and report.html")
    demo.set_defaults(run=_demo)
