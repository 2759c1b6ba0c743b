"""Checks of image pairs: how much changed, whether the change stays in its mask, CLIP scoring.

:func:`check_pair` reports the fraction of pixels and of vision patches that differ and
warns (:class:`NotMinimalPairWarning`) when a pair is not minimal: the images are identical,
or the difference spills outside the mask (dilated by a few pixels, the blending margin of
region edits) by more than a tolerance. :func:`clip_region_score` (``clip`` extra) asks an
open_clip model whether the edited region now matches the new concept better than the old.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .. import geometry
from ..example import Example
from .base import CorruptionError


class NotMinimalPairWarning(UserWarning):
    """A pair differs in more than its stated region (or not at all)."""


def as_array(image: Any) -> np.ndarray:
    """``image`` (PIL, array or Example) as an int16 array (H, W, C), for differences without overflow."""
    from PIL import Image

    if isinstance(image, Example):
        if image.image is None:
            raise CorruptionError("the example carries no image; build it with vlm.prepare")
        image = image.image
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise CorruptionError(f"expected a PIL image, an array or an Example, got {type(image).__name__}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or 0 in image.shape:
        raise CorruptionError(f"an image array must be (H, W) or (H, W, C) and non-empty, got shape {image.shape}")
    return image.astype(np.int16) if image.dtype != np.int16 else image


def dilate(mask: np.ndarray, px: int) -> np.ndarray:
    """``mask`` grown by ``px`` pixels in every direction (a square neighbourhood)."""
    if isinstance(px, bool) or not isinstance(px, (int, np.integer)) or px < 0:
        raise CorruptionError(f"dilation must be a non-negative integer number of pixels, got {px!r}")
    out = np.asarray(mask, dtype=bool)
    for axis in (0, 1):
        grown = out.copy()
        n = out.shape[axis]
        for d in range(1, min(int(px), n - 1) + 1):
            fwd = [slice(None)] * 2
            src = [slice(None)] * 2
            fwd[axis], src[axis] = slice(d, None), slice(None, n - d)
            grown[tuple(fwd)] |= out[tuple(src)]
            grown[tuple(src)] |= out[tuple(fwd)]
        out = grown
    return out


@dataclass
class PairReport:
    """How two images of a pair differ. Fractions are of all pixels / all vision patches."""

    pixels_changed: int
    pixel_fraction: float
    patches_changed: list[int] | None
    """Vision positions (or grid cells) whose patch holds a changed pixel; None without a grid."""
    patch_fraction: float | None
    outside_pixels: int | None
    """Changed pixels outside the dilated mask; None without a mask."""
    outside_fraction: float | None
    """``outside_pixels`` as a fraction of the changed pixels."""
    minimal: bool
    problems: list[str] = field(default_factory=list)


def check_pair(clean: Any, corrupt: Any, mask: Any = None, *, grid: tuple[int, int] | None = None, vlm: Any = None,
               dilate_px: int = 2, tolerance: float = 0.01, atol: int = 0, warn: bool = True) -> PairReport:
    """Compare the images of a pair (Examples or images) and warn when it is not minimal.

    ``mask`` is a box ``(x0, y0, x1, y1)`` or a boolean mask (default: the examples'
    ``meta["mask"]``). Patches come from the clean example's vision boxes (exact, with the
    processor's resize and crop undone), else from ``grid`` (rows, cols) or the vision
    config of ``vlm``, laid evenly over the image. A pixel counts as changed when a channel
    differs by more than ``atol``.
    """
    if not 0 <= tolerance <= 1:
        raise CorruptionError(f"tolerance {tolerance!r} must be a fraction in [0, 1]")
    if atol < 0:
        raise CorruptionError(f"atol {atol!r} must be >= 0")
    a, b = as_array(clean), as_array(corrupt)
    if a.shape != b.shape:
        raise CorruptionError(f"the pair's images differ in shape {a.shape} vs {b.shape}; a minimal pair needs "
                              "images of the same size")
    hw = a.shape[:2]
    changed = np.any(np.abs(a - b) > atol, axis=-1)
    n_changed = int(changed.sum())
    if mask is None:
        for ex in (corrupt, clean):
            if isinstance(ex, Example) and ex.meta.get("mask") is not None:
                mask = ex.meta["mask"]
                break
    boxes = clean.boxes.get("vision") if isinstance(clean, Example) else None
    if not boxes and grid is None and vlm is not None:
        vc = vlm.model.config.vision_config
        grid = (vc.image_size // vc.patch_size,) * 2
    if not boxes and grid is not None:
        if len(grid) != 2 or min(grid) < 1:
            raise CorruptionError(f"grid {grid!r} must be (rows, cols) with at least one of each")
        boxes = dict(enumerate(geometry.even_cells(hw, tuple(grid))))
    patches = geometry.overlapping(boxes, changed) if boxes else None
    report = PairReport(n_changed, n_changed / changed.size, patches,
                        len(patches) / len(boxes) if boxes else None, None, None, True)
    if n_changed == 0:
        report.minimal = False
        report.problems.append("the two images are identical: the pair changes nothing")
    if mask is not None:
        region = geometry.region_mask(mask, hw)
        outside = changed & ~dilate(region, dilate_px)
        report.outside_pixels = int(outside.sum())
        report.outside_fraction = report.outside_pixels / n_changed if n_changed else 0.0
        if report.outside_fraction > tolerance:
            report.minimal = False
            report.problems.append(
                f"{report.outside_pixels} changed pixels ({report.outside_fraction:.1%} of the change) lie outside "
                f"the mask dilated by {dilate_px} px (tolerance {tolerance:.1%})"
            )
    if warn and report.problems:
        warnings.warn("pair is not minimal: " + "; ".join(report.problems), NotMinimalPairWarning, stacklevel=2)
    return report


# ------------------------------------------------------------------------------------ CLIP


def _open_clip():
    try:
        import open_clip
    except ImportError as err:
        raise ImportError("CLIP scoring needs open_clip: pip install 'vlm-interp[clip]' "
                          f"(import failed: {err})") from None
    return open_clip


def load_clip(name_or_path: str, pretrained: str | None = None, device: str = "cpu"):
    """``(model, preprocess, tokenizer)`` of an open_clip model: a local folder, ``hf-hub:`` id or built-in name.

    A folder holds ``open_clip_config.json`` and the weights; with a built-in name,
    ``pretrained`` is a tag or a weights file.
    """
    from pathlib import Path

    open_clip = _open_clip()
    name = f"local-dir:{name_or_path}" if Path(name_or_path).is_dir() else name_or_path
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(name)


@dataclass
class ClipRegionScore:
    """Cosine similarities of the region crop (clean and corrupt image) with the old and new texts."""

    clean_old: float
    clean_new: float
    corrupt_old: float
    corrupt_new: float

    @property
    def matches_new(self) -> bool:
        """The edited region matches the new concept better than the old one."""
        return self.corrupt_new > self.corrupt_old

    @property
    def shift(self) -> float:
        """How much the edit moved the region from the old text towards the new (difference of margins)."""
        return (self.corrupt_new - self.corrupt_old) - (self.clean_new - self.clean_old)


def _crop_box(region: np.ndarray, pad: int) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(region)
    if not len(ys):
        raise CorruptionError("the region is empty; nothing to crop for CLIP scoring")
    h, w = region.shape
    return (max(int(xs.min()) - pad, 0), max(int(ys.min()) - pad, 0),
            min(int(xs.max()) + 1 + pad, w), min(int(ys.max()) + 1 + pad, h))


def clip_region_score(clip: Any, clean: Any, corrupt: Any, region: Any, old_text: str, new_text: str, *,
                      preprocess: Callable | None = None, tokenizer: Callable | None = None, pad: int = 0,
                      template: str = "a photo of a {}") -> ClipRegionScore:
    """Score whether the edited region now matches ``new_text`` better than ``old_text``.

    ``clip`` is an open_clip model object or a name/folder for :func:`load_clip`. The crop
    is the region's bounding box (plus ``pad`` pixels) in both images. Defaults: the eval
    transform of open_clip at the model's image size, and its bundled BPE tokenizer.
    """
    import torch
    from PIL import Image

    open_clip = _open_clip()
    if isinstance(clip, str):
        clip, default_pre, default_tok = load_clip(clip)
        preprocess, tokenizer = preprocess or default_pre, tokenizer or default_tok
    if not hasattr(clip, "encode_image") or not hasattr(clip, "encode_text"):
        raise CorruptionError(f"clip must be an open_clip model (with encode_image/encode_text) or a name, "
                              f"got {type(clip).__name__}")
    a, b = as_array(clean), as_array(corrupt)
    if a.shape != b.shape:
        raise CorruptionError(f"the pair's images differ in shape {a.shape} vs {b.shape}")
    box = _crop_box(geometry.region_mask(region, a.shape[:2]), pad)
    if preprocess is None:
        size = getattr(clip.visual, "image_size", 224)
        preprocess = open_clip.image_transform(size, is_train=False)
    if tokenizer is None:
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=getattr(clip, "context_length", 77))
    crops = [Image.fromarray(x.astype(np.uint8).squeeze(-1) if x.shape[-1] == 1 else x.astype(np.uint8))
             .convert("RGB").crop(box) for x in (a, b)]
    device = next(clip.parameters()).device
    with torch.no_grad():
        images = torch.stack([preprocess(c) for c in crops]).to(device)
        texts = tokenizer([template.format(old_text), template.format(new_text)]).to(device)
        img = torch.nn.functional.normalize(clip.encode_image(images).float(), dim=-1)
        txt = torch.nn.functional.normalize(clip.encode_text(texts).float(), dim=-1)
        sim = (img @ txt.T).cpu()
    return ClipRegionScore(float(sim[0, 0]), float(sim[0, 1]), float(sim[1, 0]), float(sim[1, 1]))


__all__ = ["ClipRegionScore", "NotMinimalPairWarning", "PairReport", "as_array", "check_pair", "clip_region_score",
           "dilate", "load_clip"]
