"""Head modulation (V-SEAM): multiply chosen attention heads' outputs during any forward or generate.

A head's output is its slice of the attention output projection's input (see
:mod:`vlm_interp.sites`), so scaling it before the projection scales exactly that head's
contribution to the residual stream. One hook per projection carries a per-channel factor.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Iterator, Mapping

import numpy as np
import torch
import xarray as xr

from ..hooks import Hook
from ..sites import HEAD_COMPONENTS, Site
from .steps import InterventionError

Scales = Mapping["str | Site", float]


def _head_groups(vlm, scales: Scales) -> dict[tuple[str, str, int], dict[int, float]]:
    """Scales grouped by (tower, component, layer) projection: {head: factor}."""
    groups: dict[tuple, dict[int, float]] = defaultdict(dict)
    for name, factor in scales.items():
        site = vlm.adapter.resolve(name)
        if site.component not in HEAD_COMPONENTS:
            raise InterventionError(f"modulate_heads scales attention heads; {site} is a {site.component} site "
                                    "(write heads as lm.head.LAYER.HEAD or qformer.xattn.LAYER.head.HEAD)")
        if not np.isfinite(factor):
            raise InterventionError(f"scale of {site} is {factor}; scales must be finite numbers")
        groups[(site.tower, site.component, site.layer)][site.head] = float(factor)
    return groups


def head_scale_hooks(vlm, scales: Scales) -> list[Hook]:
    """Hooks multiplying each named head by its factor, one hook per output projection."""
    hooks = []
    for (tower, component, layer), factors in _head_groups(vlm, scales).items():
        site = Site(tower, component, layer, next(iter(factors)))
        d = vlm.adapter.head_dim(site)
        vector = torch.ones(vlm.adapter.n_heads[tower] * d)
        for head, factor in factors.items():
            vector[head * d:(head + 1) * d] = factor
        path, kind = vlm.adapter.hook_point(tower, component, layer)
        hooks.append(Hook(path, fn=_scaler(vector), kind=kind, name=f"modulate {site}"))
    return hooks


def _scaler(vector: torch.Tensor):
    def scale(t: torch.Tensor) -> torch.Tensor:
        return t * vector.to(t.device, t.dtype)

    return scale


@contextlib.contextmanager
def modulate_heads(vlm, scales: Scales) -> Iterator[list[Hook]]:
    """Multiply each named head's output by its scale (``{"lm.head.2.1": 1.8, ...}``) inside the block.

    Works around ``vlm.generate`` or a single forward, at every position (so the KV cache
    holds the modulated keys and values, and generation with and without the cache agree).
    """
    if not scales:
        raise InterventionError("modulate_heads got no heads to scale")
    hooks = head_scale_hooks(vlm, scales)
    with vlm.attach(hooks):
        yield hooks


def v_seam_scales(scores: xr.DataArray, lam: float = 1.0, normalise: bool = True,
                  tower: str = "lm", component: str = "head") -> dict[str, float]:
    """V-SEAM's rule: scale = clip(1 + lam * score, 0, 2) for every head of a (layer, head) score grid.

    With ``normalise`` the scores are first divided by their largest absolute value, so that
    ``lam`` is unit-free (head scores are probability changes whose size depends on the model).
    """
    if set(scores.dims) != {"layer", "head"}:
        raise InterventionError(f"head scores must have dims (layer, head), got {scores.dims}")
    values = scores.transpose("layer", "head").values.astype(float)
    if not np.isfinite(values).all():
        raise InterventionError("head scores contain NaN or infinite values")
    top = np.abs(values).max()
    if normalise and top > 0:
        values = values / top
    factors = np.clip(1.0 + lam * values, 0.0, 2.0)
    out = {}
    for i, layer in enumerate(scores.coords["layer"].values):
        for j, head in enumerate(scores.coords["head"].values):
            name = Site(tower, component, int(layer), int(head)).name
            out[name] = float(factors[i, j])
    return out
