"""LLaVA-OneVision (LlavaOnevisionForConditionalGeneration) on a tiny random model: the image-token layout across
sizes and aspect ratios against hand-worked grids, tile geometry, layout refusal, the fast path, interventions (POPE
and compare across families: tests/test_family_paligemma.py)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import vlm_interp as vi
from vlm_interp.corruptions import CorruptionError, noise
from vlm_interp.interventions import InjectionPlan, inject, modulate_heads, vhr
from vlm_interp.sites import Site
from vlm_interp.tiny import tiny
from vlm_interp.tracing import engine, fast, trace

from conftest import QUESTION, STRICT_TRANSFORMERS
from family_references import check_cache_on_and_off, plain_grid, raw_value

pytestmark = STRICT_TRANSFORMERS

FAMILY = "llava_onevision"


@pytest.fixture(scope="module")
def vlm() -> vi.VLM:
    vlm = vi.wrap(*tiny(FAMILY, seed=0))
    with torch.no_grad():
        vlm.model.lm_head.weight.mul_(40.0)  # so that restoring one cell moves the answer visibly
    return vlm


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)


# (height, width) -> (rows, cols) of the tiles' grid, worked by hand from the pinpoints (32 = one 4x4 tile):
#   32x32: one tile, 4x4.  40x64: best fit 64x64 (2x2 tiles, 8x8), the image fills 40 of 64 rows -> 5 of 8 feature
#   rows, padding (8 - 5) // 2 = 1 cut at each side -> 6x8.  64x40: the same, transposed -> 8x6.
#   128x128: 4x4 tiles, 16x16 > 9 base grids: ratio sqrt(256 / 144) = 4/3 -> 16 // (4/3) = 12 -> 12x12.
GRIDS = {(32, 32): (4, 4), (40, 64): (6, 8), (64, 40): (8, 6), (128, 128): (12, 12)}


@pytest.mark.parametrize("size", list(GRIDS))
def test_image_tokens_follow_size_and_aspect_ratio(vlm, size):
    rows, cols = GRIDS[size]
    ex = vlm.prepare(_image(*size), QUESTION)
    image = ex.groups["lm"]["image"]
    assert len(image) == 16 + rows * (cols + 1)  # base grid, then each row of the tiles' grid and its newline
    assert len(ex.boxes["lm"]) == len(image) - rows  # newline tokens cover no patch
    newlines = [image[16 + r * (cols + 1) + cols] for r in range(rows)]
    assert not set(newlines) & set(ex.boxes["lm"])


def test_sites_command_and_chat_template(vlm, image, capsys):
    from vlm_interp.cli import main

    assert main(["sites", "--model", f"tiny:{FAMILY}"]) == 0
    out = capsys.readouterr().out
    assert "LlavaOnevisionForConditionalGeneration" in out and "vision.head: 8 sites" in out and "lm.mlp: 2 sites" in out
    assert vlm.prepare(image, QUESTION).prompt == f"USER: <image>\n{QUESTION} ASSISTANT:"  # the processor's template


def test_object_group_through_the_base_view_and_the_tiles(vlm):
    """A box on a 40x64 image, worked by hand. Base view: the image squashed to 32x32, cells of 10 rows x 16 columns
    of the original: x 8..16, y 0..10 lies in cell (0, 0). Tiles: a 6x8 grid over the image, cells 6.67 x 8: the box
    covers rows 0 and 1 of column 1, i.e. image tokens 16 + 0 * 9 + 1 and 16 + 1 * 9 + 1."""
    ex = vlm.prepare(_image(40, 64), QUESTION, region=(8, 0, 16, 10))
    image = ex.groups["lm"]["image"]
    assert ex.groups["lm"]["object"] == [image[0], image[17], image[26]]
    assert ex.groups["vision"]["object"] == [0]  # the base view's patch (no class token in SigLIP)


def test_pairs_with_different_layouts_are_refused(vlm):
    clean = vlm.prepare(_image(32, 32), QUESTION, answer="yes")
    other = vlm.prepare(_image(40, 64, seed=1), QUESTION, answer="yes")
    with pytest.raises(CorruptionError, match="same image size"):
        trace(vlm, clean, other, components=["lm.hidden"], tokens=["last"], progress=False)


def test_noise_covers_the_tiles(vlm, image):
    ex = vlm.prepare(image, QUESTION, region=(8, 8, 16, 16))
    bad = noise(vlm, ex, scale=1.0, tokens="object", seed=0)
    site = Site("lm", "input", 0)
    delta = (raw_value(vlm, bad, site) - raw_value(vlm, ex, site)).abs().sum(-1)[0]
    assert delta.nonzero().flatten().tolist() == ex.groups["lm"]["object"]
    patches = noise(vlm, ex, scale=1.0, place="patches")
    assert patches.edits[0].noise.shape[0] == ex.inputs["pixel_values"].shape[1] == 2  # the base view and one tile


def test_fast_path_reuses_keys_and_values_and_equals_the_plain_loop(vlm, image, other_image):
    clean = vlm.prepare(image, QUESTION, answer="yes")
    corrupt = vlm.prepare(other_image, QUESTION, answer="yes")
    state, why = fast.lm_start(vlm, corrupt)
    assert state is not None and state.kv_reuse and state.blocks == [], why or state.why_no_kv
    answer_id = vlm.encode_answer(clean, "yes")[0]
    image_pos = clean.groups["lm"]["image"]
    positions = [[p] for p in image_pos[::9]] + [[p] for p in clean.groups["lm"]["question"]] + [[clean.n_tokens - 1]]
    components = ("input", "attn", "mlp")
    expected = np.array([plain_grid(vlm, clean, corrupt, c, positions, answer_id) for c in components])
    assert float(np.std(expected)) > 1e-2
    with warnings.catch_warnings():
        warnings.simplefilter("error", engine.FastPathWarning)
        tr = trace(vlm, clean, corrupt, components=[f"lm.{c}" for c in components],
                   tokens={str(p[0]): p for p in positions}, metric="logprob", batch_size=6, progress=False)
    np.testing.assert_allclose(tr.data.values, expected, atol=1e-4, rtol=0)


def test_interventions_during_generate_with_and_without_cache(vlm, image):
    ex = vlm.prepare(image, QUESTION)
    check_cache_on_and_off(vlm, ex, lambda: modulate_heads(vlm, {"lm.head.1.2": 3.0, "lm.head.0.0": 0.0}))
    check_cache_on_and_off(vlm, ex, lambda: vhr(vlm, alpha=4.0))
    check_cache_on_and_off(vlm, ex, lambda: inject(vlm, InjectionPlan({"mlp": {1: {0: 1.0}}}, {"mlp": 2.0})))
