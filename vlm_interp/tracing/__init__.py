"""Causal tracing: batched activation and head patching with labelled results."""

from .causal import trace
from .engine import Cell, capture, run_cells
from .metrics import Metric, make_metric, recovery_rate
from .results import Trace

__all__ = ["trace", "Cell", "capture", "run_cells", "Metric", "make_metric", "recovery_rate", "Trace"]
