"""Input attributions as the non-causal baseline: captum's integrated gradients and patch ablation.

Both map their attribution onto the vision patch grid and return an xarray ``DataArray``
over the same ``position`` coordinate that :func:`~vlm_interp.tracing.trace` uses for image
tokens with ``tokens="each"``: LM sequence positions for LLaVA (where every patch is an image
token of the LM), and vision-tower positions (1..N, CLS at 0) for BLIP, BLIP-2 and
InstructBLIP, whose LM sees Q-Former queries that cover no particular patch. Either way
:func:`~vlm_interp.tracing.groundtruth.map_auroc` scores a map against an object's patches.

* :func:`pixel_integrated_gradients`: captum ``IntegratedGradients`` on ``pixel_values``,
  summed over each patch's pixels and channels. ``reduce="sum"`` (default) keeps the sign, so
  the patch values add up to ``metric(input) - metric(baseline)`` (IG's completeness, up to
  the integration error); ``reduce="abs"`` sums absolute values (magnitude, no cancellation).
* :func:`patch_feature_ablation`: captum ``FeatureAblation`` with a feature mask that groups
  each patch's pixels; the value of patch k is ``metric(input) - metric(input with patch k set
  to the baseline)``.

Baselines are in the processor's normalised pixel space: ``"mean"`` is 0 (the normaliser's
mean colour, grey), ``"black"`` is the normalised value of black pixels, or give a number
or a tensor broadcastable to ``pixel_values``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import xarray as xr

from ..edits import applied
from ..errors import VLMInterpError
from ..example import Example
from .engine import repeat_inputs
from .metrics import make_metric

BASELINES = ("mean", "black")
REDUCTIONS = ("sum", "abs")


class BaselineError(VLMInterpError, ValueError):
    """An input attribution cannot be computed for this model or these arguments."""


def _captum(name: str):
    """A captum attribution class, with an install hint when captum is missing."""
    try:
        from captum import attr
    except ImportError:
        raise ImportError("input attributions need captum: pip install 'vlm-interp[attr]'") from None
    return getattr(attr, name)


def _pixels(example: Example) -> torch.Tensor:
    """The example's ``pixel_values``, checked to be one untiled image (batch, channels, height, width)."""
    pixels = example.inputs.get("pixel_values")
    if pixels is None:
        raise BaselineError("the example has no pixel_values: pixel attributions need an image input")
    if pixels.dim() != 4 or pixels.shape[0] != 1:
        raise BaselineError(f"pixel attributions need pixel_values of shape (1, channels, height, width), got "
                            f"{tuple(pixels.shape)}; LLaVA-NeXT's tiled images (5-D) are not supported, since "
                            "a pixel of the base view and of a tile are different inputs")
    return pixels


def patch_grid(vlm, example: Example) -> tuple[int, int, int]:
    """``(rows, cols, patch)``: the vision patch grid of the example's ``pixel_values``."""
    pixels = _pixels(example)
    patch = int(vlm.model.config.vision_config.patch_size)
    h, w = pixels.shape[-2:]
    if h % patch or w % patch:
        raise BaselineError(f"pixel_values of {h}x{w} do not split into {patch}-pixel patches")
    rows, cols = h // patch, w // patch
    if rows * cols != len(example.positions("image", "vision")):
        raise BaselineError(f"{rows}x{cols} patches but the vision tower has "
                            f"{len(example.positions('image', 'vision'))} patch positions")
    return rows, cols, patch


def patch_positions(vlm, example: Example) -> tuple[str, list[int]]:
    """The tower and positions, one per patch in row-major order, that a patch map is reported on."""
    rows, cols, _ = patch_grid(vlm, example)
    tower = vlm.adapter.adapter.patch_map_tower
    if tower is None:
        raise BaselineError(f"patch maps are not defined for {vlm.family!r}: its adapter names no tower whose image "
                            "tokens are the patches one for one (patch_map_tower)")
    boxes = example.boxes.get(tower, {})
    image = [p for p in example.positions("image", tower) if p in boxes]  # tokens that cover a patch (no CLS)
    if len(image) != rows * cols:
        raise BaselineError(f"{len(image)} {tower} image tokens cover a patch, for {rows * cols} patches")
    return tower, image


def feature_mask(vlm, example: Example) -> torch.Tensor:
    """Long tensor (1, 1, height, width): the row-major index of the patch each pixel belongs to."""
    rows, cols, patch = patch_grid(vlm, example)
    ids = torch.arange(rows * cols).reshape(rows, cols)
    return ids.repeat_interleave(patch, 0).repeat_interleave(patch, 1)[None, None]


def baseline_pixels(vlm, example: Example, baseline: "str | float | torch.Tensor" = "mean") -> torch.Tensor:
    """The baseline image in normalised pixel space, shaped like ``pixel_values``."""
    pixels = _pixels(example)
    if isinstance(baseline, str):
        if baseline == "mean":
            return torch.zeros_like(pixels)
        if baseline == "black":
            proc = vlm.processor.image_processor
            mean = torch.tensor(proc.image_mean, dtype=pixels.dtype).view(1, -1, 1, 1)
            std = torch.tensor(proc.image_std, dtype=pixels.dtype).view(1, -1, 1, 1)
            return ((0 - mean) / std).expand_as(pixels).clone()
        raise BaselineError(f"unknown baseline {baseline!r}; use one of {BASELINES}, a number or a tensor")
    if isinstance(baseline, bool):
        raise BaselineError(f"baseline must be {BASELINES}, a number or a tensor, got {baseline!r}")
    if isinstance(baseline, (int, float)):
        return torch.full_like(pixels, float(baseline))
    if torch.is_tensor(baseline):
        try:
            return baseline.to(pixels.dtype).expand_as(pixels).clone()
        except RuntimeError:
            raise BaselineError(f"baseline of shape {tuple(baseline.shape)} does not broadcast to pixel_values "
                                f"{tuple(pixels.shape)}") from None
    raise BaselineError(f"baseline must be {BASELINES}, a number or a tensor, got {type(baseline).__name__}")


def metric_function(vlm, example: Example, metric: str = "prob", answer: str | None = None,
                    other: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``f(pixel_values) -> (batch,)``: the answer metric with the example's text (and edits) repeated."""
    m = make_metric(vlm, example, metric, answer, other)
    at = vlm.answer_start(example)

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        inputs = {**repeat_inputs(example.inputs, pixels.shape[0]), "pixel_values": pixels}
        with applied(vlm, example):
            return m(vlm.logits(inputs)[:, at])

    return forward


def _to_map(vlm, example: Example, values: np.ndarray, attrs: dict) -> xr.DataArray:
    """A per-patch vector (row-major) as a DataArray over the tower positions of the patches."""
    rows, cols, _ = patch_grid(vlm, example)
    tower, positions = patch_positions(vlm, example)
    k = np.arange(rows * cols)
    return xr.DataArray(np.asarray(values, float), dims=["position"], name="attribution",
                        coords={"position": positions, "patch": ("position", k), "row": ("position", k // cols),
                                "col": ("position", k % cols)},
                        attrs={"model": vlm.name, "tower": tower, "question": example.question,
                               "answer": example.answer or "", **attrs})


def pixel_integrated_gradients(vlm, example: Example, metric: str = "prob", answer: str | None = None,
                               other: str | None = None, steps: int = 32,
                               baseline: "str | float | torch.Tensor" = "mean", reduce: str = "sum",
                               method: str = "gausslegendre", internal_batch_size: int | None = 32) -> xr.DataArray:
    """Integrated gradients (captum) of ``metric`` w.r.t. ``pixel_values``, summed per vision patch.

    ``reduce="sum"`` keeps signs (patch values add up to ``metric(input) - metric(baseline)``);
    ``"abs"`` sums absolute pixel attributions. ``attrs`` hold the input and baseline scores and
    captum's convergence delta (the completeness error).
    """
    IntegratedGradients = _captum("IntegratedGradients")

    if reduce not in REDUCTIONS:
        raise BaselineError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise BaselineError(f"steps must be a positive integer, got {steps!r}")
    pixels = _pixels(example).detach().float()
    base = baseline_pixels(vlm, example, baseline).float()
    forward = metric_function(vlm, example, metric, answer, other)
    with torch.enable_grad():
        attr, delta = IntegratedGradients(forward).attribute(
            pixels, baselines=base, n_steps=steps, method=method, internal_batch_size=internal_batch_size,
            return_convergence_delta=True)
    with torch.no_grad():
        scores = forward(torch.cat([pixels, base])).tolist()
    attr = attr.detach()[0]  # (channels, height, width)
    rows, cols, patch = patch_grid(vlm, example)
    per_pixel = (attr.abs() if reduce == "abs" else attr).sum(0)
    values = per_pixel.reshape(rows, patch, cols, patch).sum((1, 3)).flatten().numpy()
    return _to_map(vlm, example, values, {
        "method": "pixel_integrated_gradients", "metric": metric, "steps": steps, "reduce": reduce,
        "baseline": baseline if isinstance(baseline, str) else "custom", "input_score": scores[0],
        "baseline_score": scores[1], "convergence_delta": float(delta.detach().abs().max())})


def patch_feature_ablation(vlm, example: Example, metric: str = "prob", answer: str | None = None,
                           other: str | None = None, baseline: "str | float | torch.Tensor" = "mean",
                           batch_size: int = 16) -> xr.DataArray:
    """Feature ablation (captum) over vision patches: ``metric(input) - metric(patch k set to the baseline)``."""
    FeatureAblation = _captum("FeatureAblation")

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise BaselineError(f"batch_size must be a positive integer, got {batch_size!r}")
    pixels = _pixels(example).detach().float()
    base = baseline_pixels(vlm, example, baseline).float()
    forward = metric_function(vlm, example, metric, answer, other)
    mask = feature_mask(vlm, example)
    with torch.no_grad():
        attr = FeatureAblation(forward).attribute(pixels, baselines=base, feature_mask=mask,
                                                  perturbations_per_eval=batch_size)
        score = float(forward(pixels)[0])
    rows, cols, patch = patch_grid(vlm, example)
    # every pixel of a patch carries the patch's value: read it at each patch's top-left pixel
    values = attr[0, 0, ::patch, ::patch].reshape(rows * cols).numpy()
    return _to_map(vlm, example, values, {
        "method": "patch_feature_ablation", "metric": metric, "input_score": score,
        "baseline": baseline if isinstance(baseline, str) else "custom"})
