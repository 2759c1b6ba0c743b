"""Statistics of yes/no answers: the binary metrics of hallucination benchmarks, bootstrap confidence
intervals and McNemar's paired test."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np


def binary_metrics(pred: Sequence[str], gold: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and yes-ratio with 'yes' as the positive class.

    Precision is 0 when nothing is predicted 'yes' (POPE's convention), and every rate of an
    empty input is NaN rather than a made-up number.
    """
    if len(pred) != len(gold):
        raise ValueError(f"{len(pred)} predictions for {len(gold)} labels")
    p = np.array([x == "yes" for x in pred], bool)
    g = np.array([x == "yes" for x in gold], bool)
    tp, fp, fn = int((p & g).sum()), int((p & ~g).sum()), int((~p & g).sum())
    nan = float("nan")
    precision = tp / (tp + fp) if tp + fp else (0.0 if len(p) else nan)
    recall = tp / (tp + fn) if tp + fn else (0.0 if len(p) else nan)
    return {
        "n": len(gold),
        "accuracy": float((p == g).mean()) if len(g) else nan,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else (0.0 if len(p) else nan),
        "yes_ratio": float(p.mean()) if len(p) else nan,
        "yes_ratio_on_negatives": float(p[~g].mean()) if (~g).any() else nan,
    }


def bootstrap_ci(values: Sequence, statistic: Callable[[np.ndarray], float], n_boot: int = 1000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over resamples of ``values`` (rows)."""
    values = np.asarray(values)
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    stats = np.array([statistic(values[rng.integers(0, len(values), len(values))]) for _ in range(n_boot)])
    stats = stats[~np.isnan(stats)]
    if not len(stats):
        return float("nan"), float("nan")
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def binary_metrics_with_ci(pred: Sequence[str], gold: Sequence[str], n_boot: int = 1000,
                           seed: int = 0) -> dict[str, float]:
    """:func:`binary_metrics` plus ``<metric>_lo``/``<metric>_hi`` bootstrap bounds (questions resampled)."""
    out = binary_metrics(pred, gold)
    pairs = np.array(list(zip(pred, gold)), dtype=object).reshape(-1, 2)
    for key in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        lo, hi = bootstrap_ci(pairs, lambda rows, key=key: binary_metrics(rows[:, 0], rows[:, 1])[key],
                              n_boot=n_boot, seed=seed)
        out[f"{key}_lo"], out[f"{key}_hi"] = lo, hi
    return out


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict[str, float]:
    """Exact McNemar test of two systems on the same questions (two-sided binomial on discordant pairs)."""
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    if a.shape != b.shape:
        raise ValueError(f"paired test needs the same questions: {a.shape} vs {b.shape}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = only_a + only_b
    k = min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    return {"only_a": only_a, "only_b": only_b, "p_value": p}
