"""Per-token generation time with each intervention against plain generation, measured in one run.

Run: python benchmarks/bench_generate.py [--model zoo:shapes-llava] [--tokens 32] [--repeats 5]

Every system generates the same number of new tokens (``min_new_tokens`` forces it) for the
same prompt; systems are interleaved in each repeat so machine noise hits all alike. The best
(minimum) time over repeats is the headline, since other processes only ever add time; the median
is printed next to it. VHR's one-time head choice at the first step is included.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

import vlm_interp as vi
from vlm_interp.interventions import InjectionPlan, inject, modulate_heads, vhr
from vlm_interp.zoo.organisms import ORGANISM_WORLD
from vlm_interp.zoo.shapes import World
from vlm_interp.zoo.tasks import CAPTION_PROMPT


def systems(vlm) -> dict:
    """Plain generation and one representative setting of each intervention."""
    n_layers, n_heads = vlm.adapter.n_layers["lm"], vlm.adapter.n_heads["lm"]
    scales = {f"lm.head.{l}.{h}": 1.0 + 0.1 * ((l + h) % 3 - 1) for l in range(n_layers) for h in range(n_heads)}
    last = n_layers - 1
    plan = InjectionPlan({"attn": {last: {0: 0.7, 1: 0.3}}, "mlp": {last: {0: 0.7, 1: 0.3}}}, {"attn": 0.5, "mlp": 0.5})
    return {
        "plain": contextlib.nullcontext,
        "modulate_heads (all heads)": lambda: modulate_heads(vlm, scales),
        "vhr (alpha 2)": lambda: vhr(vlm, alpha=2.0),
        "inject (IRI, attn+mlp)": lambda: inject(vlm, plan),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:shapes-llava")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    vlm = vi.load(args.model)
    scene = World(ORGANISM_WORLD).scene(3)
    ex = vlm.prepare(scene.pil(), CAPTION_PROMPT)
    runs = systems(vlm)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for make in runs.values():  # warm-up
        with make():
            vlm.generate(ex, max_new_tokens=2, min_new_tokens=2)
    for _ in range(args.repeats):
        for name, make in runs.items():
            with torch.no_grad(), make():
                start = time.perf_counter()
                vlm.generate(ex, max_new_tokens=args.tokens, min_new_tokens=args.tokens)
                times[name].append((time.perf_counter() - start) / args.tokens)
    best = {name: min(values) for name, values in times.items()}
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"{args.model}: {args.tokens} new tokens, {args.repeats} interleaved repeats (best / median)")
    for name in times:
        print(f"  {name:28s} {1000 * best[name]:7.3f} / {1000 * median[name]:7.3f} ms/token   ratio to plain "
              f"{best[name] / best['plain']:5.3f} ({100 * (best[name] / best['plain'] - 1):+.1f}%) / "
              f"{median[name] / median['plain']:5.3f}")

if __name__ == "__main__":
    main()
