"""Shared fixtures: tiny random models of every family, and a fixed test image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vlm_interp as vi
from vlm_interp.tiny import FAMILIES, tiny

QUESTION = "Is there a red circle ?"


@pytest.fixture(scope="session", params=FAMILIES)
def vlm(request) -> vi.VLM:
    return vi.wrap(*tiny(request.param, seed=0))


@pytest.fixture(scope="session")
def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="session")
def other_image() -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8"))


def run_logits(vlm: vi.VLM, ex: vi.Example) -> torch.Tensor:
    with torch.no_grad():
        return vlm.logits(ex.inputs)


# Test modules that exercise transformers' internals most closely (the fast tracing path, generation) turn
# transformers' deprecations into errors: a keyword or class that a release deprecates fails them at once.
STRICT_TRANSFORMERS = [
    pytest.mark.filterwarnings("error::FutureWarning"),
    pytest.mark.filterwarnings("error::DeprecationWarning"),
    pytest.mark.usefixtures("no_transformers_deprecations"),
]


# Deprecations transformers logs from its own code, which no call of ours causes or can avoid: at 5.13
# Gemma3Processor.__call__ reads its own deprecated image_token property (vlm-interp reads tokenizer.boi_token).
TRANSFORMERS_OWN_DEPRECATIONS = ("`processor.image_token` will switch from returning",)


@pytest.fixture
def no_transformers_deprecations():
    """Fail when transformers logs a deprecation (it logs some, such as renamed keywords, instead of warning)."""
    import logging

    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(level=logging.WARNING)
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.WARNING)  # the command line lowers it to errors for its own output
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    deprecated = [r.getMessage() for r in records if "deprecat" in r.getMessage().lower()
                  and not any(known in r.getMessage() for known in TRANSFORMERS_OWN_DEPRECATIONS)]
    assert not deprecated, f"transformers logged deprecations: {deprecated}"
