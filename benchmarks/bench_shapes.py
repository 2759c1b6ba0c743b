"""Print how many shapes-world scenes per second this machine renders (a sanity check)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vlm_interp.zoo.shapes import World, WorldConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=2000, help="scenes to render")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    world = World(WorldConfig())
    world.scenes(50, seed=args.seed)  # warm-up
    t0 = time.perf_counter()
    scenes = world.scenes(args.n, seed=args.seed)
    dt = time.perf_counter() - t0
    n_obj = sum(len(s.objects) for s in scenes) / max(len(scenes), 1)
    print(f"{args.n} scenes in {dt:.3f} s: {args.n / dt:,.0f} scenes/s (mean {n_obj:.2f} objects/scene)")


if __name__ == "__main__":
    main()
