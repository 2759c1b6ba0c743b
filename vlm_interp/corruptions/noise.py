"""Gaussian noise corruptions (ROME / FCCT style) at image embeddings, vision patches or pixels.

``noise(vlm, ex, scale="3sd", tokens="image", place="embeddings", seed=0)`` returns a
corrupted copy of ``ex``. Noise on pixels changes ``pixel_values``; noise inside the model
is an :class:`~vlm_interp.edits.InputEdit` in ``Example.edits``, applied by
:func:`~vlm_interp.edits.applied` whenever the example runs.

Where the noise goes is adapter data (``Adapter.noise_places``), not copied model code:

* ``embeddings``: the image embeddings entering the language model. In transformers 5 the
  image features are scattered into ``inputs_embeds`` inside the model's forward, after
  ``embed_tokens``, so a hook on ``embed_tokens`` never sees them. LLaVA hooks the projector
  output and BLIP-2/InstructBLIP the ``language_projection`` output: their rows are the LM's
  image-token group in order. LLaVA-NeXT re-orders projector rows into tiles and interleaves
  newline tokens, so it hooks the LM's input itself (the first decoder layer's input), whose
  positions are the LM's. BLIP's LM has no image tokens: the vision model's output, which the
  question encoder cross-attends to, takes their place (positions = the vision group).
* ``patches``: the vision tower's patch embeddings (positions = the vision group, CLS at 0 where the
  tower has one; SigLIP towers have none).
* ``pixels``: ``pixel_values`` inside the patches of the chosen vision positions.

``scale`` is absolute (a float) or relative (``"3sd"`` = 3 x the standard deviation of the
model's own values at that place and at image positions, over all elements, as ROME does),
estimated by :func:`embedding_std` and cached per model object.
"""

from __future__ import annotations

import hashlib
import math
import re
import weakref
from functools import reduce
from typing import Literal, Sequence

import torch

from .. import compat
from ..edits import InputEdit
from ..errors import CorruptionError
from ..example import Example
from ..adapters.base import NoisePlace
from ..hooks import AttachedHooks, Hook

PlaceName = Literal["embeddings", "patches", "pixels"]
PLACE_NAMES: tuple[str, ...] = ("embeddings", "patches", "pixels")


Place = NoisePlace  # the adapter table entry that says where noise goes

_STD_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[str, str], float]]" = weakref.WeakKeyDictionary()


def place_of(vlm, place: str) -> Place:
    """The :class:`Place` of ``place`` for this model's family (``pixels`` has none: it is an input)."""
    if place not in PLACE_NAMES:
        raise CorruptionError(f"unknown noise place {place!r}; choose one of {list(PLACE_NAMES)}")
    if place == "pixels":
        raise CorruptionError("'pixels' is not a module: noise there changes pixel_values directly")
    places = vlm.adapter.adapter.noise_places
    if place not in places:
        raise CorruptionError(f"the {vlm.family!r} adapter gives no noise place {place!r}; add it to the adapter's "
                              "noise_places (vlm_interp/adapters/)")
    return places[place]


def parse_scale(scale: float | int | str) -> tuple[float, bool]:
    """``(factor, relative)`` from ``0.1`` (absolute), ``"0.1"`` or ``"3sd"`` (3 standard deviations)."""
    if isinstance(scale, bool):
        raise CorruptionError(f"noise scale must be a number or a string like '3sd', got {scale!r}")
    relative = False
    if isinstance(scale, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*(sd)?\s*", scale, flags=re.IGNORECASE)
        if not m:
            raise CorruptionError(f"noise scale {scale!r} is neither a number nor a multiple of the standard "
                                  "deviation such as '3sd'")
        value, relative = float(m.group(1)), bool(m.group(2))
    elif isinstance(scale, (int, float)):
        value = float(scale)
    else:
        raise CorruptionError(f"noise scale must be a number or a string like '3sd', got {type(scale).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise CorruptionError(f"noise scale {scale!r} must be a positive finite number (zero noise changes nothing)")
    return value, relative


def _fingerprint(examples: Sequence[Example]) -> str:
    h = hashlib.sha1()
    for ex in examples:
        for key in sorted(ex.inputs):
            v = ex.inputs[key]
            if torch.is_tensor(v):
                h.update(key.encode())
                h.update(str(tuple(v.shape)).encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def place_values(vlm, ex: Example, place: str) -> torch.Tensor:
    """The model's own (clean) values at ``place`` and at image positions, flattened to 1-D."""
    if place == "pixels":
        return ex.inputs["pixel_values"].detach().float().flatten()
    p = place_of(vlm, place)
    grab = Hook(p.module, kind=p.kind, capture=True, name=f"{place} values", fold=p.fold,
                packed=vlm.adapter.packed(p.tower), input_keywords=compat.LAYER_INPUT_KEYWORDS)
    with AttachedHooks(vlm.model, [grab]), torch.no_grad():
        vlm.logits(ex.inputs)
    value = grab.value
    if p.index == "position":
        value = value[:, ex.positions("image", p.tower)]
    return value.float().flatten()


def embedding_std(vlm, examples: Sequence[Example], place: PlaceName = "embeddings") -> float:
    """Standard deviation (unbiased, over all elements) of the model's values at ``place`` and image positions.

    Estimated over ``examples`` (use clean ones) as ROME does, and cached per model object
    and set of inputs, so repeated corruptions do not re-run the model.
    """
    examples = list(examples)
    if not examples:
        raise CorruptionError("embedding_std needs at least one example to estimate the spread from")
    if place != "pixels":
        place_of(vlm, place)
    cache = _STD_CACHE.setdefault(vlm.model, {})
    key = (place, _fingerprint(examples))
    if key not in cache:
        values = torch.cat([place_values(vlm, ex, place) for ex in examples])
        if values.numel() < 2:
            raise CorruptionError(f"only {values.numel()} value at {place!r}; cannot estimate a spread")
        cache[key] = float(values.std())
    return cache[key]


def _positions(vlm, ex: Example, tower: str, tokens: str | Sequence[int], place: str) -> list[int]:
    if isinstance(tokens, str):
        try:
            positions = ex.positions(tokens, tower)
        except KeyError as err:
            hint = ""
            if tokens == "object":
                hint = (" Prepare the example with region=(x0, y0, x1, y1) or a mask to get an 'object' group."
                        if tower != "lm" or vlm.adapter.adapter.lm_image_boxes is not None else
                        f" The {vlm.family} LM's image tokens are Q-Former queries, which cover no image region: "
                        "use place='patches' or place='pixels' for noise on an object.")
            raise CorruptionError(f"noise at {place!r} takes positions from the {tower} tower: {err.args[0]}.{hint}") \
                from None
    else:
        positions = list(tokens)
        if not all(isinstance(p, int) and not isinstance(p, bool) for p in positions):
            raise CorruptionError(f"tokens must be a group name or a list of integer positions, got {tokens!r}")
    positions = sorted(set(positions))
    if not positions:
        raise CorruptionError(f"the token selection {tokens!r} in the {tower} tower is empty: nothing to corrupt")
    return positions


def _noise_tensor(shape: tuple[int, ...], scale: float, seed: int) -> torch.Tensor:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise CorruptionError(f"seed must be a non-negative integer, got {seed!r}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32) * scale


def _is_tiled(vlm, ex: Example) -> bool:
    """Whether the vision tower sees several views whose positions repeat (LLaVA-NeXT's and LLaVA-OneVision's crops:
    pixel_values (batch, crops, channels, height, width)); towers that run tiles as one sequence (an image layout) do
    not."""
    return ex.inputs["pixel_values"].dim() == 5 and vlm.adapter.adapter.image_layout is None


def _check_tiled(vlm, ex: Example, vision_image: list[int], positions: list[int], place: str) -> None:
    if _is_tiled(vlm, ex) and positions != vision_image:
        raise CorruptionError(
            f"noise at {place!r} on a tiled image (LLaVA-NeXT, LLaVA-OneVision) covers all image patches of every "
            "tile (tokens='image'); the "
            "vision positions of a sub-group refer to the base view only. For noise on an object use "
            "place='embeddings', where the LM's 'object' group covers the base view and the tiles."
        )


def noise(vlm, ex: Example, scale: float | str = "3sd", tokens: str | Sequence[int] = "image",
          place: PlaceName = "embeddings", seed: int = 0, std_examples: Sequence[Example] | None = None) -> Example:
    """A corrupted copy of ``ex`` with seeded Gaussian noise at ``place`` on ``tokens``.

    ``tokens`` is a group name of the place's tower (``image``, ``object``, ...) or a list of
    positions in it: the LM for ``embeddings`` (BLIP: the vision tower), the vision tower for
    ``patches`` and ``pixels``. ``scale="3sd"`` uses :func:`embedding_std` of
    ``std_examples`` (default: ``[ex]``). The same seed always gives the same noise.
    """
    factor, relative = parse_scale(scale)
    std = embedding_std(vlm, std_examples if std_examples is not None else [ex], place) if relative else None
    amount = factor * std if relative else factor
    record = {"kind": "noise", "place": place, "tokens": tokens if isinstance(tokens, str) else list(tokens),
              "scale": amount, "scale_spec": scale, "std": std, "seed": seed}
    if place == "pixels":
        positions = _positions(vlm, ex, "vision", tokens, place)
        vision_image = ex.positions("image", "vision")
        bad = [p for p in positions if p not in set(vision_image)]
        if bad:
            cls = " (a CLS token has no pixels)" if ex.groups["vision"].get("cls") else ""
            raise CorruptionError(f"vision positions {bad} are not image patches{cls}; patches are "
                                  f"{vision_image[0]}..{vision_image[-1]}")
        _check_tiled(vlm, ex, vision_image, positions, place)
        pixels = ex.inputs["pixel_values"]
        layout = vlm.image_layout(ex)
        mask = _pixel_mask(vlm, pixels, vision_image, positions, ex.inputs) if layout is None else \
            _tile_pixel_mask(vlm, pixels, layout.pixels, positions)
        delta = _noise_tensor(tuple(pixels.shape), amount, seed) * mask
        record.update(tower="vision", positions=positions)
        corrupted = (pixels.float() + delta.to(pixels.device)).to(pixels.dtype)
        return ex.derive(inputs={**ex.inputs, "pixel_values": corrupted}, meta={**ex.meta, "corruption": record})
    p = place_of(vlm, place)
    positions = _positions(vlm, ex, p.tower, tokens, place)
    image = ex.positions("image", p.tower) if "image" in ex.groups.get(p.tower, {}) else []
    hidden = int(reduce(getattr, p.hidden.split("."), vlm.model.config))
    rows = 1
    if p.tower != "lm":  # vision positions (BLIP's vision output, patch embeddings, tiles in turn) or the like
        layout = vlm.image_layout(ex)
        if layout is None:
            length = len(image) + len(ex.groups[p.tower].get("cls", []))
            where = f" (patches: {image[0]}..{image[-1]})" if image else ""
        else:
            length = len({"vision": layout.vision, **layout.other}[p.tower])
            where = " (tiles in turn)"
        bad = [q for q in positions if not 0 <= q < length]
        if bad:
            raise CorruptionError(f"{p.tower} positions {bad} are out of range; that sequence has positions "
                                  f"0..{length - 1}{where}")
        index, exact = positions, True
        if place == "patches":
            _check_tiled(vlm, ex, image, positions, place)
            rows = ex.inputs["pixel_values"].shape[1] if _is_tiled(vlm, ex) else 1
    else:
        bad = [q for q in positions if q not in set(image)]
        if bad:
            where = f"image positions {image[0]}..{image[-1]}" if image else "this example has none"
            raise CorruptionError(f"LM positions {bad} are not image tokens; noise at {place!r} touches image "
                                  f"tokens only ({where})")
        if p.index == "group":
            rank = {q: i for i, q in enumerate(image)}
            index, length, exact = [rank[q] for q in positions], len(image), True
        else:
            index, length, exact = positions, ex.inputs["input_ids"].shape[1], False
    edit = InputEdit(p.module, p.kind, tuple(index), _noise_tensor((rows, len(index), hidden), amount, seed),
                     length, exact, label=f"noise ({place}, seed {seed})", fold=p.fold,
                     packed=vlm.adapter.packed(p.tower))
    record.update(tower=p.tower, positions=positions, module=p.module)
    return ex.derive(edits=[*ex.edits, edit], meta={**ex.meta, "corruption": record})


def _pixel_mask(vlm, pixels: torch.Tensor, vision_image: list[int], positions: list[int],
                inputs: dict | None = None) -> torch.Tensor:
    """1 on the pixels of the chosen patches (row-major grid, CLS excluded), 0 elsewhere.

    Processors that flatten the patches into rows of ``pixel_values`` (the adapter's ``pixel_rows``
    says which row holds each vision position) get a mask of those rows.
    """
    pixel_rows = vlm.adapter.adapter.pixel_rows
    if pixel_rows is not None:
        order = pixel_rows(vlm.model.config, inputs or {})
        if pixels.dim() != 2 or len(order) != pixels.shape[0] or len(order) != len(vision_image):
            raise CorruptionError(f"pixel_values of shape {tuple(pixels.shape)} do not hold one row per vision "
                                  f"patch ({len(vision_image)} patches)")
        mask = torch.zeros(pixels.shape[0], 1)
        mask[[order[vision_image.index(q)] for q in positions]] = 1.0
        return mask
    patch = int(vlm.model.config.vision_config.patch_size)
    h, w = pixels.shape[-2:]
    rows, cols = h // patch, w // patch
    if rows * cols != len(vision_image):
        raise CorruptionError(f"pixel_values of {h}x{w} in {patch}-pixel patches give {rows * cols} patches but the "
                              f"vision tower has {len(vision_image)} patch positions")
    mask = torch.zeros(h, w)
    for q in positions:
        r, c = divmod(vision_image.index(q), cols)
        mask[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = 1.0
    return mask


def _tile_pixel_mask(vlm, pixels: torch.Tensor, patches: dict[int, tuple[int, int, int]],
                     positions: list[int]) -> torch.Tensor:
    """1 on the pixels of the chosen vision positions, each a (tile, row, column) patch of the tiles in
    ``pixel_values`` (taken in order, whatever their leading axes), 0 elsewhere; shaped like ``pixel_values``."""
    patch = int(vlm.model.config.vision_config.patch_size)
    tiles = pixels.reshape(-1, *pixels.shape[-3:])
    mask = torch.zeros(tiles.shape[0], 1, *tiles.shape[-2:])
    for q in positions:
        t, r, c = patches[q]
        mask[t, :, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = 1.0
    return mask.expand(-1, tiles.shape[1], -1, -1).reshape(pixels.shape)


def noise_samples(vlm, ex: Example, n: int, seed: int = 0, **kw) -> list[Example]:
    """``n`` noise corruptions of ``ex`` with seeds ``seed, seed + 1, ...`` (other arguments as :func:`noise`)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise CorruptionError(f"n must be a positive integer, got {n!r}")
    return [noise(vlm, ex, seed=seed + i, **kw) for i in range(n)]
