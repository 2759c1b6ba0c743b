"""Inference-time interventions that act during an ordinary ``generate()`` (or any forward).

- :func:`modulate_heads` scales attention heads (V-SEAM), with :func:`v_seam_scales` turning
  head scores from :func:`score_heads` into scales;
- :func:`vhr` reinforces vision-aware heads found by their divergence (:func:`head_divergence`);
- :func:`inject` adds intermediate representations (IRI) following an :class:`InjectionPlan`;
- :func:`vcd` contrasts the logits with a run on a distorted image (visual contrastive decoding), a
  logits processor of the model's own ``generate``;
- :func:`pai` amplifies attention to image tokens (an attention edit) and contrasts the logits with a
  text-only run (PAI).

All are context managers built on :mod:`vlm_interp.hooks`: removed on exit, also on errors,
and an error when they never fire or cannot apply to a model.
"""

from .iri import InjectionPlan, inject, plan_from_recovery
from .modulate import modulate_heads, v_seam_scales
from .pai import PAIState, pai
from .scoring import HeadScores, compare_levels, head_means, plot_head_scores, score_heads
from .spec import from_spec
from .steps import InterventionError
from .vcd import VCDState, vcd
from .vhr import VHRState, head_divergence, select_vision_heads, vhr

__all__ = [
    "modulate_heads", "v_seam_scales", "score_heads", "HeadScores", "compare_levels", "head_means",
    "plot_head_scores", "vhr", "VHRState", "head_divergence", "select_vision_heads", "inject", "InjectionPlan",
    "plan_from_recovery", "from_spec", "InterventionError", "vcd", "VCDState", "pai", "PAIState",
]
