"""Causal tracing: batched activation and head patching with labelled results."""

from .causal import trace
from .dataset import DatasetTrace, trace_dataset
from .heads import important_heads
from .engine import Cell, run_cells, site_activations
from .grid import GridPlan, plan_grid
from .metrics import Metric, make_metric, recovery_rate
from .results import Trace

__all__ = ["trace", "trace_dataset", "DatasetTrace", "important_heads", "Cell", "site_activations", "run_cells",
           "GridPlan", "plan_grid", "Metric", "make_metric", "recovery_rate", "Trace"]

from .baselines import patch_feature_ablation, pixel_integrated_gradients
from .groundtruth import auroc, map_auroc, patch_neighbourhoods

__all__ += ["pixel_integrated_gradients", "patch_feature_ablation", "auroc", "map_auroc", "patch_neighbourhoods"]

from .agreement import agreement, agreement_cells
from .attribution import attribution_patching, integrated_patching

__all__ += ["attribution_patching", "integrated_patching", "agreement", "agreement_cells"]

from .attention import AttentionMaps, attention_maps
from .knockout import Knockout, knocked_out, knockout
from .lens import Lens, logit_lens

__all__ += ["logit_lens", "Lens", "knockout", "knocked_out", "Knockout", "attention_maps", "AttentionMaps"]
