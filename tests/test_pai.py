"""PAI: the attention edit against scores and weights computed by hand, the text-only contrast against a hand-run
language model, plain decoding at alpha = gamma = 0, batching, the command line, and the families it refuses."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import vlm_interp as vi
from vlm_interp import batching, compat
from vlm_interp.interventions import InterventionError, from_spec, pai, vcd
from vlm_interp.interventions.vcd import vcd_logits
from vlm_interp.tiny import tiny

from conftest import QUESTION, STRICT_TRANSFORMERS

pytestmark = STRICT_TRANSFORMERS


@pytest.fixture(scope="module")
def llava():
    return vi.wrap(*tiny("llava", seed=0))


def new_tokens(vlm, inputs, n=5, **kw):
    # tiny random models may generate their image token, which PAI's text-only run cannot re-feed (it says so)
    with torch.no_grad():
        out = vlm.model.generate(**inputs, max_new_tokens=n, do_sample=False, suppress_tokens=[vlm.image_token_id],
                                 logits_processor=vlm.logits_processor(inputs), **kw)
    return vlm.decoder.generated(out, inputs)


class Record(compat.AttentionEdit):
    """Records each call's scores before any later edit changes them, and the weights after all edits."""

    eager = True

    def __init__(self, modules):
        super().__init__(modules)
        self.scores_seen, self.weights_seen = {}, {}

    def scores(self, call, scores):
        self.scores_seen[id(call.module)] = scores.detach().clone()

    def observe(self, call, weights):
        self.weights_seen[id(call.module)] = weights.detach().clone()


@pytest.mark.parametrize("family", ["llava", "instructblip", "qwen2_5_vl"])
def test_alpha_and_gamma_zero_is_plain_decoding(family, image):
    vlm = vi.wrap(*tiny(family, seed=0))
    ex = vlm.prepare(image, QUESTION)
    plain_logits, plain = vlm.first_token_logits(ex), new_tokens(vlm, ex.inputs, 6)
    with pai(vlm, alpha=0.0, gamma=0.0, start=0) as state:
        logits, tokens = vlm.first_token_logits(ex), new_tokens(vlm, ex.inputs, 6)
    torch.testing.assert_close(logits, plain_logits, atol=1e-6, rtol=0)
    assert torch.equal(tokens, plain)
    assert state.layers == [0, 1] and state.boosted >= 2 * 6  # every layer at every step went through the edit
    with pai(vlm, alpha=0.5, gamma=0.0, start=0):  # the edit changes the answer's logits (the test could fail)
        assert not torch.allclose(vlm.first_token_logits(ex), plain_logits, atol=1e-4)


def test_amplified_weights_equal_a_hand_computation(llava, image):
    """Layer 1 (start=1): s + alpha |s| on the image keys of the last query, softmax; layer 0 untouched."""
    ex = llava.prepare(image, QUESTION)
    image_keys = ex.groups["lm"]["image"]  # the prepared example's token groups, not PAI's own reading of the ids
    modules = [llava.model.get_submodule(llava.adapter.attention_path("lm", "attn", layer)) for layer in (0, 1)]
    record = Record(modules)
    alpha = 0.7
    with compat.attention_edits(llava.model, [record]), pai(llava, alpha=alpha, gamma=0.0, start=1):
        llava.first_token_logits(ex)
    for layer, module in enumerate(modules):
        scores, weights = record.scores_seen[id(module)][0], record.weights_seen[id(module)][0]
        expected = scores.clone()
        if layer == 1:
            last = expected[:, -1, image_keys]
            expected[:, -1, image_keys] = last + alpha * last.abs()
        torch.testing.assert_close(weights, torch.softmax(expected, -1), atol=1e-6, rtol=0)
        plain_mass = torch.softmax(scores, -1)[:, -1, image_keys].sum(-1)
        mass = weights[:, -1, image_keys].sum(-1)
        if layer == 1:  # attention to the image moves: up where the image scores are positive, as PAI intends
            assert not torch.allclose(mass, plain_mass, atol=1e-4)
            torch.testing.assert_close(weights[:, :-1], torch.softmax(scores, -1)[:, :-1], atol=1e-6, rtol=0)
        else:
            torch.testing.assert_close(mass, plain_mass, atol=1e-6, rtol=0)


def test_text_only_contrast_equals_a_hand_run_language_model(llava, image):
    ex = llava.prepare(image, QUESTION)
    ids = ex.inputs["input_ids"]
    text_ids = ids[ids != llava.image_token_id][None]
    assert text_ids.shape[1] == ids.shape[1] - len(ex.groups["lm"]["image"])
    with torch.no_grad():
        hidden = llava.model.model.language_model(inputs_embeds=llava.model.get_input_embeddings()(text_ids))
        text = llava.model.lm_head(hidden.last_hidden_state)[0, -1]
    plain = llava.first_token_logits(ex)
    with pai(llava, alpha=0.0, gamma=0.5, start=0) as state:
        got = llava.first_token_logits(ex)
    torch.testing.assert_close(got, vcd_logits(plain[None], text[None], 0.5, 0.1)[0], atol=1e-5, rtol=0)
    assert state.steps == 1 and not torch.allclose(got, plain, atol=1e-3)  # the contrast moved the logits


def test_generation_matches_a_plain_loop_and_runs_without_the_cache(llava, image):
    """Each step: the logits with the image, contrasted with the text-only logits of the sequence so far."""
    ex = llava.prepare(image, QUESTION)
    ids = ex.inputs["input_ids"]
    text = {"input_ids": ids[ids != llava.image_token_id][None]}
    text["attention_mask"] = torch.ones_like(text["input_ids"])
    out = torch.empty(1, 0, dtype=torch.long)
    with torch.no_grad():
        for _ in range(4):
            clean = llava.logits(llava.decoder.with_answer(llava.model, dict(ex.inputs), out))[:, -1]
            clean[:, llava.image_token_id] = -float("inf")
            contrast = llava.model(**llava.decoder.with_answer(llava.model, dict(text), out)).logits[:, -1]
            out = torch.cat([out, vcd_logits(clean, contrast, 1.0, 0.1).argmax(-1, keepdim=True)], 1)
    with pai(llava, alpha=0.0, gamma=1.0, start=0):
        assert torch.equal(new_tokens(llava, ex.inputs, 4), out)
    with pai(llava, alpha=2.0, gamma=0.3, start=0):  # cached and uncached steps amplify the same entries
        assert torch.equal(new_tokens(llava, ex.inputs, 5), new_tokens(llava, ex.inputs, 5, use_cache=False))


def test_batched_and_one_at_a_time_give_the_same_tokens(llava, image, other_image):
    examples = [llava.prepare(image, QUESTION), llava.prepare(other_image, "Is there a blue square in it ?")]
    batch = batching.collate(llava, examples)
    assert any(batch.shift["lm"])  # the rows differ in length: left padding moves one row's image tokens
    kw = {"suppress_tokens": [llava.image_token_id]}
    with pai(llava, alpha=1.0, gamma=0.5, start=0):
        alone = [llava.generate(ex, max_new_tokens=5, **kw) for ex in examples]
        first = torch.stack([llava.first_token_logits(ex) for ex in examples])
        together = batching.generate(llava, batch, max_new_tokens=5, **kw)
        first_together = batching.first_token_logits(llava, batch)
    assert together == alone
    torch.testing.assert_close(first_together, first, atol=1e-5, rtol=0)
    one = batching.collate(llava, examples[:1])
    with vcd(llava, alpha=1.0):  # batched evaluation applies VCD too (it used to skip logits processors)
        vcd_first, vcd_alone = batching.first_token_logits(llava, one)[0], llava.first_token_logits(examples[0])
    torch.testing.assert_close(vcd_first, vcd_alone, atol=1e-5, rtol=0)
    assert not torch.allclose(vcd_first, batching.first_token_logits(llava, one)[0], atol=1e-4)


def test_vcd_contrast_run_sees_the_amplification_and_step_trackers_refuse_the_text_run(llava, image):
    import dataclasses

    from vlm_interp.interventions import vhr
    from vlm_interp.interventions.vcd import diffusion_noise

    ex = llava.prepare(image, QUESTION)
    distorted = dataclasses.replace(ex, inputs={**ex.inputs, "pixel_values": diffusion_noise(
        ex.inputs["pixel_values"], 500, 0)})
    with pai(llava, alpha=1.0, gamma=0.0, start=0):
        clean, contrast = llava.first_token_logits(ex), llava.first_token_logits(distorted)
        with vcd(llava, alpha=1.0):
            stacked = llava.first_token_logits(ex)
    torch.testing.assert_close(stacked, vcd_logits(clean[None], contrast[None], 1.0, 0.1)[0], atol=1e-6, rtol=0)
    with pytest.raises(InterventionError, match="do not stack"):
        with vhr(llava, alpha=2.0), pai(llava, start=0):
            llava.generate(ex, max_new_tokens=2, suppress_tokens=[llava.image_token_id])


def test_compare_takes_pai_end_to_end(tmp_path):
    from vlm_interp.cli import main

    out = tmp_path / "compare"
    assert main(["compare", "--models", "tiny:llava", "tiny:instructblip", "--benchmark", "pope", "mme", "--images",
                 "2", "--splits", "random", "--max-new-tokens", "2", "--out", str(out),
                 "--intervention", "pai:alpha=0.5,start=1"]) == 0
    table = pd.read_csv(out / "table.csv")
    assert set(table.intervention) == {"none", "pai:alpha=0.5,start=1"}
    assert len(set(table.system)) == 4 and set(table.benchmark) == {"pope", "mme"}
    assert (out / "compare.png").exists()
    answers = pd.concat([pd.read_json(f, lines=True) for f in out.glob("*instructblip*pai*/pope/*.jsonl")])
    assert set(answers.intervention) == {"pai:alpha=0.5,start=1"} and len(answers) > 0


def test_bad_values_and_families_where_pai_cannot_apply(llava, image):
    for spec, message in [("pai:alpha=-1", "alpha -1.0 must be >= 0"), ("pai:gamma=-0.5", "paper's gamma minus 1"),
                          ("pai:beta=0", "beta 0.0 must lie in"), ("pai:start=5", "the llava LM has layers 0..1"),
                          ("pai", "start=2"), ("pai:start=1,end=1", "hold no attention")]:
        with pytest.raises(InterventionError, match=message):
            with from_spec(spec)(llava):
                pass
    with pytest.raises(InterventionError, match="unknown pai option 'noise'"):
        from_spec("pai:noise=1")
    with pytest.raises(InterventionError, match="never amplified"):
        with pai(llava, start=0):
            pass
    ex = llava.prepare(image, QUESTION, answer="yes")
    with pytest.raises(vi.VLMInterpError, match="whole-answer scores"), pai(llava, start=0):
        llava.first_token_logits(ex)
        llava.score(ex)
    with pytest.raises(InterventionError, match="came another way"), pai(llava, start=0):
        with torch.no_grad():
            llava.logits(ex.inputs)
    assert llava.logits_processors == []
    with pytest.raises(InterventionError, match="separate BLIP answer decoder"):
        with pai(vi.wrap(*tiny("blip", seed=0)), start=0):
            pass
    with pytest.raises(InterventionError, match="cross-attention"):
        with pai(vi.wrap(*tiny("mllama", seed=0)), start=0):
            pass


def test_sliding_window_caches_are_named_and_uncached_generation_works(image):
    """Gemma 3's local layers cache a window of keys: cached generation says so, first-token answers and
    generation without the cache run."""
    vlm = vi.wrap(*tiny("gemma3", seed=0))
    ex = vlm.prepare(image, QUESTION)
    with pai(vlm, alpha=0.5, gamma=0.1, start=0) as state:
        vlm.first_token_logits(ex)
        vlm.generate(ex, max_new_tokens=3, use_cache=False, suppress_tokens=[vlm.image_token_id])
        with pytest.raises(InterventionError, match="sliding window"):
            vlm.generate(ex, max_new_tokens=3, suppress_tokens=[vlm.image_token_id])
    assert state.steps >= 4
