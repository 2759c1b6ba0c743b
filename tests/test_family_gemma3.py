"""Gemma 3 (Gemma3ForConditionalGeneration) on a tiny random model: the facts its adapter states, checked against the
model's own behaviour, and everything the generic tests do not reach (they run on every family: tests/conftest.py)."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch

import vlm_interp as vi
from vlm_interp.adapters import BoundAdapter
from vlm_interp.corruptions import noise
from vlm_interp.errors import ImageTokenMismatchError
from vlm_interp.interventions import InjectionPlan, InterventionError, inject, modulate_heads, vhr
from vlm_interp.sites import Site
from vlm_interp.tiny import tiny
from vlm_interp.tracing import engine, fast, trace

from conftest import QUESTION, STRICT_TRANSFORMERS
from family_references import check_cache_on_and_off, plain_grid, raw_value, sharp_gemma

pytestmark = STRICT_TRANSFORMERS

FAMILY = "gemma3"
IMAGE = [4, 5, 6, 7]  # <s> <start_of_turn> user <start_of_image>, then the four pooled image tokens


@pytest.fixture(scope="module")
def vlm() -> vi.VLM:
    return sharp_gemma(FAMILY)


@pytest.fixture(scope="module")
def pair(vlm, image, other_image):
    return vlm.prepare(image, QUESTION, answer="yes"), vlm.prepare(other_image, QUESTION, answer="yes")


def test_sites_command_lists_both_towers(capsys):
    from vlm_interp.cli import main

    assert main(["sites", "--model", f"tiny:{FAMILY}"]) == 0
    out = capsys.readouterr().out
    assert "Gemma3ForConditionalGeneration" in out
    for line in ("vision.head: 8 sites", "lm.attn: 2 sites", "lm.mlp: 2 sites", "lm.head: 8 sites"):
        assert line in out


def test_prepare_chat_template_image_span_and_groups(vlm, image):
    ex = vlm.prepare(image, QUESTION, region=(16, 16, 32, 32))
    assert ex.prompt.startswith("<start_of_turn>user\n<start_of_image>") and ex.prompt.endswith("<start_of_turn>model\n")
    assert vlm.image_token == "<start_of_image>"  # the placeholder is not the image token the LM sees
    lm = ex.groups["lm"]
    assert lm["image"] == IMAGE
    assert ex.tokens[3] == "<start_of_image>" and ex.tokens[8] == "<end_of_image>"
    assert ex.inputs["token_type_ids"][0].tolist() == [int(p in IMAGE) for p in range(len(ex.tokens))]
    assert [ex.tokens[p] for p in lm["question"]] == QUESTION.split()
    # bottom-right quarter: patches (2..3, 2..3) of the 4x4 grid, averaged into the last of the 2x2 LM tokens
    assert ex.groups["vision"]["object"] == [10, 11, 14, 15]
    assert lm["object"] == [IMAGE[3]]
    wide = vlm.prepare(np.zeros((32, 64, 3), np.uint8), QUESTION, region=(40, 0, 48, 8))  # squashed to 32x32
    assert wide.groups["vision"]["object"] == [2] and wide.groups["lm"]["object"] == [IMAGE[1]]


def test_the_image_token_count_is_checked(image):
    model, processor = tiny(FAMILY)
    import transformers as tf

    fewer = tf.Gemma3Processor(image_processor=processor.image_processor, tokenizer=processor.tokenizer,
                               image_seq_length=3, chat_template=processor.chat_template)
    with pytest.raises(ImageTokenMismatchError, match="image_seq_length"):
        vi.wrap(model, fewer).prepare(image, QUESTION)


def _layer0_attention(vlm, ex, position: int, bump: int | None = None) -> torch.Tensor:
    """Layer 0's attention output at ``position`` after a bump to the LM input at ``bump`` (raw torch hooks)."""
    layer = vlm.model.model.language_model.layers[0]
    seen = []

    def add(module, args, kwargs):
        x = args[0].clone()
        x[:, bump] += 1.0
        return (x, *args[1:]), kwargs

    handles = [layer.self_attn.register_forward_hook(lambda m, a, o: seen.append(o[0][0, position].clone()))]
    if bump is not None:
        handles.append(layer.register_forward_pre_hook(add, with_kwargs=True))
    try:
        with torch.no_grad():
            vlm.logits(ex.inputs)
    finally:
        for h in handles:
            h.remove()
    return seen[0]


def test_image_tokens_attend_both_ways_exactly_as_the_adapter_says(vlm, image):
    """The model's own attention: a bump at the last image token reaches the first image token (and not the text
    before it); without token_type_ids it does not. The adapter says the same from the inputs."""
    ex = vlm.prepare(image, QUESTION)
    spec = vlm.adapter.adapter
    assert spec.attention_blocks(vlm.model.config, ex.inputs) == [(4, 7)]
    assert not torch.allclose(_layer0_attention(vlm, ex, IMAGE[0], bump=IMAGE[-1]), _layer0_attention(vlm, ex, IMAGE[0]))
    assert torch.equal(_layer0_attention(vlm, ex, 3, bump=IMAGE[-1]), _layer0_attention(vlm, ex, 3))
    causal = ex.derive(inputs={k: v for k, v in ex.inputs.items() if k != "token_type_ids"})
    assert spec.attention_blocks(vlm.model.config, causal.inputs) == []
    assert torch.equal(_layer0_attention(vlm, causal, IMAGE[0], bump=IMAGE[-1]), _layer0_attention(vlm, causal, IMAGE[0]))


def test_noise_enters_after_the_embedding_scale(vlm, image):
    """Noise on 'embeddings' (the projector's output) reaches the LM input unscaled, at the image positions only."""
    ex = vlm.prepare(image, QUESTION)
    bad = noise(vlm, ex, scale=0.5, tokens="image", seed=1)
    site = Site("lm", "input", 0)
    delta = raw_value(vlm, bad, site) - raw_value(vlm, ex, site)
    assert (delta.abs().sum(-1)[0] > 0).nonzero().flatten().tolist() == IMAGE
    torch.testing.assert_close(delta[0, IMAGE], bad.edits[0].noise[0], rtol=0, atol=1e-6)


def test_fast_path_restarts_at_the_image_block_and_equals_the_plain_loop(vlm, pair):
    clean, corrupt = pair
    state, why = fast.lm_start(vlm, corrupt)
    assert state is not None and state.kv_reuse, why or state.why_no_kv
    assert state.blocks == [(4, 7)] and state.softcap is None
    assert [state.start_position(p) for p in (3, 4, 6, 7, 8, 12)] == [3, 4, 4, 4, 8, 12]
    assert state.span_stop(0, 5) == 8 and state.span_stop(0, 9) == 10
    answer_id = vlm.encode_answer(clean, "yes")[0]
    positions = [[3], [4], [6], [7], [8], [clean.n_tokens - 1]]  # around and inside the image block
    components = ("input", "mlp")
    expected = np.array([plain_grid(vlm, clean, corrupt, c, positions, answer_id) for c in components])
    assert float(np.std(expected)) > 1e-2
    with warnings.catch_warnings():
        warnings.simplefilter("error", engine.FastPathWarning)  # the fast path runs, with key/value reuse
        tr = trace(vlm, clean, corrupt, components=[f"lm.{c}" for c in components],
                   tokens={str(p[0]): p for p in positions}, metric="logprob", batch_size=5, progress=False)
    np.testing.assert_allclose(tr.data.values, expected, atol=1e-4, rtol=0)


def test_a_causal_claim_fails_the_self_check(vlm, pair):
    """An adapter that called Gemma 3's LM causal: the self-check (which perturbs inside the image tokens) fails, the
    fast path declines with that reason, and tracing still gives the plain loop's numbers."""
    clean, corrupt = pair
    liar = vi.VLM(vlm.model, vlm.processor,
                  BoundAdapter(dataclasses.replace(vlm.adapter.adapter, attention_blocks=None), vlm.model))
    state, why = fast.lm_start(liar, corrupt)
    reason = why if state is None else state.why_no_kv
    assert "does not reproduce" in reason, reason
    answer_id = vlm.encode_answer(clean, "yes")[0]
    positions = [[p] for p in IMAGE]
    expected = plain_grid(vlm, clean, corrupt, "hidden", positions, answer_id)
    with pytest.warns(engine.FastPathWarning, match="does not reproduce"):
        tr = trace(liar, clean, corrupt, components=["lm.hidden"], tokens={str(p): [p] for p in IMAGE},
                   metric="logprob", progress=False)
    np.testing.assert_allclose(tr.data.values[0], expected, atol=1e-4, rtol=0)


def test_interventions_during_generate_with_and_without_cache(vlm, image):
    ex = vlm.prepare(image, QUESTION)
    check_cache_on_and_off(vlm, ex, lambda: modulate_heads(vlm, {"lm.head.1.2": 3.0, "lm.head.0.0": 0.0}))
    check_cache_on_and_off(vlm, ex, lambda: inject(vlm, InjectionPlan({"mlp": {1: {0: 1.0}}}, {"mlp": 2.0})))
    with pytest.raises(InterventionError, match="attend both ways"):
        with vhr(vlm):
            pass
