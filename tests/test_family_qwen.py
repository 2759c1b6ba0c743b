"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: geometry by hand, layouts, M-RoPE state, fast path, interventions, POPE.

Tiny configurations (vlm_interp/tiny/qwen.py): 4-pixel patches merged 2 x 2; Qwen2.5-VL's vision
attention windows hold 2 x 2 merged blocks; Qwen3-VL adds DeepStack features after LM layer 0.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import vlm_interp as vi
from vlm_interp.adapters import BoundAdapter
from vlm_interp.corruptions import CorruptionError, noise
from vlm_interp.interventions import InjectionPlan, head_divergence, inject, modulate_heads, vhr
from vlm_interp.tiny import tiny
from vlm_interp.tracing import fast, trace

from conftest import QUESTION, STRICT_TRANSFORMERS
from family_checks import raw_output

pytestmark = STRICT_TRANSFORMERS
QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@pytest.fixture(scope="module", params=QWEN)
def qwen(request) -> vi.VLM:
    return vi.wrap(*tiny(request.param, seed=0))


@pytest.fixture(scope="module")
def qwen25() -> vi.VLM:
    return vi.wrap(*tiny("qwen2_5_vl", seed=0))


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype("uint8"))


def raw(vlm, path: str, kind: str, inputs: dict) -> torch.Tensor:
    """A module's output or first input in one forward, by a plain torch hook (packed: no batch axis)."""
    return raw_output(vlm, path, kind, inputs)


# ---- geometry -----------------------------------------------------------------------------------
def test_object_group_on_a_non_square_image_maps_to_hand_computed_patches(qwen25):
    """A 50 x 30 image is resized to 48 x 32 (multiples of 8): 8 x 12 patches, 4 x 6 image tokens, each token
    7.5 pixels tall and 50 / 6 wide in the original image, each patch 3.75 tall and 50 / 12 wide."""
    vlm = qwen25
    ex = vlm.prepare(picture(50, 30), QUESTION)
    assert ex.inputs["image_grid_thw"].tolist() == [[1, 8, 12]] and len(ex.groups["lm"]["image"]) == 24
    image = ex.groups["lm"]["image"]
    mask = np.zeros((30, 50), bool)
    mask[20, 30] = True  # centre (20.5, 30.5): token row 20.5 // 7.5 = 2, column 30.5 // (50 / 6) = 3
    vlm.add_object_group(ex, mask)
    assert ex.groups["lm"]["object"] == [image[2 * 6 + 3]]
    # patch row 20.5 // 3.75 = 5, column 30.5 // (50 / 12) = 7: block (2, 3), second row and column inside it.
    # Windows of 2 x 2 blocks over the 4 x 6 block grid, row-major: block (2, 3) is the second block (index 1) of
    # window (1, 1), the fifth window (index 4); each window holds 4 blocks of 4 patches: 4 * (4 * 4 + 1) + 3 = 71
    assert ex.groups["vision"]["object"] == [71]
    vlm.add_object_group(ex, (10, 5, 20, 12))  # pixel centres 5.5..11.5 (token rows 0, 1) x 10.5..19.5 (columns 1, 2)
    assert ex.groups["lm"]["object"] == [image[1], image[2], image[7], image[8]]


def test_vision_positions_follow_the_models_own_window_order(qwen25):
    """The tower's position order (adapter geometry) is the model's: block 0's input holds patch embeddings in the
    adapter's pixel-row order, and the LM's image tokens are the merger's rows put back in row-major block order."""
    vlm = qwen25
    ex = vlm.prepare(picture(50, 30), QUESTION)
    rows = vlm.adapter.adapter.pixel_rows(vlm.model.config, ex.inputs)
    assert rows != sorted(rows)  # windows reorder the blocks here
    embedded = raw(vlm, "model.visual.patch_embed", "output", ex.inputs)
    entering = raw(vlm, "model.visual.blocks.0", "input", ex.inputs)
    torch.testing.assert_close(entering, embedded[rows], rtol=0, atol=0)
    merged = raw(vlm, "model.visual.merger", "output", ex.inputs)
    lm_input = raw(vlm, "model.language_model.layers.0", "input", ex.inputs)[0, ex.groups["lm"]["image"]]
    blocks = [rows[4 * k] // 4 for k in range(merged.shape[0])]  # the block each merger row holds
    torch.testing.assert_close(lm_input[blocks], merged, rtol=0, atol=0)


def test_image_tokens_follow_the_image_size(qwen):
    for (w, h), tokens in (((32, 32), 16), ((48, 32), 24), ((50, 30), 24), ((64, 16), 16)):
        ex = qwen.prepare(picture(w, h), QUESTION)
        assert len(ex.groups["lm"]["image"]) == tokens
        assert len(ex.groups["vision"]["image"]) == 4 * tokens and "cls" not in ex.groups["vision"]


def test_pairs_of_different_image_sizes_are_refused(qwen25):
    clean = qwen25.prepare(picture(32, 32), QUESTION, answer="yes")
    corrupt = qwen25.prepare(picture(48, 32, seed=1), QUESTION, answer="yes")
    with pytest.raises(CorruptionError, match="use the same image size"):
        trace(qwen25, clean, corrupt, components=["lm.hidden"], tokens=["last"], progress=False)
    # the same number of tokens from a transposed image still lays them out on another grid
    wide, tall = qwen25.prepare(picture(48, 32), QUESTION, answer="yes"), qwen25.prepare(picture(32, 48), QUESTION)
    assert wide.inputs["input_ids"].shape == tall.inputs["input_ids"].shape
    with pytest.raises(CorruptionError, match="use the same image size.*24 vs 24 image tokens"):
        trace(qwen25, wide, tall, components=["lm.hidden"], tokens=["last"], progress=False)


# ---- M-RoPE state -----------------------------------------------------------------------------
def test_stale_rope_deltas_never_reach_a_run(qwen):
    """``model.model.rope_deltas`` keeps state between calls; every run recomputes it from its own inputs."""
    ex = qwen.prepare(picture(32, 32), QUESTION, answer="yes")
    with torch.no_grad():
        logits = qwen.logits(ex.inputs)
    cached, uncached = qwen.generate(ex, max_new_tokens=4), qwen.generate(ex, max_new_tokens=4, use_cache=False)
    assert cached == uncached
    score = qwen.score(ex, "red circle").logprob
    other = qwen.prepare(picture(64, 16, seed=2), QUESTION)
    qwen.generate(other, max_new_tokens=2)  # leaves the other example's offsets behind
    qwen.model.model.rope_deltas = torch.full((3, 1), 1000)  # and poison them
    with torch.no_grad():
        torch.testing.assert_close(qwen.logits(ex.inputs), logits, rtol=0, atol=0)
    assert qwen.score(ex, "red circle").logprob == pytest.approx(score, abs=1e-6)
    qwen.model.model.rope_deltas = torch.full((3, 1), 1000)
    assert qwen.generate(ex, max_new_tokens=4) == cached
    qwen.model.model.rope_deltas = torch.full((3, 1), 1000)
    assert qwen.generate(ex, max_new_tokens=4, use_cache=False) == cached


# ---- the fast tracing path -------------------------------------------------------------------
def test_fast_path_applies_with_kv_reuse(qwen):
    ex = qwen.prepare(picture(32, 32), QUESTION, answer="yes")
    state, why = fast.lm_start(qwen, noise(qwen, ex, scale=3.0, seed=0))
    assert state is not None and state.kv_reuse, why or state.why_no_kv
    added = qwen.adapter.adapter.towers["lm"].added_after
    assert sorted(state.adds) == list(added) == ([0] if qwen.family == "qwen3_vl" else [])
    for j, delta in state.adds.items():  # DeepStack adds at image positions only
        text = [p for p in range(ex.n_tokens) if p not in set(ex.groups["lm"]["image"])]
        assert float(delta[0, text].abs().max()) == 0 and float(delta[0, ex.groups["lm"]["image"]].abs().max()) > 0


def test_an_adapter_that_hides_deepstack_makes_the_self_check_decline(image):
    """The fast path knows about features added between layers from the adapter; without that fact its self-check
    sees that replays miss them and declines with the reason."""
    vlm = vi.wrap(*tiny("qwen3_vl", seed=0))
    spec = vlm.adapter.adapter
    hidden = replace(spec, towers={**spec.towers, "lm": replace(spec.towers["lm"], added_after=())})
    vlm.adapter = BoundAdapter(hidden, vlm.model)
    state, why = fast.lm_start(vlm, vlm.prepare(image, QUESTION, answer="yes"))
    assert state is None and "does not reproduce" in why


# ---- vision tower ----------------------------------------------------------------------------
def test_packed_vision_sites_read_one_row_per_image(qwen, image):
    """Vision activations come as (1, patches, width) per example; a batch of rows is the rows' patches in turn."""
    ex = qwen.prepare(image, QUESTION)
    grab = qwen.hook("vision.hidden.1", capture=True)
    with torch.no_grad(), qwen.attach([grab]):
        qwen.logits(ex.inputs)
    assert grab.value.shape[:2] == (1, 64)
    torch.testing.assert_close(grab.value[0], raw(qwen, "model.visual.blocks.1", "output", ex.inputs), rtol=0, atol=0)
    other = qwen.prepare(picture(32, 32, seed=5), QUESTION)
    both = vi.corruptions.stack([ex, other])
    grab = qwen.hook("vision.hidden.1", capture=True)
    with torch.no_grad(), qwen.attach([grab]):
        qwen.logits(both.inputs)
    assert grab.value.shape[:2] == (1, 128)  # packed: no batch axis
    second = raw(qwen, "model.visual.blocks.1", "output", other.inputs)
    torch.testing.assert_close(grab.value[0, 64:], second, rtol=1e-5, atol=1e-6)


def test_noise_on_patches_and_pixels_touches_the_chosen_patches(qwen25, image):
    vlm = qwen25
    ex = vlm.prepare(image, QUESTION, region=(8, 8, 16, 16))
    chosen = ex.groups["vision"]["object"]
    clean = raw(vlm, "model.visual.blocks.0", "input", ex.inputs)
    bad = noise(vlm, ex, scale=1.0, tokens="object", place="patches", seed=0)
    got = vlm.hook("vision.input.0", capture=True)
    with torch.no_grad(), vi.corruptions.applied(vlm, bad), vlm.attach([got]):
        vlm.logits(bad.inputs)
    moved = (got.value[0] - clean).abs().sum(-1) > 0
    assert moved.nonzero().flatten().tolist() == chosen
    pixels = noise(vlm, ex, scale=1.0, tokens="object", place="pixels", seed=0)
    rows = vlm.adapter.adapter.pixel_rows(vlm.model.config, ex.inputs)
    changed = (pixels.inputs["pixel_values"] != ex.inputs["pixel_values"]).any(-1).nonzero().flatten().tolist()
    assert changed == sorted(rows[p] for p in chosen)
    embedded = raw(vlm, "model.visual.blocks.0", "input", pixels.inputs)
    assert ((embedded - clean).abs().sum(-1) > 0).nonzero().flatten().tolist() == chosen


# ---- interventions during generate ------------------------------------------------------------
def _tokens(vlm, ex, **kw):
    with torch.no_grad():
        out = vlm.model.generate(**ex.inputs, max_new_tokens=6, do_sample=False, **kw)
    return out[:, ex.inputs["input_ids"].shape[1]:]


def test_head_modulation_and_iri_during_generate_with_and_without_cache(qwen, image):
    ex = qwen.prepare(image, QUESTION)
    with torch.no_grad():
        plain = qwen.logits(ex.inputs)
    heads = {"lm.head.0.1": 3.0, "lm.head.1.2": 0.0, "lm.head.1.0": 2.5}
    plan = InjectionPlan({"attn": {1: {0: 1.0}}, "mlp": {1: {0: 1.0}}}, {"attn": 4.0, "mlp": 4.0})
    for make in (lambda: modulate_heads(qwen, heads), lambda: inject(qwen, plan)):
        with make():
            cached = _tokens(qwen, ex, use_cache=True)
        with make():
            uncached = _tokens(qwen, ex, use_cache=False)
        assert torch.equal(cached, uncached)
        with make(), torch.no_grad():
            assert float((qwen.logits(ex.inputs)[0, -1] - plain[0, -1]).abs().max()) > 1e-3  # it acts


def test_head_divergence_uses_the_models_positions(qwen25):
    """VHD with the image runs the LM at the model's M-RoPE positions; without it, at plain text positions."""
    vlm = qwen25
    ex = vlm.prepare(picture(48, 32), QUESTION)
    a = vlm.adapter
    paths = [a.module_path("lm", "head", layer) for layer in range(a.n_layers["lm"])]

    def outputs(run):
        got = {}
        handles = [vlm.model.get_submodule(p).register_forward_pre_hook(
            lambda m, args, p=p: got.__setitem__(p, args[0][0, -1].detach().clone())) for p in paths]
        try:
            with torch.no_grad():
                run()
        finally:
            for h in handles:
                h.remove()
        return torch.stack([got[p].reshape(a.n_heads["lm"], -1) for p in paths])

    ids = ex.inputs["input_ids"]
    text = ids[:, ids[0] != vlm.image_token_id]
    expected = (outputs(lambda: vlm.model(**ex.inputs)) - outputs(
        lambda: vlm.model.model.language_model(input_ids=text))).norm(dim=-1)
    np.testing.assert_allclose(head_divergence(vlm, ex).values, expected.numpy(), rtol=1e-5, atol=1e-6)
    # VHR chooses its heads from the same divergence at the first generation step, with the cache on or off
    with vhr(vlm, alpha=2.0) as state:
        cached = _tokens(vlm, ex, use_cache=True)
    with vhr(vlm, alpha=2.0) as again:
        uncached = _tokens(vlm, ex, use_cache=False)
    assert torch.equal(cached, uncached) and state.heads == again.heads
    np.testing.assert_allclose(state.divergence[0].values, expected.numpy(), rtol=1e-5, atol=1e-6)


# ---- POPE and compare -------------------------------------------------------------------------
def test_pope_on_two_images_and_compare_across_families(tmp_path):
    from vlm_interp.hallucination.compare import compare

    systems = ["tiny:qwen2_5_vl", "tiny:qwen2_vl", "tiny:qwen3_vl", "tiny:llava"]
    result = compare(systems, n_images=2, splits=["random"], out=tmp_path, n_boot=20, max_new_tokens=2, progress=False)
    assert set(result.table["system"]) == set(systems)
    assert (result.table["n"] > 0).all() and result.table["accuracy"].between(0, 1).all()
    assert len(result.tests) > 0


def test_gradient_estimates_on_the_packed_vision_tower(qwen25, image, other_image):
    """attribution_patching reads packed vision tensors per position; captum's layer attribution, which takes the
    first axis for the batch, is refused there with the reason (and works in the LM)."""
    from vlm_interp.errors import SiteError
    from vlm_interp.tracing import attribution_patching, integrated_patching

    clean = qwen25.prepare(image, QUESTION, answer="yes")
    corrupt = qwen25.prepare(other_image, QUESTION, answer="yes")
    est = attribution_patching(qwen25, clean, corrupt, components=["vision.hidden"], tokens="each")
    assert est.data.sizes["position"] == 64 and np.isfinite(est.data.values).all()
    with pytest.raises(SiteError, match="no batch axis"):
        integrated_patching(qwen25, clean, corrupt, components=["vision.hidden"], tokens="all", steps=2,
                            progress=False)
    whole = integrated_patching(qwen25, clean, corrupt, components=["lm.mlp"], tokens="all", steps=8,
                                progress=False)
    exact = trace(qwen25, clean, corrupt, components=["lm.mlp"], tokens="all", progress=False)
    np.testing.assert_allclose(whole.data.values, exact.data.values, atol=2e-3)


def test_the_sites_command_lists_both_towers_and_their_facts(capsys):
    from vlm_interp.cli import main

    assert main(["sites", "--model", "tiny:qwen3_vl"]) == 0
    out = capsys.readouterr().out
    assert "qwen3_vl (Qwen3VLForConditionalGeneration)" in out and "packed positions" in out
    assert "added to the residual stream after layers [0]" in out
    assert "vision.head: 8 sites" in out and "lm.head: 8 sites" in out
