"""Causal tracing: batched activation and head patching with labelled results."""

from .causal import trace
from .dataset import DatasetTrace, trace_dataset
from .heads import important_heads
from .engine import Cell, capture, run_cells
from .metrics import Metric, make_metric, recovery_rate
from .results import Trace

__all__ = ["trace", "trace_dataset", "DatasetTrace", "important_heads", "Cell", "capture", "run_cells", "Metric", "make_metric", "recovery_rate", "Trace"]
