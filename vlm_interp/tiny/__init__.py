"""Tiny randomly initialised models of every supported family, with real processors.

Used by the tests (every architecture on the real transformers classes) and by anyone who
wants to try the library without weights. Sizes are minimal: 32-wide, 2 layers, 32x32
images in 8-pixel patches. The tokenizer is a word-level one over a small vocabulary.

Each family's test configuration is one module of this package that registers a builder with
:func:`register`: a function returning ``(model, processor)`` built offline. Adding a family adds
such a module (next to its adapter file) and imports it below.
"""

from __future__ import annotations

from typing import Callable

import torch

from .common import IMAGE_SIZE, PATCH, WORDS, word_tokenizer

BUILDERS: dict[str, Callable[[], tuple]] = {}


def register(*families: str):
    """Decorator: ``@register("llava")`` makes a builder ``fn(family) -> (model, processor)`` available."""
    def deco(fn):
        for family in families:
            if family in BUILDERS:
                raise ValueError(f"tiny family {family!r} is registered twice")
            BUILDERS[family] = fn
        return fn
    return deco


# Family modules register themselves; the order here is the order of FAMILIES.
from . import llava  # noqa: E402,I001
from . import blip  # noqa: E402,I001
from . import idefics3  # noqa: E402,I001
from . import internvl  # noqa: E402,I001
from . import mllama  # noqa: E402,I001
from . import llava_onevision  # noqa: E402,I001
from . import gemma3  # noqa: E402,I001
from . import paligemma  # noqa: E402,I001
from . import qwen  # noqa: E402,I001

FAMILIES = tuple(BUILDERS)


def tiny(family: str, seed: int = 0):
    """Return ``(model, processor)``: a tiny random model of ``family`` and a matching processor."""
    if family not in BUILDERS:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    torch.manual_seed(seed)
    model, processor = BUILDERS[family](family)
    model.eval()
    return model, processor


__all__ = ["FAMILIES", "IMAGE_SIZE", "PATCH", "WORDS", "register", "tiny", "word_tokenizer"]
