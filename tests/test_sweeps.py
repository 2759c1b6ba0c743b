"""Sweeps over processes: POPE (the pope command), dataset tracing (the trace-dataset command), head scoring and the
localisation study give the same results shared by two accelerate processes on CPU as in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

import vlm_interp as vi

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import sharded_sweeps  # noqa: E402


def test_two_processes_equal_one(tmp_path):
    from vlm_interp.hallucination.pope import load_results
    from vlm_interp.zoo.organisms import ORGANISM_WORLD
    from vlm_interp.zoo.pope_set import write_pope
    from vlm_interp.zoo.shapes import World

    pope_folder = tmp_path / "pope_questions"
    write_pope(World(ORGANISM_WORLD), pope_folder, n_images=4, seed=3, per_image=2)
    single = sharded_sweeps.run(tmp_path / "single", pope_folder)
    env = {**os.environ, "PYTHONPATH": str(Path(vi.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(HERE / "sharded_sweeps.py"), str(tmp_path / "sharded"), str(pope_folder)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "trace dataset (rank 1)" in run.stderr  # the second process traced its share
    parts = sorted((tmp_path / "sharded" / "pope" / "parts").glob("rank*.jsonl"))
    assert [p.name for p in parts] == ["rank0.jsonl", "rank1.jsonl"]
    assert all(len(load_results(p)) > 0 for p in parts)
    key = ["split", "question_id"]
    pd.testing.assert_frame_equal(load_results(tmp_path / "single" / "pope" / "results.jsonl").sort_values(key)
                                  .reset_index(drop=True),
                                  load_results(tmp_path / "sharded" / "pope" / "results.jsonl").sort_values(key)
                                  .reset_index(drop=True))
    sharded = json.loads((tmp_path / "sharded" / "merged.json").read_text())
    assert sharded["traces"] == single["traces"] and len(single["traces"]) == 5  # 4 pairs and the settings record
    np.testing.assert_allclose(sharded["mean_trace"], single["mean_trace"], atol=1e-6, rtol=0)
    assert sharded["head_keys"] == single["head_keys"]
    np.testing.assert_allclose(sharded["heads"], single["heads"], atol=1e-6, rtol=0)
    assert sharded["localisation"] == single["localisation"]
    assert len(single["localisation"]) == 4
