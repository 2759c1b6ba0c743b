"""Region edits of an ordinary photo: replace a box or mask by inpainting or a classical fill.

Fills: ``"inpaint"`` (a diffusers inpainting pipeline, the ``edit`` extra, loaded from a
local folder or hub id), or without a diffusion model ``"blur"`` (Gaussian blur),
``"mean"`` (the mean colour outside the region) and ``"patch"`` (a same-shaped patch copied
from elsewhere, placed by a seed). Outside the region (dilated by ``dilate_px`` for
inpainting, the blending margin) every pixel is the original, so the pair stays minimal.
:func:`region_edit` turns the edited image into a corrupted Example with the same layout.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import geometry
from ..example import Example
from .base import CorruptionError
from .checks import check_pair, dilate
from .pairs import with_image

FILLS: tuple[str, ...] = ("blur", "mean", "patch", "inpaint")


def _rgb(image: Any):
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise CorruptionError(f"image must be a PIL image or a uint8 array, got {type(image).__name__}")
    return image.convert("RGB")


def _mask(region: Any, hw: tuple[int, int]) -> np.ndarray:
    try:
        mask = geometry.region_mask(region, hw)
    except ValueError as err:
        raise CorruptionError(str(err)) from None
    if not mask.any():
        raise CorruptionError(f"the region {region if not isinstance(region, np.ndarray) else 'mask'} selects no "
                              "pixel of the image; nothing to edit")
    return mask


def fill_region(image: Any, region: Any, fill: str = "blur", *, seed: int = 0, radius: float | None = None):
    """``image`` with ``region`` replaced by a classical fill (``blur``, ``mean`` or ``patch``); a PIL image.

    ``radius`` is the blur radius (default: a quarter of the region's larger side, at least 2).
    """
    from PIL import Image, ImageFilter

    image = _rgb(image)
    arr = np.asarray(image)
    mask = _mask(region, arr.shape[:2])
    out = arr.copy()
    ys, xs = np.nonzero(mask)
    y0, x0 = int(ys.min()), int(xs.min())
    bh, bw = int(ys.max()) - y0 + 1, int(xs.max()) - x0 + 1
    if fill == "blur":
        r = max(2.0, max(bh, bw) / 4) if radius is None else float(radius)
        if not r > 0:
            raise CorruptionError(f"blur radius must be positive, got {radius!r}")
        out[mask] = np.asarray(image.filter(ImageFilter.GaussianBlur(r)))[mask]
    elif fill == "mean":
        if mask.all():
            raise CorruptionError("the region covers the whole image: there is no outside colour to fill it with")
        out[mask] = np.round(arr[~mask].mean(axis=0)).astype(np.uint8)
    elif fill == "patch":
        h, w = mask.shape
        # a source window must hold no region pixel; integral image gives every window's count at once
        integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        counts = (integral[bh:, bw:] - integral[:-bh, bw:] - integral[bh:, :-bw] + integral[:-bh, :-bw])
        free = np.argwhere(counts == 0)
        if not len(free):
            raise CorruptionError(f"no {bw}x{bh} window outside the region exists to copy a patch from; the region is "
                                  "too large for fill='patch' (use 'blur', 'mean' or 'inpaint')")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise CorruptionError(f"seed must be a non-negative integer, got {seed!r}")
        ty, tx = free[int(np.random.default_rng(int(seed)).integers(len(free)))]
        out[ys, xs] = arr[ty + (ys - y0), tx + (xs - x0)]
    elif fill == "inpaint":
        raise CorruptionError("fill='inpaint' needs a diffusion pipeline: use inpaint(...) or edit_image(..., pipeline=)")
    else:
        raise CorruptionError(f"unknown fill {fill!r}; choose one of {list(FILLS)}")
    return Image.fromarray(out)


def _diffusers():
    try:
        import diffusers
    except ImportError as err:
        raise ImportError("inpainting needs diffusers: pip install 'vlm-interp[edit]', or use a classical fill "
                          f"('blur', 'mean', 'patch') (import failed: {err})") from None
    return diffusers


def load_inpainting(path_or_id: str, **kwargs: Any):
    """A diffusers inpainting pipeline from a local folder or hub id (``kwargs`` go to ``from_pretrained``)."""
    diffusers = _diffusers()
    pipe = diffusers.AutoPipelineForInpainting.from_pretrained(path_or_id, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _multiple(pipeline) -> int:
    """Side lengths the pipeline accepts are multiples of this (VAE and UNet downsampling)."""
    vae = getattr(pipeline, "vae_scale_factor", 8)
    blocks = getattr(getattr(getattr(pipeline, "unet", None), "config", None), "block_out_channels", None)
    return int(vae) * (2 ** (len(blocks) - 1) if blocks else 8)


def inpaint(image: Any, region: Any, pipeline: Any, prompt: str = "", *, seed: int = 0, steps: int = 20,
            dilate_px: int = 4, guidance_scale: float = 7.5, negative_prompt: str | None = None):
    """``image`` with ``region`` repainted by a diffusers inpainting ``pipeline`` (object or path/hub id).

    The pipeline repaints the region dilated by ``dilate_px``; outside that the original
    pixels are pasted back, so only the (dilated) region can differ. Seeded and deterministic.
    """
    from PIL import Image

    import torch

    if isinstance(pipeline, str):
        pipeline = load_inpainting(pipeline)
    if not callable(pipeline):
        raise CorruptionError(f"pipeline must be a diffusers inpainting pipeline or a path, got {type(pipeline).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise CorruptionError(f"seed must be a non-negative integer, got {seed!r}")
    image = _rgb(image)
    arr = np.asarray(image)
    grown = dilate(_mask(region, arr.shape[:2]), dilate_px)
    m = _multiple(pipeline)
    size = (-(-image.width // m) * m, -(-image.height // m) * m)
    mask_image = Image.fromarray(grown.astype(np.uint8) * 255).resize(size, Image.NEAREST)
    result = pipeline(prompt=prompt, image=image.resize(size, Image.BICUBIC), mask_image=mask_image,
                      height=size[1], width=size[0], num_inference_steps=steps, guidance_scale=guidance_scale,
                      negative_prompt=negative_prompt, generator=torch.Generator(device="cpu").manual_seed(seed),
                      output_type="pil").images[0]
    painted = np.asarray(result.convert("RGB").resize(image.size, Image.BICUBIC))
    out = np.where(grown[:, :, None], painted, arr).astype(np.uint8)
    return Image.fromarray(out)


def edit_image(image: Any, region: Any, fill: str = "blur", *, pipeline: Any = None, prompt: str = "",
               seed: int = 0, dilate_px: int = 4, **kw: Any):
    """Dispatch to :func:`inpaint` (``fill="inpaint"``) or :func:`fill_region`."""
    if fill == "inpaint":
        if pipeline is None:
            raise CorruptionError("fill='inpaint' needs pipeline= (a diffusers pipeline, a local folder or a hub id); "
                                  "without a diffusion model use fill='blur', 'mean' or 'patch'")
        return inpaint(image, region, pipeline, prompt, seed=seed, dilate_px=dilate_px, **kw)
    return fill_region(image, region, fill, seed=seed, **kw)


def example_region(ex: Example) -> np.ndarray:
    """The example's region: ``meta["mask"]``, else the union of its vision ``object`` patches."""
    if ex.meta.get("mask") is not None:
        return np.asarray(ex.meta["mask"], dtype=bool)
    positions = ex.groups.get("vision", {}).get("object")
    if not positions:
        raise CorruptionError("the example has no region: pass region=(x0, y0, x1, y1) or a mask, or prepare the "
                              "example with region= so it has an 'object' group")
    mask = np.zeros(ex.image_hw, dtype=bool)
    for p in positions:
        y0, x0, y1, x1 = ex.boxes["vision"][p]
        mask |= geometry.region_mask((x0, y0, x1, y1), ex.image_hw)
    return mask


def region_edit(vlm, ex: Example, region: Any = None, fill: str = "blur", *, pipeline: Any = None, prompt: str = "",
                seed: int = 0, dilate_px: int = 4, check: bool = True, tolerance: float = 0.01, **kw: Any) -> Example:
    """A corrupted copy of ``ex`` whose image has ``region`` (default :func:`example_region`) edited.

    The prompt and token layout are unchanged (checked); with ``check`` a
    :class:`~vlm_interp.corruptions.checks.NotMinimalPairWarning` flags edits that spill
    outside the region or change nothing.
    """
    if ex.image is None:
        raise CorruptionError("the example carries no image; build it with vlm.prepare")
    mask = _mask(region, ex.image_hw) if region is not None else example_region(ex)
    edited = edit_image(ex.image, mask, fill, pipeline=pipeline, prompt=prompt, seed=seed, dilate_px=dilate_px, **kw)
    corrupt = with_image(vlm, ex, edited, region=mask)
    corrupt.meta["corruption"] = {"kind": "edit", "fill": fill, "seed": seed, "prompt": prompt or None}
    if check:
        check_pair(ex, corrupt, mask, dilate_px=dilate_px if fill == "inpaint" else 0, tolerance=tolerance)
    return corrupt


__all__ = ["FILLS", "edit_image", "example_region", "fill_region", "inpaint", "load_inpainting", "region_edit"]
