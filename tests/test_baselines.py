"""Input-attribution baselines against independent computations: plain forwards, IG completeness, the patch grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vlm_interp as vi
from vlm_interp.tracing import trace
from vlm_interp.tracing.baselines import (BaselineError, baseline_pixels, patch_feature_ablation,
                                          pixel_integrated_gradients)
from vlm_interp.tracing.groundtruth import map_auroc, patch_neighbourhoods

from conftest import QUESTION

PATCH, SIDE = 8, 4  # tiny models: 32x32 images in 8-pixel patches


@pytest.fixture(scope="module")
def llava():
    return vi.load("tiny:llava")


@pytest.fixture(scope="module")
def instructblip():
    return vi.load("tiny:instructblip")


def plain_prob(vlm, ex, pixels: torch.Tensor) -> float:
    """Probability of the example's first answer token with these pixels, by one plain forward."""
    with torch.no_grad():
        logits = vlm.logits({**ex.inputs, "pixel_values": pixels})
    return float(torch.softmax(logits[0, vlm.answer_start(ex)].float(), -1)[ex.answer_ids[0]])


def plain_logprob(vlm, ex, pixels: torch.Tensor) -> float:
    """Log-probability of the first answer token with these pixels, by one plain forward."""
    with torch.no_grad():
        logits = vlm.logits({**ex.inputs, "pixel_values": pixels})
    return float(torch.log_softmax(logits[0, vlm.answer_start(ex)].float(), -1)[ex.answer_ids[0]])


def ablated(pixels: torch.Tensor, base: torch.Tensor, k: int) -> torch.Tensor:
    """``pixels`` with the pixels of row-major patch ``k`` replaced by the baseline's."""
    r, c = divmod(k, SIDE)
    out = pixels.clone()
    rows, cols = slice(r * PATCH, (r + 1) * PATCH), slice(c * PATCH, (c + 1) * PATCH)
    out[..., rows, cols] = base[..., rows, cols]
    return out


@pytest.mark.parametrize("baseline", ["mean", "black", 0.5])
def test_feature_ablation_equals_plain_forwards(llava, image, baseline):
    ex = llava.prepare(image, QUESTION, answer="yes")
    fa = patch_feature_ablation(llava, ex, baseline=baseline, batch_size=5)
    pixels = ex.inputs["pixel_values"]
    base = baseline_pixels(llava, ex, baseline)
    clean = plain_prob(llava, ex, pixels)
    assert fa.attrs["input_score"] == pytest.approx(clean, abs=1e-6)
    expected = [clean - plain_prob(llava, ex, ablated(pixels, base, k)) for k in range(SIDE * SIDE)]
    np.testing.assert_allclose(fa.values, expected, atol=1e-6)
    assert np.abs(fa.values).max() > 0  # the tiny model does react to its pixels


def test_black_baseline_is_black_pixels(llava, image):
    from PIL import Image

    ex = llava.prepare(image, QUESTION, answer="yes")
    black = llava.prepare(Image.new("RGB", image.size), QUESTION, answer="yes")
    torch.testing.assert_close(baseline_pixels(llava, ex, "black"), black.inputs["pixel_values"], atol=1e-5, rtol=0)


def test_feature_ablation_on_instructblip_vision_positions(instructblip, image):
    ex = instructblip.prepare(image, QUESTION, answer="yes")
    fa = patch_feature_ablation(instructblip, ex, metric="logprob", baseline="black")
    assert fa.attrs["tower"] == "vision"
    assert list(fa.coords["position"].values) == ex.groups["vision"]["image"] == list(range(1, 17))
    pixels, base = ex.inputs["pixel_values"], baseline_pixels(instructblip, ex, "black")
    clean = plain_logprob(instructblip, ex, pixels)
    expected = [clean - plain_logprob(instructblip, ex, ablated(pixels, base, k)) for k in range(SIDE * SIDE)]
    np.testing.assert_allclose(fa.values, expected, atol=1e-5)


@pytest.mark.parametrize("family", ["llava", "instructblip"])
def test_integrated_gradients_completeness(family, image, request):
    vlm = request.getfixturevalue(family)
    ex = vlm.prepare(image, QUESTION, answer="yes")
    pixels = ex.inputs["pixel_values"]
    base = baseline_pixels(vlm, ex, "black")
    ig = pixel_integrated_gradients(vlm, ex, metric="logprob", baseline="black", steps=64)
    gap = plain_logprob(vlm, ex, pixels) - plain_logprob(vlm, ex, base)
    assert abs(gap) > 1e-4  # a real difference to attribute
    assert float(ig.sum()) == pytest.approx(gap, abs=1e-3 + 0.02 * abs(gap))
    assert ig.attrs["input_score"] - ig.attrs["baseline_score"] == pytest.approx(gap, abs=1e-5)
    magnitude = pixel_integrated_gradients(vlm, ex, metric="logprob", baseline="black", steps=64, reduce="abs")
    assert np.all(magnitude.values >= np.abs(ig.values) - 1e-6)


def test_integrated_gradients_patch_sums_match_captum_pixels(llava, image):
    """The per-patch map is captum's pixel attribution summed over each patch's 8x8 pixels and channels."""
    from captum.attr import IntegratedGradients

    from vlm_interp.tracing.baselines import metric_function

    ex = llava.prepare(image, QUESTION, answer="yes")
    pixels = ex.inputs["pixel_values"]
    forward = metric_function(llava, ex, "prob")
    attr = IntegratedGradients(forward).attribute(pixels, baselines=torch.zeros_like(pixels), n_steps=16)[0]
    ig = pixel_integrated_gradients(llava, ex, steps=16)
    for k in range(SIDE * SIDE):
        r, c = divmod(k, SIDE)
        block = attr[:, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH]
        assert float(ig.values[k]) == pytest.approx(float(block.sum()), abs=1e-6)


def test_positions_line_up_with_trace_and_regions(llava, image, other_image):
    """Map positions are the LM image tokens, in patch order, the same positions trace() reports."""
    ex = llava.prepare(image, QUESTION, answer="yes")
    fa = patch_feature_ablation(llava, ex)
    ig = pixel_integrated_gradients(llava, ex, steps=4)
    image_pos = ex.groups["lm"]["image"]
    assert list(fa.coords["position"].values) == list(ig.coords["position"].values) == image_pos
    assert list(fa.coords["row"].values) == [k // SIDE for k in range(SIDE * SIDE)]
    assert list(fa.coords["col"].values) == [k % SIDE for k in range(SIDE * SIDE)]
    corrupt = llava.prepare(other_image, QUESTION, answer="yes")
    tr = trace(llava, ex, corrupt, components=["lm.hidden"], tokens="each", progress=False)
    traced_image = [int(p) for p, g in zip(tr.data.coords["position"].values, tr.data.coords["group"].values)
                    if g == "image"]
    assert traced_image == image_pos
    # a region over one patch (row 2, column 1 of the grid) selects exactly that patch's map position
    for k in (0, 9, 15):
        r, c = divmod(k, SIDE)
        region = (c * PATCH + 1, r * PATCH + 1, (c + 1) * PATCH - 1, (r + 1) * PATCH - 1)
        with_region = llava.prepare(image, QUESTION, answer="yes", region=region)
        assert with_region.groups["lm"]["object"] == [int(fa.coords["position"].values[k])]


def test_map_auroc_scores_trace_and_baseline_the_same_way(llava, image):
    ex = llava.prepare(image, QUESTION, answer="yes")
    fa = patch_feature_ablation(llava, ex)
    positions = [int(p) for p in fa.coords["position"].values]
    object_positions = positions[:3]
    perfect = fa.copy(data=np.arange(len(positions))[::-1].astype(float))
    assert map_auroc(perfect, object_positions) == 1.0
    assert map_auroc(-perfect, object_positions) == 0.0
    assert map_auroc(perfect.values, object_positions, positions) == 1.0
    with pytest.raises(ValueError, match="positions="):
        map_auroc(perfect.values, object_positions)


def test_patch_neighbourhoods_clip_at_edges():
    hoods = patch_neighbourhoods(list(range(100, 116)), 4, 4)
    assert hoods["100"] == [100, 101, 104, 105]
    assert hoods["105"] == [100, 101, 102, 104, 105, 106, 108, 109, 110]
    assert len(hoods["115"]) == 4
    with pytest.raises(ValueError, match="grid"):
        patch_neighbourhoods([1, 2, 3], 2, 2)


def test_clear_errors(llava, image):
    ex = llava.prepare(image, QUESTION, answer="yes")
    with pytest.raises(BaselineError, match="baseline"):
        patch_feature_ablation(llava, ex, baseline="grey")
    with pytest.raises(BaselineError, match="reduce"):
        pixel_integrated_gradients(llava, ex, reduce="max")
    with pytest.raises(BaselineError, match="steps"):
        pixel_integrated_gradients(llava, ex, steps=0)
    nxt = vi.load("tiny:llava_next")
    with pytest.raises(BaselineError, match="LLaVA-NeXT"):
        patch_feature_ablation(nxt, nxt.prepare(image, QUESTION, answer="yes"))
