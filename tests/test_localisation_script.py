"""scripts/localisation.py: probe sets resume from their saved parts, and the by-kind breakdown."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "localisation.py"
spec = importlib.util.spec_from_file_location("localisation", SCRIPT)
loc = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = loc  # its dataclasses look their module up while the script loads
spec.loader.exec_module(loc)


def _args(tmp_path: Path) -> argparse.Namespace:
    return argparse.Namespace(seed=loc.EVAL_SEED, max_scenes=40, n_boot=50, out=str(tmp_path))


def test_probe_sets_resume_from_saved_parts_and_rerun_when_settings_change(tmp_path):
    calls = []

    def first_patch(vlm, item, ctx):
        """A stand-in probe: 1 on the first image patch, 0 elsewhere."""
        calls.append(item.scene_seed)
        values = np.zeros(len(item.positions))
        values[0] = 1.0
        return {("first patch", "0"): values}

    ctx = loc.Context()
    first = loc.run_model("zoo:shapes-llava", [(first_patch, 3)], _args(tmp_path), ctx)
    assert len(calls) == 3 and len(first["rows"]) == 3
    again = loc.run_model("zoo:shapes-llava", [(first_patch, 3)], _args(tmp_path), ctx)
    assert len(calls) == 3, "a finished probe set was recomputed"
    assert again["rows"] == first["rows"]
    loc.run_model("zoo:shapes-llava", [(first_patch, 3)], _args(tmp_path), loc.Context(scale="10sd"))
    assert len(calls) == 6, "changed settings must not reuse the saved rows"


def test_by_kind_groups_the_best_probes_rows_by_object_kind():
    world = loc.world_for("zoo:shapes-llava")
    seeds = [[loc.EVAL_SEED, i] for i in range(12)]
    rows, expected = [], {}
    for n, seed in enumerate(seeds):
        scene = world.scene(tuple(seed))
        obj = scene.objects[0]
        auroc = 0.5 + 0.04 * n
        rows.append({"example": n, "scene_seed": seed, "shape": obj.shape, "probe": "p", "layer": "1", "auroc": auroc,
                     "auroc_partner": 1 - auroc if n % 2 else None})
        rows.append({"example": n, "scene_seed": seed, "shape": obj.shape, "probe": "p", "layer": "2", "auroc": 0.0})
        expected.setdefault(("objects in scene", str(len(scene.objects))), []).append(auroc)
        expected.setdefault(("object", "weak" if obj.weak else "not weak"), []).append(auroc)
    summary = loc.summarise(rows, n_boot=20, seed=0)
    out = loc.by_kind(rows, world, summary)
    assert {r["layer"] for r in out} == {"1"}  # the best layer of the only causal probe
    assert set(expected) <= {(r["kind"], r["value"]) for r in out}
    for r in out:
        if (r["kind"], r["value"]) in expected:
            want = expected[(r["kind"], r["value"])]
            assert r["n"] == len(want) and r["mean"] == np.mean(want)
            assert r["share_at_least_0.9"] == np.mean(np.asarray(want) >= 0.9)
    assert sum(r["n"] for r in out if r["kind"] == "partner") == len(seeds)
    partner = [r for r in out if r["kind"] == "AUROC against" and r["value"].startswith("the partner")]
    assert len(partner) == 1 and partner[0]["n"] == 6
    assert partner[0]["mean"] == pytest.approx(np.mean([1 - (0.5 + 0.04 * n) for n in range(1, 12, 2)]))
