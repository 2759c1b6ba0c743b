"""Hallucination evaluation: POPE, CHAIR and side-by-side comparison across models and interventions."""

from .chair import Vocabulary, chair_metrics, chair_scores
from .compare import Comparison, compare
from .stats import binary_metrics, binary_metrics_with_ci, bootstrap_ci, mcnemar
from .pope import PopeItem, pope_table, read_pope, run_pope, run_pope_sharded

__all__ = [
    "Vocabulary", "chair_metrics", "chair_scores", "Comparison", "compare", "binary_metrics",
    "binary_metrics_with_ci", "bootstrap_ci", "mcnemar", "PopeItem", "pope_table", "read_pope", "run_pope",
    "run_pope_sharded",
]
