"""Sweeps that shard over processes, run alone by tests/test_sweeps.py and under ``accelerate launch`` by it.

``python tests/sharded_sweeps.py OUT POPE_FOLDER`` runs POPE (through the ``pope`` command), dataset
tracing (through ``trace-dataset``), head scoring and the localisation study's probe scoring into
``OUT``; every process writes its share, and the main one writes the merged results to
``OUT/merged.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL = "zoo:shapes-llava"


def localisation_script():
    spec = importlib.util.spec_from_file_location("localisation", ROOT / "scripts" / "localisation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while the script loads
    spec.loader.exec_module(module)
    return module


def first_patch(vlm, item, ctx):
    """A stand-in probe of the localisation study: the first patch's restore effect of the last LM layer."""
    values = np.zeros(len(item.positions))
    values[0] = float(vlm.first_token_logits(item.example).max())
    return {("first patch", "0"): values}


def run(out: Path, pope_folder: Path) -> dict | None:
    import vlm_interp as vi
    from vlm_interp.cli import main
    from vlm_interp.interventions import score_heads
    from vlm_interp.parallel import process_rank
    from vlm_interp.tracing.results import Trace
    from vlm_interp.zoo.calibration import calibration_examples

    main(["pope", "--model", "tiny:llava", "--questions", str(pope_folder), "--out", str(out / "pope")])
    main(["trace-dataset", "--model", MODEL, "--n", "4", "--components", "hidden,mlp", "--out", str(out / "trace")])
    vlm = vi.load(MODEL)
    heads = score_heads(vlm, calibration_examples(vlm, "object", 4), folder=out / "heads", progress=False)
    loc = localisation_script()
    args = argparse.Namespace(seed=loc.EVAL_SEED, max_scenes=40, n_boot=20, out=str(out / "localisation"))
    study = loc.run_model(MODEL, [(first_patch, 4)], args, loc.Context())
    if process_rank()[0] != 0:
        return None
    merged = {"mean_trace": Trace.load(out / "trace" / "mean_trace.json").data.values.tolist(),
              "traces": sorted(p.name for p in (out / "trace" / "traces").glob("*.json")),
              "heads": heads.data.values.tolist(), "head_keys": list(heads.data.coords["example"].values),
              "localisation": study["rows"]}
    (out / "merged.json").write_text(json.dumps(merged))
    return merged


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    run(Path(sys.argv[1]), Path(sys.argv[2]))
