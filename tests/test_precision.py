"""Half precision end to end: bf16 runs of tracing, head scores, attribution patching, interventions and evaluation,
against float32 runs of the same organism.

Tolerance: bf16 keeps 8 significant bits, so a logit of size up to about 10 (the organisms' largest) carries a
rounding error of up to 2^-8 x 10 ~ 0.04; a probability moves by at most p (1 - p) <= 1/4 times that, so
probability-valued results (trace effects, head scores, P(yes)) agree with float32 within 1e-2.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import vlm_interp as vi
from vlm_interp.corruptions import noise
from vlm_interp.hallucination.pope import logit_answer
from vlm_interp.interventions import modulate_heads, score_heads, vhr
from vlm_interp.tracing import trace
from vlm_interp.tracing.attribution import attribution_patching
from vlm_interp.tracing.engine import FastPathWarning

PROB_TOL = 1e-2
TOKENS = ["image", "question", "last"]


def _runs(dtype: str) -> dict:
    from vlm_interp.zoo.organisms import ORGANISM_WORLD
    from vlm_interp.zoo.shapes import World
    from vlm_interp.zoo.tasks import existence_question

    vlm = vi.load("zoo:shapes-llava", dtype=dtype)
    scene = World(ORGANISM_WORLD).scene(1)
    ex = vlm.prepare(scene.pil(), existence_question(scene.objects[0].shape), answer="yes")
    bad = noise(vlm, ex, scale="3sd", tokens="image", seed=0)
    out = {"vlm": vlm}
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPathWarning)  # the fast path and its self-check hold in bf16 too
        out["trace"] = trace(vlm, ex, bad, components=["lm.hidden", "lm.attn", "lm.mlp"], tokens=TOKENS,
                             progress=False)
    out["general"] = trace(vlm, ex, bad, components=["lm.hidden"], tokens=TOKENS, progress=False, fast_path=False)
    out["attribution"] = attribution_patching(vlm, ex, bad, components=["lm.hidden"], tokens=TOKENS)
    out["heads"] = score_heads(vlm, [ex], progress=False)
    out["pope"] = logit_answer(vlm, ex)
    out["plain"] = vlm.generate(ex, max_new_tokens=4)
    with modulate_heads(vlm, {"lm.head.1.0": 1.0}):
        out["unit_scale"] = vlm.generate(ex, max_new_tokens=4)
    with vhr(vlm, alpha=2.0) as state:
        out["vhr"] = vlm.generate(ex, max_new_tokens=4)
    out["vhr_heads"] = state.heads
    return out


@pytest.fixture(scope="module")
def runs() -> dict[str, dict]:
    return {"fp32": _runs("fp32"), "bf16": _runs("bf16")}


def test_weights_load_in_bf16(runs):
    assert runs["bf16"]["vlm"].dtype == torch.bfloat16 and runs["fp32"]["vlm"].dtype == torch.float32


def test_traces_in_bf16_match_float32(runs):
    a, b = runs["fp32"], runs["bf16"]
    for key in ("trace", "general", "attribution"):
        assert np.isfinite(b[key].data.values).all()
        np.testing.assert_allclose(b[key].data.values, a[key].data.values, atol=PROB_TOL, rtol=0)
    assert b["trace"].data.dtype == np.float64  # metrics are read in float32 and kept as float64 arrays
    np.testing.assert_allclose(b["trace"].data.sel(component="hidden").values, b["general"].data.sel(component="hidden").values,
                               atol=PROB_TOL, rtol=0)  # the fast path and the general path, both in bf16


def test_head_scores_and_answers_in_bf16_match_float32(runs):
    a, b = runs["fp32"], runs["bf16"]
    np.testing.assert_allclose(b["heads"].data.values, a["heads"].data.values, atol=PROB_TOL, rtol=0)
    assert b["pope"]["logit_answer"] == a["pope"]["logit_answer"]
    assert b["pope"]["p_yes"] == pytest.approx(a["pope"]["p_yes"], abs=PROB_TOL)


def test_interventions_run_in_bf16(runs):
    b = runs["bf16"]
    assert b["unit_scale"] == b["plain"]  # a head scaled by 1 changes nothing
    assert b["vhr_heads"] and all(h.startswith("lm.head.") for h in b["vhr_heads"][0])
    assert isinstance(b["vhr"], str)
