"""Is an intervention more than a shifted yes/no threshold? A diagnostic for results/interventions.md.

For each intervened system of an interventions work folder, move the unmodified model's decision threshold
(log p(yes) - log p(no) > t, from its stored per-question answers) until its random-split recall equals the
intervened system's, then compare the hallucination rate (yes-ratio on absent objects) of the two on the
adversarial split. An intervention that only adds a "no" bias matches the shifted threshold; one that
removes hallucination more selectively beats it. The threshold is fitted on the held-out answers, so this
is a diagnostic of what an intervention does, not a competing intervention.

usage: python scripts/threshold_baseline.py WORK/ORGANISM/heldout-N
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

BASE_PREFIX = "zoo_"


def margins(rows: list[dict], split: str, label: str) -> list[float]:
    """log p(yes) - log p(no) of every question of a split with the given gold label."""
    return [math.log(r["p_yes"] + 1e-12) - math.log(r["p_no"] + 1e-12)
            for r in rows if r["split"] == split and r["label"] == label]


def rates(rows: list[dict], split: str, threshold: float) -> tuple[float, float]:
    """(recall, yes-ratio on negatives) when answering yes iff the margin exceeds the threshold."""
    pos, neg = margins(rows, split, "yes"), margins(rows, split, "no")
    return sum(m > threshold for m in pos) / len(pos), sum(m > threshold for m in neg) / len(neg)


def matching_threshold(rows: list[dict], split: str, recall: float) -> float:
    """The threshold at which the rows' recall on the split is closest to ``recall`` (ties: the lowest)."""
    candidates = [0.0] + [m - 1e-6 for m in margins(rows, split, "yes")]
    return min(candidates, key=lambda t: (abs(rates(rows, split, t)[0] - recall), t))


def read(folder: Path) -> list[dict]:
    path = folder / "results.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: pass the heldout-N folder of an interventions work folder")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("heldout", type=Path, help="WORK/ORGANISM/heldout-N folder written by scripts/interventions.py")
    args = parser.parse_args(argv)
    systems = sorted(p for p in args.heldout.iterdir() if p.is_dir() and p.name.startswith(BASE_PREFIX))
    bases = [p for p in systems if all(q.name.startswith(p.name) for q in systems)]  # intervened: NAME_SPEC
    if len(bases) != 1:
        raise ValueError(f"expected one unmodified system in {args.heldout}, found {[p.name for p in bases]}")
    base = read(bases[0])
    print("| system | random recall | adversarial hallucination | unmodified at the same random recall | threshold |")
    print("| --- | --- | --- | --- | --- |")
    for folder in systems:
        if folder == bases[0]:
            continue
        rows = read(folder)
        recall, _ = rates(rows, "random", 0.0)
        _, hallucination = rates(rows, "adversarial", 0.0)
        t = matching_threshold(base, "random", recall)
        _, shifted = rates(base, "adversarial", t)
        print(f"| {folder.name[len(BASE_PREFIX):]} | {100 * recall:.1f}% | {100 * hallucination:.1f}% | "
              f"{100 * shifted:.1f}% | {t:+.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
