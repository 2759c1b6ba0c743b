"""Where each visual token looks: boxes in original-image pixels, and overlap with a region.

The image processor resizes (and maybe centre-crops) the image into its *frame*; a vision
patch is a cell of the frame's grid. These helpers map grid cells back to boxes in the
original image so that a user's box or mask (in original pixels) selects the tokens whose
patches overlap it. A pixel belongs to a box when its centre lies inside the box.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

Box = tuple[float, float, float, float]  # (y0, x0, y1, x1) in original-image pixels, half-open


def _size_get(size: Any, key: str) -> Any:
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


def frame_cells(image_processor: Any, image_hw: tuple[int, int], grid: tuple[int, int],
                squash: bool = False) -> list[Box]:
    """Boxes (original pixels) of the ``grid`` cells of the processed frame, row-major.

    Handles ``size={"height", "width"}`` (plain resize), ``size={"shortest_edge"}`` with an
    optional centre crop (CLIP/LLaVA), and ``squash=True`` for LLaVA-NeXT's base view
    (resized to a square of the shortest edge, then cropped).
    """
    h, w = image_hw
    size = getattr(image_processor, "size", None)
    do_resize = getattr(image_processor, "do_resize", True)
    short = _size_get(size, "shortest_edge")
    if not do_resize:
        sy = sx = 1.0
        rh, rw = h, w
    elif short and not squash:
        scale = short / min(h, w)
        sy = sx = scale
        rh, rw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    elif short and squash:
        rh = rw = short
        sy, sx = short / h, short / w
    elif _size_get(size, "height"):
        rh, rw = _size_get(size, "height"), _size_get(size, "width")
        sy, sx = rh / h, rw / w
    else:
        raise ValueError(f"cannot read the resize geometry of {type(image_processor).__name__} (size={size!r})")
    top = left = 0
    fh, fw = rh, rw
    crop = getattr(image_processor, "crop_size", None)
    if getattr(image_processor, "do_center_crop", False) and _size_get(crop, "height"):
        fh, fw = _size_get(crop, "height"), _size_get(crop, "width")
        top, left = (rh - fh) // 2, (rw - fw) // 2
    rows, cols = grid
    ch, cw = fh / rows, fw / cols
    return [
        ((top + r * ch) / sy, (left + c * cw) / sx, (top + (r + 1) * ch) / sy, (left + (c + 1) * cw) / sx)
        for r in range(rows)
        for c in range(cols)
    ]


def even_cells(image_hw: tuple[int, int], grid: tuple[int, int]) -> list[Box]:
    """Boxes of a ``grid`` laid evenly over the whole original image (LLaVA-NeXT's unpadded tiles)."""
    h, w = image_hw
    rows, cols = grid
    return [(r * h / rows, c * w / cols, (r + 1) * h / rows, (c + 1) * w / cols)
            for r in range(rows) for c in range(cols)]


def region_mask(region: Any, image_hw: tuple[int, int]) -> np.ndarray:
    """A boolean mask of the image from a box ``(x0, y0, x1, y1)`` in pixels or a mask array."""
    h, w = image_hw
    if isinstance(region, np.ndarray) or hasattr(region, "numpy"):
        mask = np.asarray(region.numpy() if hasattr(region, "numpy") else region).astype(bool)
        if mask.shape != (h, w):
            raise ValueError(f"region mask has shape {mask.shape}, the image is {(h, w)} (height, width)")
        return mask
    if isinstance(region, Sequence) and len(region) == 4:
        x0, y0, x1, y1 = (float(v) for v in region)
        if not (x1 > x0 and y1 > y0):
            raise ValueError(f"region box {tuple(region)} must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0")
        ys, xs = np.arange(h) + 0.5, np.arange(w) + 0.5
        return ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
    raise ValueError(f"region must be a box (x0, y0, x1, y1) or a boolean mask of the image, got {type(region).__name__}")


def overlapping(boxes: dict[int, Box], mask: np.ndarray) -> list[int]:
    """Positions whose box contains the centre of at least one masked pixel."""
    ys, xs = np.nonzero(mask)
    cy, cx = ys + 0.5, xs + 0.5
    hits = []
    for pos, (y0, x0, y1, x1) in boxes.items():
        if np.any((cy >= y0) & (cy < y1) & (cx >= x0) & (cx < x1)):
            hits.append(pos)
    return sorted(hits)
