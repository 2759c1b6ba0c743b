"""The threshold-shift diagnostic of scripts/threshold_baseline.py, on hand-made answer files."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "threshold_baseline.py"
spec = importlib.util.spec_from_file_location("threshold_baseline", SCRIPT)
tb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tb)


def _row(split: str, label: str, margin: float) -> dict:
    p_yes = 1 / (1 + math.exp(-margin))  # log p_yes - log p_no == margin
    return {"split": split, "label": label, "p_yes": p_yes, "p_no": 1 - p_yes}


def _write(folder: Path, rows: list[dict]) -> None:
    folder.mkdir(parents=True)
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_shifted_threshold_matches_recall_and_counts_hallucinations(tmp_path, capsys):
    # unmodified: random positives at margins 1..4, negatives -1 and 0.5; adversarial negatives 0.2, 0.6, 2.0
    base = ([_row("random", "yes", m) for m in (1.0, 2.0, 3.0, 4.0)] + [_row("random", "no", m) for m in (-1.0, 0.5)]
            + [_row("adversarial", "yes", 3.0)] + [_row("adversarial", "no", m) for m in (0.2, 0.6, 2.0)])
    # intervened: recall 3/4 on random, 1/3 "yes" on adversarial negatives
    damp = ([_row("random", "yes", m) for m in (-0.5, 2.0, 3.0, 4.0)] + [_row("random", "no", -1.0)] * 2
            + [_row("adversarial", "yes", 3.0)] + [_row("adversarial", "no", m) for m in (-0.2, -0.6, 2.0)])
    _write(tmp_path / "zoo_m", base)
    _write(tmp_path / "zoo_m_damp_1", damp)
    assert tb.rates(base, "random", 0.0) == (1.0, 0.5)
    t = tb.matching_threshold(base, "random", 0.75)
    assert 1.0 <= t < 2.0  # a threshold that drops the margin-1 positive only
    assert tb.rates(base, "adversarial", t) == (1.0, pytest.approx(1 / 3))  # only the 2.0 negative stays "yes"
    assert tb.main([str(tmp_path)]) == 0
    line = [s for s in capsys.readouterr().out.splitlines() if s.startswith("| m_damp_1")][0]
    assert line.split(" | ")[1:4] == ["75.0%", "33.3%", "33.3%"]


def test_needs_exactly_one_unmodified_system(tmp_path):
    _write(tmp_path / "zoo_a", [_row("random", "yes", 1.0)])
    _write(tmp_path / "zoo_b", [_row("random", "yes", 1.0)])
    with pytest.raises(ValueError, match="one unmodified system"):
        tb.main([str(tmp_path)])
