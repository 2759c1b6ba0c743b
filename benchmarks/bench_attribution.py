"""Attribution patching and its integrated-gradients variant against exact tracing on shapes-llava.

For a few shapes-world existence questions (noise on the image embeddings, 3 sd), trace the
full LM hidden/attn/mlp x layer x token grid exactly, with attribution patching and with
integrated patching, all in one run. Prints each method's wall time, its speed ratio against
exact tracing, and its per-component Spearman correlation (and top-10 overlap) with the
exact effects.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import pandas as pd
import torch

import vlm_interp as vi
from vlm_interp.corruptions import noise
from vlm_interp.tracing import agreement, attribution_patching, integrated_patching, trace
from vlm_interp.zoo.organisms import ORGANISM_WORLD
from vlm_interp.zoo.shapes import World
from vlm_interp.zoo.tasks import existence_question

COMPONENTS = ["lm.hidden", "lm.attn", "lm.mlp"]


def examples(vlm, n: int, first_seed: int) -> list[tuple[int, vi.Example, vi.Example]]:
    """``n`` (seed, clean, corrupted) triples: the demo's question about a scene's first object."""
    world, out = World(ORGANISM_WORLD), []
    for seed in range(first_seed, first_seed + n):
        scene = world.scene(seed)
        target = scene.objects[0]
        clean = vlm.prepare(scene.pil(), existence_question(target.shape), answer="yes", region=target.mask)
        out.append((seed, clean, noise(vlm, clean, scale="3sd", tokens="image", seed=seed)))
    return out


def timed(fn, *args, **kw):
    """``fn(*args, **kw)`` and its wall time in seconds."""
    start = time.perf_counter()
    result = fn(*args, **kw)
    return result, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="zoo:shapes-llava")
    ap.add_argument("-n", "--examples", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="first scene seed")
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 16], help="integrated-gradients steps to try")
    ap.add_argument("--batch-size", type=int, default=32, help="rows per patched forward of exact tracing")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids contention on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    vlm = vi.load(args.model)
    rows, tables = [], []
    for seed, clean, corrupt in examples(vlm, args.examples, args.seed):
        exact, t_exact = timed(trace, vlm, clean, corrupt, components=COMPONENTS, tokens="each",
                               batch_size=args.batch_size, progress=False)
        methods = {"attribution": lambda: attribution_patching(vlm, clean, corrupt, components=COMPONENTS)}
        for steps in args.steps:
            methods[f"ig{steps}"] = (lambda s=steps: integrated_patching(vlm, clean, corrupt, components=COMPONENTS,
                                                                        steps=s, progress=False))
        n_cells = int(exact.data.notnull().sum())
        print(f"scene {seed}: {clean.question!r}  P(yes) clean {exact.attrs['clean_score']:.3f} "
              f"noised {exact.attrs['corrupt_score']:.3f}; {n_cells} cells; exact {t_exact:.2f} s")
        rows.append({"seed": seed, "method": "exact", "seconds": t_exact, "speedup": 1.0})
        for name, run in methods.items():
            est, seconds = timed(run)
            table = agreement(est, exact, top_k=10).assign(seed=seed, method=name)
            tables.append(table)
            rows.append({"seed": seed, "method": name, "seconds": seconds, "speedup": t_exact / seconds})
            rho = ", ".join(f"{r.component} {r.spearman:.3f}" for r in table.itertuples())
            print(f"  {name:12s} {seconds:7.2f} s  x{t_exact / seconds:6.1f} faster   Spearman: {rho}")
    times = pd.DataFrame(rows).groupby("method", sort=False)[["seconds", "speedup"]].mean()
    quality = pd.concat(tables).groupby(["method", "component"], sort=False)[["spearman", "pearson", "top_k_overlap"]]
    print(f"\nmean over {args.examples} examples ({args.threads} threads):")
    print(times.round(3).to_string())
    print(quality.mean().round(3).to_string())


if __name__ == "__main__":
    main()
