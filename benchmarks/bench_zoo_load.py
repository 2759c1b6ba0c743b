"""Time loading each shipped organism through the ordinary path (after transformers' one-time imports).

Run: python benchmarks/bench_zoo_load.py
"""

from __future__ import annotations

import time

import vlm_interp as vi
from vlm_interp.zoo import ORGANISM_DIR


def main() -> None:
    names = sorted(p.name for p in ORGANISM_DIR.glob("*") if (p / "config.json").exists())
    for name in names:
        t0 = time.perf_counter()
        vi.load(f"zoo:{name}")  # first load also imports the model family's transformers modules
        t1 = time.perf_counter()
        runs = [time.perf_counter()]
        for _ in range(3):
            vi.load(f"zoo:{name}")
            runs.append(time.perf_counter())
        warm = min(b - a for a, b in zip(runs, runs[1:]))
        print(f"{name:22s} first load {t1 - t0:6.2f} s (with imports)   warm load {warm:6.3f} s")


if __name__ == "__main__":
    main()
