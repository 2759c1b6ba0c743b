"""benchmarks/gpu_check.py --small: the GPU check's code runs in the suite at toy size on CPU, so it cannot rot."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_small_runs_and_reports_every_ratio(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    report = gpu_check.main(["--small", "--out", str(tmp_path / "report.json")])
    assert (tmp_path / "report.json").exists()
    assert report["device"] == "cpu" and report["self_check"]["applies"]
    assert report["self_check"]["error_over_tolerance"] < 1
    trace = report["trace"]
    assert trace["traced_layers"] == [1, 3] and trace["full_grid_cells"] == 3 * 4 * trace["tokens"]
    assert trace["max_abs_diff_engine_vs_loop"] < 1e-5  # the engine's cells equal the plain loop's
    assert math.isfinite(trace["engine_vs_loop"]) and trace["engine_vs_loop"] > 0
    for name in ("modulate 8 heads", "VHR (alpha 2)", "IRI (attn, half the layers)"):
        assert math.isfinite(report["generate"][f"{name}: time vs plain"])
    pope = report["pope"]
    assert pope["same_logit_answer"] == pope["same_generation"] == pope["questions"] > 0
