"""Everything vlm-interp knows about transformers versions, in one module.

The rest of the package uses public names only. What changes between transformers releases
(the keyword a decoder layer takes its key/value cache under, how a cache exposes its
tensors, where the attention implementation is recorded, private helpers some families
need) is read here, by type and by feature rather than by version number where possible:

- the key/value cache is found among a call's keywords by its type (transformers' public
  :class:`~transformers.Cache`), never by keyword name: 5.24 renamed ``past_key_values`` to
  ``cache`` in every decoder layer and base model (the old name is a deprecated alias);
- a cache's per-layer keys and values are read from ``cache.layers[i].keys/.values`` (the
  layout since 5.0), and a fresh cache for replays is a plain :class:`~transformers.DynamicCache`;
- LLaVA-NeXT's any-resolution geometry (and InternVL's tile grid) use module-level helpers of their files,
  wrapped here under names of ours so that a move or rename breaks one place, with a clear error.

``TESTED`` is the declared range: the suite runs at both ends in CI. A newer release than the
ceiling gets a warning once; the tracing fast path still guards itself with its self-check.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
import transformers
from packaging.version import Version

from .errors import VLMInterpError

# The oldest and the newest transformers releases the test suite runs on (pyproject.toml declares the same).
TESTED = ("5.13.0", "5.24.0")
VERSION = Version(transformers.__version__)


class CompatibilityError(VLMInterpError, RuntimeError):
    """This transformers release lacks something vlm-interp needs, or moved it."""


class UntestedTransformersWarning(UserWarning):
    """transformers is outside the range the test suite runs on."""


def check_version() -> str | None:
    """Warn (once per process) when transformers is outside the tested range; returns the message."""
    floor, ceiling = (Version(v) for v in TESTED)
    if VERSION < floor:
        message = (f"transformers {VERSION} is older than the oldest release vlm-interp is tested with ({floor}); "
                   f"install transformers>={floor}")
    elif VERSION.release[:2] > ceiling.release[:2]:
        message = (f"transformers {VERSION} is newer than the newest release vlm-interp is tested with "
                   f"({ceiling}); results are guarded by self-checks, but report any error you meet")
    else:
        return None
    warnings.warn(message, UntestedTransformersWarning, stacklevel=2)
    return message


# ---- key/value caches ------------------------------------------------------------------
def is_cache(value: Any) -> bool:
    """Whether ``value`` is a transformers key/value cache object."""
    return isinstance(value, transformers.Cache)


# keyword names a cache has been passed under, newest first; only used when the value is None (see find_cache)
CACHE_KEYWORDS = ("cache", "past_key_values", "past_key_value")


def find_cache(kwargs: dict[str, Any]) -> tuple[str | None, Any]:
    """(keyword, cache) of the one key/value cache among a call's keywords; ``(None, None)`` when there is none.

    A keyword holding ``None`` under a known cache name counts as "no cache, under that name",
    so that a replay hands its fresh cache to the keyword the model itself used.
    """
    found = [(k, v) for k, v in kwargs.items() if is_cache(v)]
    if len(found) > 1:
        raise CompatibilityError(f"a call received {len(found)} key/value caches ({[k for k, _ in found]}); "
                                 "vlm-interp expects at most one")
    if found:
        return found[0]
    for name in CACHE_KEYWORDS:
        if name in kwargs:
            return name, None
    return None, None


def new_cache() -> Any:
    """An empty dynamic key/value cache whose layers are created as they are filled."""
    return transformers.DynamicCache()


def full_cache_inputs(model: Any) -> dict[str, Any]:
    """A fresh cache that keeps every position of every layer, under the keyword ``model``'s forward takes it by.

    A cache the model builds from its config keeps only a sliding window of positions in the
    local-attention layers (Gemma 2 and 3); a plain :func:`new_cache` keeps them all. The keyword
    is read from the forward's signature (``cache`` from 5.24, ``past_key_values`` before);
    ``{}`` when the forward takes none of the known names.
    """
    try:
        names = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return next(({name: new_cache()} for name in CACHE_KEYWORDS if name in names), {})


def cache_entries(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of every layer of ``cache``, each (batch, kv_heads, positions, head_dim)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise CompatibilityError(f"{type(cache).__name__} has no per-layer list (.layers); cannot read its keys "
                                 f"and values with transformers {VERSION}")
    out = []
    for j, layer in enumerate(layers):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not (torch.is_tensor(keys) and torch.is_tensor(values)):
            raise CompatibilityError(f"layer {j} of the {type(cache).__name__} holds no key and value tensors")
        out.append((keys, values))
    return out


def cache_length(cache: Any) -> int:
    """Positions already in ``cache`` (0 for ``None``)."""
    if cache is None:
        return 0
    if not hasattr(cache, "get_seq_length"):
        raise CompatibilityError(f"cannot read the length of a {type(cache).__name__} key/value cache; "
                                 "use a transformers Cache object (the default in generate)")
    return int(cache.get_seq_length())


def attn_implementation(config: Any) -> str | None:
    """The attention implementation a (text) config was loaded with: 'sdpa', 'eager', ...

    transformers keeps it in a private attribute; this is the one place that reads it.
    """
    return getattr(config, "_attn_implementation", None)


# ---- layer inputs ---------------------------------------------------------------------
# The keywords a layer may receive its input under when called without positional arguments: transformers 5.13
# calls Mllama's vision encoder layers with hidden_state=, later releases with hidden_states=.
LAYER_INPUT_KEYWORDS = ("hidden_states", "hidden_state")
# ---- what a model class does, by release ---------------------------------------------------
# The release from which a class applies its text config's final_logit_softcapping to the logits it returns (before:
# it returns them uncapped). PaliGemma 2's Gemma 2 configs set a cap of 30; PaliGemma from 5.23.0 applies it.
FINAL_SOFTCAP_SINCE = {"PaliGemmaForConditionalGeneration": "5.23.0"}
# The release from which generate(use_cache=False) gives a class's generated tokens the token type of text after the
# prompt; before it they repeat the prompt's last type (PaliGemma: 0, so each joins the bidirectional prefix, and
# generation with and without the cache differ).
UNCACHED_TOKEN_TYPES_SINCE = {"PaliGemmaForConditionalGeneration": "5.18.0"}


class KnownIssueWarning(UserWarning):
    """This transformers release computes something differently from the release vlm-interp is checked against."""


def applies_final_softcap(model_class: str) -> bool:
    """Whether ``model_class`` (a class name) caps its final logits with the text config's final_logit_softcapping
    in this transformers release; classes not listed apply whatever their adapter states."""
    since = FINAL_SOFTCAP_SINCE.get(model_class)
    return since is None or VERSION >= Version(since)


def uncached_generation_problem(model: Any) -> str:
    """Why ``model.generate(use_cache=False)`` is not what the cached generation computes in this release ("" if it
    is)."""
    name = type(model).__name__
    since = UNCACHED_TOKEN_TYPES_SINCE.get(name)
    if since is None or VERSION >= Version(since):
        return ""
    return (f"transformers {VERSION} gives {name}'s generated tokens the prompt's token type when generating without "
            f"the key/value cache (fixed in {since}): they join the bidirectional prefix, so the tokens differ from "
            "generation with the cache; generate with the cache or use a newer transformers")


# ---- private helpers of modeling files --------------------------------------------------
def _llava_next_helper(name: str):
    from transformers.models.llava_next import modeling_llava_next

    helper = getattr(modeling_llava_next, name, None)
    if helper is None:
        raise CompatibilityError(f"transformers {VERSION} has no llava_next.modeling_llava_next.{name}; "
                                 f"LLaVA-NeXT image geometry needs it (tested with {TESTED[0]}..{TESTED[1]})")
    return helper


def anyres_grid_shape(image_size: tuple[int, int], grid_pinpoints, patch_size: int) -> tuple[int, int]:
    """(tiles high, tiles wide) LLaVA-NeXT picks for an image of (height, width)."""
    return tuple(_llava_next_helper("get_anyres_image_grid_shape")(image_size, grid_pinpoints, patch_size))


def unpad_image(features: torch.Tensor, original_size: torch.Tensor) -> torch.Tensor:
    """LLaVA-NeXT's removal of the padding rows or columns from a (channels, height, width) feature map."""
    return _llava_next_helper("unpad_image")(features, original_size)


def tile_canvas(image_hw: tuple[int, int], tile_hw: tuple[int, int], min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """(columns, rows) of tiles the GOT-OCR2 image processor (InternVL's) cuts an image of (height, width) into."""
    from transformers.models.got_ocr2 import image_processing_pil_got_ocr2 as module

    helper = getattr(module, "get_optimal_tiled_canvas", None)
    if helper is None:
        raise CompatibilityError(f"transformers {VERSION} has no got_ocr2.image_processing_pil_got_ocr2."
                                 f"get_optimal_tiled_canvas; InternVL image geometry needs it "
                                 f"(tested with {TESTED[0]}..{TESTED[1]})")
    cols, rows = helper(tuple(image_hw), tuple(tile_hw), min_tiles, max_tiles)
    return int(cols), int(rows)


def fit_to_canvas(image_hw: tuple[int, int], canvas_hw: tuple[int, int], tile: int) -> tuple[int, int]:
    """(height, width) the Mllama image processor resizes an image of (height, width) to inside its tile canvas."""
    from transformers.models.mllama import image_processing_pil_mllama as module

    helper = getattr(module, "get_image_size_fit_to_canvas", None)
    if helper is None:
        raise CompatibilityError(f"transformers {VERSION} has no mllama.image_processing_pil_mllama."
                                 f"get_image_size_fit_to_canvas; Mllama image geometry needs it "
                                 f"(tested with {TESTED[0]}..{TESTED[1]})")
    height, width = helper(int(image_hw[0]), int(image_hw[1]), int(canvas_hw[0]), int(canvas_hw[1]), int(tile))
    return int(height), int(width)
# ---- models placed by accelerate ---------------------------------------------------------
def device_map(model: Any) -> dict | None:
    """The module-to-device map of a model that accelerate placed (``from_pretrained(device_map=...)``), else None."""
    found = getattr(model, "hf_device_map", None)
    return dict(found) if found else None


def accepts_keyword(module: Any, name: str) -> bool:
    """Whether ``module.forward`` names ``name`` among its parameters (a catch-all ``**kwargs`` does not count)."""
    import inspect

    return name in inspect.signature(module.forward).parameters
