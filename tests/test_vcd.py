"""VCD: a logits processor of generate, checked against a plain step-by-step loop and hand-made noise."""

from __future__ import annotations

import pytest
import torch

import vlm_interp as vi
from vlm_interp.interventions import InterventionError, from_spec, modulate_heads, vcd, vhr
from vlm_interp.interventions.vcd import diffusion_noise, vcd_logits
from vlm_interp.tiny import tiny

from conftest import QUESTION, STRICT_TRANSFORMERS

pytestmark = STRICT_TRANSFORMERS


@pytest.fixture(scope="module")
def llava():
    return vi.wrap(*tiny("llava", seed=0))


def new_tokens(vlm, inputs, n=5):
    # tiny random models may generate their image token, which VCD's contrast run cannot re-feed (it says so)
    suppress = [vlm.image_token_id] if vlm.image_token_id is not None else None
    with torch.no_grad():
        out = vlm.model.generate(**inputs, max_new_tokens=n, do_sample=False, suppress_tokens=suppress,
                                 logits_processor=vlm.logits_processor(inputs))
    return vlm.decoder.generated(out, inputs)


def noisy(pixels, step, seed):
    """The diffusion noise written out independently: x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps."""
    abar = 1.0
    for k in range(step + 1):
        beta = torch.sigmoid(torch.tensor(-6 + 12 * k / 999, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
        abar *= float(1 - beta)
    eps = torch.randn(pixels.shape[1:], generator=torch.Generator().manual_seed(seed))
    return abar ** 0.5 * pixels + (1 - abar) ** 0.5 * eps


@pytest.mark.parametrize("family", ["llava", "instructblip", "blip"])
def test_alpha_zero_is_plain_greedy_token_for_token(family, image):
    vlm = vi.wrap(*tiny(family, seed=0))
    ex = vlm.prepare(image, QUESTION)
    plain = new_tokens(vlm, ex.inputs, 6)
    with vcd(vlm, alpha=0.0) as state:
        assert torch.equal(new_tokens(vlm, ex.inputs, 6), plain)
    assert state.steps >= 1


def test_generation_matches_a_plain_loop(llava, image):
    """Each step of VCD's generation equals one clean and one distorted forward over the sequence so far."""
    ex = llava.prepare(image, QUESTION)
    distorted = {**ex.inputs, "pixel_values": noisy(ex.inputs["pixel_values"], 500, 3)}
    ids = torch.empty(1, 0, dtype=torch.long)
    with torch.no_grad():
        for _ in range(5):
            clean = llava.logits(llava.decoder.with_answer(llava.model, dict(ex.inputs), ids))[:, -1]
            contrast = llava.logits(llava.decoder.with_answer(llava.model, dict(distorted), ids))[:, -1]
            logits = 2 * clean - contrast
            logits[clean < clean.max() + torch.log(torch.tensor(0.1))] = -float("inf")
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    with vcd(llava, alpha=1.0, seed=3):
        got = new_tokens(llava, ex.inputs, 5)
    assert torch.equal(got, ids)
    # the contrast changes the answer's logits (the test could fail): first-token scores see VCD too
    with vcd(llava, alpha=1.0, seed=3):
        first = llava.first_token_logits(ex)
    assert not torch.allclose(first, llava.first_token_logits(ex))


def test_noise_and_plausibility_by_hand():
    pixels = torch.randn(2, 3, 4, 4)
    got = diffusion_noise(pixels, 500, seed=7)
    torch.testing.assert_close(got[1:], noisy(pixels[1:], 500, 7), atol=1e-6, rtol=0)
    torch.testing.assert_close(got[:1], noisy(pixels[:1], 500, 7), atol=1e-6, rtol=0)  # same draw in every row
    logits = torch.tensor([[2.0, 1.0, -3.0]])
    out = vcd_logits(logits, torch.tensor([[0.0, 3.0, -9.0]]), alpha=1.0, beta=0.1)
    # p(token) >= 0.1 p(max) <=> logit >= 2 + log 0.1 = -0.30: the third token is cut
    assert out.tolist() == [[4.0, -1.0, -float("inf")]]
    with pytest.raises(InterventionError, match="noise_step"):
        diffusion_noise(pixels, 1000)


def test_batched_and_one_at_a_time_give_the_same_tokens(llava, image, other_image):
    one, two = llava.prepare(image, QUESTION), llava.prepare(other_image, QUESTION)
    batch = {k: torch.cat([one.inputs[k], two.inputs[k]]) for k in one.inputs}
    with vcd(llava, alpha=1.0):
        alone = [new_tokens(llava, e.inputs) for e in (one, two)]
        together = new_tokens(llava, batch)
    assert torch.equal(together, torch.cat(alone))


def test_contrast_run_sees_head_modulation_and_refuses_vhr(llava, image):
    ex = llava.prepare(image, QUESTION)
    scales = {"lm.head.1.0": 0.0, "lm.head.0.1": 2.0}
    with modulate_heads(llava, scales):
        clean = llava.first_token_logits(ex)
        distorted = {**ex.inputs, "pixel_values": diffusion_noise(ex.inputs["pixel_values"], 500, 0)}
        with torch.no_grad():
            contrast = llava.logits(distorted)[0, llava.answer_start(ex)]
        with vcd(llava, alpha=1.0):
            stacked = llava.first_token_logits(ex)
    torch.testing.assert_close(stacked, vcd_logits(clean[None], contrast[None], 1.0, 0.1)[0])
    with pytest.raises(InterventionError, match="do not stack"):
        with vhr(llava, alpha=2.0), vcd(llava, alpha=1.0):
            llava.generate(ex, max_new_tokens=2)


def test_spec_errors_and_silence(llava, image):
    ex = llava.prepare(image, QUESTION, answer="yes")
    with pytest.raises(InterventionError, match="never contrasted"):
        with from_spec("vcd:alpha=1,beta=0.2")(llava):
            pass
    with pytest.raises(InterventionError, match="unknown vcd option 'gamma'"):
        from_spec("vcd:gamma=1")
    with pytest.raises(vi.VLMInterpError, match="whole-answer scores"):
        with vcd(llava):
            llava.first_token_logits(ex)
            llava.score(ex)
    assert llava.logits_processors == []
