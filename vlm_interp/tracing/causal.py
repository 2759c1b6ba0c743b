"""Causal tracing over a grid: components x layers x positions (or heads), batched."""

from __future__ import annotations

from typing import Sequence

from ..example import Example
from .grid import exact_values, plan_grid
from .results import Trace


def trace(vlm, clean: Example, corrupt: Example, components: Sequence[str] = ("lm.hidden", "lm.attn", "lm.mlp"),
          tokens="each", window: int = 1, metric: str = "prob", answer: str | None = None, other: str | None = None,
          direction: str = "restore", batch_size: "int | str" = "auto", progress: bool = True,
          fast_path: "bool | str" = "auto") -> Trace:
    """Effect on the answer of restoring each component at each layer and position.

    ``components`` are ``tower.component`` names (``lm.hidden``, ``vision.mlp``,
    ``qformer.xattn``, ``lm.head``...); all must be in one tower. ``tokens`` is ``"each"``
    (every position), ``"all"``, a list of token-group names, or ``{label: positions}``.
    ``window`` layers centred on each layer are restored together (ROME's window).
    ``direction="restore"`` patches clean activations into the corrupted run (ROME);
    ``"noise"`` patches corrupted activations into the clean run. Head components give a
    (layer, head, position) grid. ``batch_size`` is the number of cells per forward or
    ``"auto"`` (from the free memory; see :func:`~vlm_interp.tracing.engine.run_cells`).
    ``fast_path``: ``"auto"`` (the fast path for LM sites where it applies, else a warning and
    whole-model forwards), ``True`` (require it) or ``False`` (whole-model forwards only).
    """
    plan = plan_grid(vlm, clean, corrupt, components, tokens, window, metric, answer, other, direction)
    values = exact_values(vlm, plan, list(plan.cells()), batch_size=batch_size, progress=progress,
                          desc=f"trace {plan.tower}", fast_path=fast_path)
    return plan.trace(values)
