"""PaliGemma 2 (PaliGemmaForConditionalGeneration with a Gemma 2 LM) and PaliGemma 1 (a Gemma LM) on tiny random
models: the prefix LM, explicit positions, dropped labels, the soft cap, checked against the model's own behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vlm_interp as vi
from vlm_interp import compat
from vlm_interp.interventions import InjectionPlan, InterventionError, inject, modulate_heads, vhr
from vlm_interp.tiny.paligemma import SOFTCAP, paligemma
from vlm_interp.tracing import engine, fast, trace

from conftest import QUESTION, STRICT_TRANSFORMERS, run_logits
from family_references import check_cache_on_and_off, plain_grid, sharp_gemma

# PaliGemmaProcessor builds its labels with np.array() on torch tensors, which numpy 2 warns about (transformers' code)
NUMPY_COPY = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
pytestmark = STRICT_TRANSFORMERS + [NUMPY_COPY]

FAMILY = "paligemma"
N_IMAGE = 16  # one token per patch of the 4x4 grid, at positions 0..15, then <s>


@pytest.fixture(scope="module")
def vlm() -> vi.VLM:
    return sharp_gemma(FAMILY)


def test_prepare_drops_labels_and_maps_patches_one_for_one(vlm, image, capsys):
    from vlm_interp.cli import main

    ex = vlm.prepare(image, QUESTION, answer="yes", region=(24, 0, 32, 8))
    assert "labels" not in ex.inputs and "labels" in vlm.processor(images=image, text=ex.prompt, return_tensors="pt")
    assert ex.prompt == f"<image>answer en {QUESTION}"
    lm = ex.groups["lm"]
    assert lm["image"] == list(range(N_IMAGE)) and ex.tokens[N_IMAGE] == "<s>"
    assert ex.inputs["token_type_ids"].sum() == 0  # the whole prompt is the prefix
    assert [ex.tokens[p] for p in lm["question"]] == QUESTION.split()
    assert ex.groups["vision"]["object"] == [3] and lm["object"] == [3]
    assert ex.answer_ids == vlm.tokenizer("yes", add_special_tokens=False)["input_ids"]  # tokenized on its own
    assert main(["sites", "--model", f"tiny:{FAMILY}"]) == 0
    assert "lm.head: 8 sites" in capsys.readouterr().out


def test_answer_tokens_are_the_causal_suffix(vlm, image):
    """Scoring feeds the answer as type-1 tokens after the type-0 prefix, as generation does: the score of a
    two-token answer equals two plain forwards built by hand with the model's own keywords."""
    ex = vlm.prepare(image, QUESTION, answer="red circle")
    first, second = ex.answer_ids
    score = vlm.score(ex)
    inputs = dict(ex.inputs)
    with torch.no_grad():
        p1 = torch.log_softmax(vlm.model(**inputs).logits[0, -1], -1)[first]
        inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([[first]])], 1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        inputs["token_type_ids"] = torch.cat([inputs["token_type_ids"], torch.tensor([[1]])], 1)
        p2 = torch.log_softmax(vlm.model(**inputs).logits[0, -1], -1)[second]
        inputs["token_type_ids"][0, -1] = 0  # had the answer been prefix, the score would differ
        wrong = torch.log_softmax(vlm.model(**inputs).logits[0, -1], -1)[second]
    assert score.logprob == pytest.approx(float(p1 + p2), abs=1e-5)
    assert abs(float(wrong - p2)) > 1e-4


def test_the_prefix_attends_both_ways_and_the_fast_path_reuses_no_prefix(vlm, image, other_image):
    clean = vlm.prepare(image, QUESTION, answer="yes")
    corrupt = vlm.prepare(other_image, QUESTION, answer="yes")
    n = clean.n_tokens
    assert vlm.adapter.adapter.attention_blocks(vlm.model.config, clean.inputs) == [(0, n - 1)]
    # the model's own attention: the last prompt token reaches the first image token's layer-0 attention
    layer = vlm.model.model.language_model.layers[0]
    seen = []

    def bump(module, args, kwargs):
        x = args[0].clone()
        x[:, n - 1] += 1.0
        return (x, *args[1:]), kwargs

    grab = layer.self_attn.register_forward_hook(lambda m, a, o: seen.append(o[0][0, 0].clone()))
    try:
        run_logits(vlm, clean)
        handle = layer.register_forward_pre_hook(bump, with_kwargs=True)
        run_logits(vlm, clean)
        handle.remove()
    finally:
        grab.remove()
    assert not torch.allclose(seen[0], seen[1])
    state, why = fast.lm_start(vlm, corrupt)
    assert state is not None, why
    assert not state.kv_reuse and "prefix LM" in state.why_no_kv
    assert state.inputs[0].kwargs["position_ids"][0, :3].tolist() == [1, 2, 3]  # positions start at 1
    assert state.softcap == (SOFTCAP if compat.applies_final_softcap("PaliGemmaForConditionalGeneration") else None)
    answer_id = vlm.encode_answer(clean, "yes")[0]
    positions = [[p] for p in (0, N_IMAGE - 1, N_IMAGE, N_IMAGE + 4, n - 1)]
    components = ("input", "attn", "mlp")
    expected = np.array([plain_grid(vlm, clean, corrupt, c, positions, answer_id) for c in components])
    assert float(np.std(expected)) > 1e-3
    with pytest.warns(engine.FastPathWarning, match="prefix LM"):
        tr = trace(vlm, clean, corrupt, components=[f"lm.{c}" for c in components],
                   tokens={str(p[0]): p for p in positions}, metric="logprob", batch_size=4, progress=False)
    np.testing.assert_allclose(tr.data.values, expected, atol=1e-4, rtol=0)


def test_a_causal_claim_fails_the_self_check(vlm, image, other_image):
    """An adapter that called PaliGemma's LM causal: the self-check, restarting inside the image tokens, fails."""
    import dataclasses

    from vlm_interp.adapters import BoundAdapter

    corrupt = vlm.prepare(other_image, QUESTION, answer="yes")
    liar = vi.VLM(vlm.model, vlm.processor,
                  BoundAdapter(dataclasses.replace(vlm.adapter.adapter, attention_blocks=None), vlm.model))
    state, why = fast.lm_start(liar, corrupt)
    reason = why if state is None else state.why_no_kv
    assert "does not reproduce" in reason, reason


def test_the_soft_cap_is_what_makes_the_tail_exact(vlm, image):
    """The model caps its logits from transformers 5.23 (before, it returns them uncapped), and the adapter's tail does
    exactly what this release does: the generic tail test could fail either way."""
    ex = vlm.prepare(image, QUESTION)
    grab = vlm.hook("lm.hidden.-1", capture=True)
    with vlm.attach([grab]):
        logits = run_logits(vlm, ex)
    with torch.no_grad():
        uncapped = grab.value
        for module in vlm.adapter.tail_modules("lm"):
            uncapped = module(uncapped)
    assert float(uncapped.abs().max()) > SOFTCAP
    if compat.applies_final_softcap("PaliGemmaForConditionalGeneration"):
        assert vlm.adapter.logit_softcap("lm") == SOFTCAP and float(logits.abs().max()) <= SOFTCAP
        torch.testing.assert_close(torch.tanh(uncapped / SOFTCAP) * SOFTCAP, logits, rtol=0, atol=1e-6)
    else:
        assert vlm.adapter.logit_softcap("lm") is None
        torch.testing.assert_close(uncapped, logits, rtol=0, atol=1e-6)


def test_paligemma_1_has_llamas_layout_and_no_cap(image):
    torch.manual_seed(0)
    model, processor = paligemma(gemma2=False)
    vlm = vi.wrap(model.eval(), processor)
    assert vlm.adapter.adapter.towers["lm"].components["attn"] == ("self_attn", "output")
    assert vlm.adapter.logit_softcap("lm") is None
    ex = vlm.prepare(image, QUESTION, answer="yes")
    site = {c: vlm.hook(f"lm.{c}.1", capture=True) for c in ("input", "attn", "mlp", "hidden")}
    with vlm.attach(site.values()):
        logits = run_logits(vlm, ex)
    torch.testing.assert_close(site["input"].value + site["attn"].value + site["mlp"].value, site["hidden"].value,
                               rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(vlm.adapter.tail_logits("lm", site["hidden"].value), logits, rtol=0, atol=1e-6)
    state, why = fast.lm_start(vlm, ex)
    assert state is not None and "prefix LM" in state.why_no_kv, why


def test_interventions_during_generate_with_and_without_cache(vlm, image):
    ex = vlm.prepare(image, QUESTION)
    check_cache_on_and_off(vlm, ex, lambda: modulate_heads(vlm, {"lm.head.1.2": 3.0, "lm.head.0.0": 0.0}))
    check_cache_on_and_off(vlm, ex, lambda: inject(vlm, InjectionPlan({"attn": {1: {0: 1.0}}}, {"attn": 2.0})))
    with pytest.raises(InterventionError, match="attend both ways"):
        with vhr(vlm):
            pass


def test_pope_on_two_images_and_compare_across_families(tmp_path):
    """POPE on two images of the built-in set for LLaVA-OneVision, Gemma 3 and PaliGemma, compared side by side."""
    from vlm_interp.hallucination.compare import compare

    models = [f"tiny:{f}" for f in ("llava_onevision", "gemma3", "paligemma")]
    result = compare(models, out=tmp_path, n_images=2, splits=["random"], n_boot=20, max_new_tokens=2,
                     progress=False)
    assert set(result.table["system"]) == set(models)
    assert len(result.table) == len(models) * 2  # systems x answer sources
    assert ((result.table["accuracy"] >= 0) & (result.table["accuracy"] <= 1)).all()
