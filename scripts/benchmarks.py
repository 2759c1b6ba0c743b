"""Interventions on the organisms across POPE, AMBER and MME (built-in shapes-world sets), with the threshold diagnostic.

    python scripts/benchmarks.py [--organisms shapes-llava] [--work DIR] [--images 20]

Systems: the unmodified organism, VCD (alpha 1, beta 0.1, noise step 500), PAI (alpha 0.5, gamma 1.1 in the
paper's terms, layers from 2), VHR (alpha 2) and the head
modulations chosen for results/interventions.md (their ``scale:`` specs, read from results/interventions.json).
Every answer is kept under WORK (resumable). Writes results/benchmarks.md and results/benchmarks.json.
For every intervened system and yes/no benchmark part, the shifted-threshold diagnostic moves the unmodified
model's threshold on log p(yes) - log p(no) until its recall on the part's "yes" questions equals the
system's, and reads off its rate of "yes" to the "no" questions (first-token answers, as threshold_baseline.py).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import sys
from pathlib import Path

import pandas as pd

import vlm_interp as vi
from vlm_interp.files import atomic_write
from vlm_interp.hallucination.compare import markdown_table, slug
from vlm_interp.hallucination.pope import load_results
from vlm_interp.hallucination.suite import compare_benchmarks
from vlm_interp.interventions import from_spec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from threshold_baseline import matching_threshold, rates  # noqa: E402

HEADS = ("heads-damp(4)",)


def systems(name: str, only: list[str] | None = None) -> dict[str, object]:
    specs = json.loads((ROOT / "results" / "interventions.json").read_text())["organisms"][name]["specs"]
    out = {"vcd(1)": "vcd:alpha=1", "pai(0.5)": "pai:alpha=0.5", "vhr(2)": "vhr:alpha=2"}
    out.update({k: specs[k] for k in HEADS if k in specs and specs[k].startswith("scale:")})
    if only is not None:
        missing = sorted(set(only) - set(out))
        if missing:
            raise SystemExit(f"unknown systems {missing}; choose from {sorted(out)}")
        out = {k: v for k, v in out.items() if k in only}
    return {k: from_spec(v) for k, v in out.items()}


def sha256(folder: Path) -> str:
    weights = sorted(folder.glob("*.safetensors"))
    digest = hashlib.sha256()
    for w in weights:
        digest.update(w.read_bytes())
    return digest.hexdigest()


def diagnostic(work: Path, base: str, others: list[str]) -> pd.DataFrame:
    """Per intervened system and yes/no part: recall, hallucination, and the shifted unmodified model's."""
    rows = []
    for part in ("pope", "amber", "mme"):
        base_rows = load_results(work / slug(base) / part / "results.jsonl").to_dict("records")
        for other in others:
            mine = load_results(work / slug(other) / part / "results.jsonl").to_dict("records")
            for split, recall_on, hall_on in ([("random→adversarial", "random", "adversarial")] if part == "pope"
                                              else [("all", None, None)]):
                def pick(rs, s):
                    return [dict(r, split="x") for r in rs if s is None or r["split"] == s]
                recall, _ = rates(pick(mine, recall_on), "x", 0.0)
                _, hallucination = rates(pick(mine, hall_on), "x", 0.0)
                if not any(r["label"] == "yes" for r in pick(base_rows, recall_on)):
                    continue
                t = matching_threshold(pick(base_rows, recall_on), "x", recall)
                base_recall, _ = rates(pick(base_rows, recall_on), "x", t)
                _, shifted = rates(pick(base_rows, hall_on), "x", t)
                rows.append({"system": other, "benchmark": part, "split": split, "recall": recall,
                             "hallucination": hallucination, "shifted_recall": base_recall,
                             "shifted_hallucination": shifted, "threshold": t,
                             "beats_threshold": hallucination < shifted})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--organisms", nargs="+", default=["shapes-llava"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/vlm-interp-benchmarks"))
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--systems", nargs="+", help="only these interventions (default: all)")
    args = parser.parse_args(argv)
    report, lines = {}, []
    for name in args.organisms:
        vlm = vi.load(f"zoo:{name}")
        work = args.work / name
        interventions = systems(name, args.systems)
        result = compare_benchmarks([vlm], ["pope", "amber", "mme"], out=work, interventions=interventions,
                                    n_images=args.images, splits=("random", "adversarial"), n_boot=1000)
        others = [f"{vlm.name} + {k}" for k in interventions]
        diag = diagnostic(work, vlm.name, others)
        folder = vi.zoo.organism_path(name) if hasattr(vi, "zoo") else None
        report[name] = {"checkpoint_sha256": sha256(Path(folder)) if folder else None,
                        "table": result.table.to_dict("records"), "tests": result.tests.to_dict("records"),
                        "threshold": diag.to_dict("records")}
        atomic_write(ROOT / "results" / f"benchmarks-{name}.png", (work / "compare.png").read_bytes())
        table = result.table
        head = table[table["split"].isin(["all", "adversarial", "random", "generative"])
                     & table["metric"].isin(["accuracy", "f1", "yes_ratio", "score", "chair", "cover", "hal", "cog"])]
        tests = result.tests
        base_tests = tests[(tests["a"] == vlm.name) & tests["split"].isin(["all"])]
        lines += [f"## {name}", "", f"checkpoint sha256 {report[name]['checkpoint_sha256']}", "",
                  markdown_table(head.drop(columns=["system"])), "",
                  "Paired tests against the unmodified model (exact McNemar, per benchmark part):", "",
                  markdown_table(base_tests.drop(columns=["a"]), floatfmt=".4f"), "",
                  "Shifted-threshold diagnostic (first-token answers):", "",
                  markdown_table(diag, floatfmt=".3f"), ""]
    report["command"] = "python scripts/benchmarks.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report["date"] = datetime.date.today().isoformat()
    atomic_write(ROOT / "results" / "benchmarks.json", json.dumps(report, indent=1, default=str))
    atomic_write(ROOT / "results" / "benchmarks-tables.md", "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
