"""Interventions: head modulation, head scoring, VHD/VHR and IRI, checked against hand-made edits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

import vlm_interp as vi
from vlm_interp.interventions import (HeadScores, InjectionPlan, InterventionError, from_spec, head_divergence,
                                      inject, modulate_heads, plan_from_recovery, score_heads, select_vision_heads,
                                      v_seam_scales, vhr)
from vlm_interp.interventions.scoring import score_example
from vlm_interp.tiny import tiny

from conftest import QUESTION, STRICT_TRANSFORMERS

pytestmark = STRICT_TRANSFORMERS


@pytest.fixture(scope="module")
def llava():
    return vi.wrap(*tiny("llava", seed=0))


@pytest.fixture(scope="module")
def instructblip():
    return vi.wrap(*tiny("instructblip", seed=0))


@pytest.fixture(scope="module")
def ex(llava, image):
    return llava.prepare(image, QUESTION, answer="yes")


def tokens(vlm, ex, n=6, **kw):
    with torch.no_grad():
        out = vlm.model.generate(**ex.inputs, max_new_tokens=n, do_sample=False, **kw)
    return out[:, ex.inputs["input_ids"].shape[1]:] if vlm.adapter.adapter.decoder == "causal" else out


def logits(vlm, ex):
    with torch.no_grad():
        return vlm.logits(ex.inputs)


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def split_heads(x, heads):
    return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)


# ---- modulation --------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "instructblip"])
def test_unit_scales_leave_generation_bit_identical(family, image):
    vlm = vi.wrap(*tiny(family, seed=0))
    e = vlm.prepare(image, QUESTION)
    sites = [s.name for s in vlm.adapter.sites("lm", "head")]
    if family == "instructblip":
        sites += [s.name for s in vlm.adapter.sites("qformer", "xattn_head")]
    before_tokens, before_logits = tokens(vlm, e), logits(vlm, e)
    with modulate_heads(vlm, {s: 1.0 for s in sites}):
        assert torch.equal(tokens(vlm, e), before_tokens)
        assert torch.equal(logits(vlm, e), before_logits)


@pytest.mark.parametrize("site", ["lm.head.1.2", "qformer.xattn.0.head.1"])
def test_single_head_scale_equals_hand_edit(instructblip, image, site):
    vlm = instructblip
    e = vlm.prepare(image, QUESTION)
    s = vlm.adapter.resolve(site)
    heads = vlm.adapter.n_heads[s.tower]

    def manual(mod, args, kwargs):
        x = split_heads(args[0], heads).clone()
        x[..., s.head, :] *= 1.7
        return (x.reshape(args[0].shape), *args[1:]), kwargs

    module = vlm.model.get_submodule(vlm.adapter.module_path(s.tower, s.component, s.layer))
    handle = module.register_forward_pre_hook(manual, with_kwargs=True)
    try:
        expected = logits(vlm, e)
    finally:
        handle.remove()
    with modulate_heads(vlm, {site: 1.7}):
        got = logits(vlm, e)
    assert not torch.allclose(got, logits(vlm, e))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_modulation_rejects_non_head_sites_and_bad_values(llava):
    with pytest.raises(InterventionError, match="attention heads"):
        with modulate_heads(llava, {"lm.attn.0": 2.0}):
            pass
    with pytest.raises(InterventionError, match="finite"):
        with modulate_heads(llava, {"lm.head.0.0": float("nan")}):
            pass
    with pytest.raises(vi.errors.SiteError):
        with modulate_heads(llava, {"lm.head.0.9": 2.0}):
            pass


def test_v_seam_rule():
    scores = xr.DataArray([[0.2, -0.4], [0.0, 0.1]], dims=("layer", "head"), coords={"layer": [0, 1], "head": [0, 1]})
    scales = v_seam_scales(scores, lam=3.0)
    # normalised by 0.4: 1 + 3 * [0.5, -1, 0, 0.25] clipped to [0, 2]
    assert scales == {"lm.head.0.0": 2.0, "lm.head.0.1": 0.0, "lm.head.1.0": 1.0, "lm.head.1.1": 1.75}
    raw = v_seam_scales(scores, lam=1.0, normalise=False)
    assert raw["lm.head.0.1"] == pytest.approx(0.6)


# ---- removal -----------------------------------------------------------------------------
def _interventions(vlm):
    plan = InjectionPlan({"attn": {1: {0: 1.0}}}, {"attn": 0.5})
    return [lambda: modulate_heads(vlm, {"lm.head.0.1": 1.5}), lambda: vhr(vlm, alpha=2.0), lambda: inject(vlm, plan)]


def test_interventions_are_removed_after_the_block_and_after_errors(llava, ex):
    plain, count = logits(llava, ex), hook_count(llava.model)
    for make in _interventions(llava):
        with make():
            changed = logits(llava, ex)
        assert not torch.equal(changed, plain)
        assert hook_count(llava.model) == count
        assert torch.equal(logits(llava, ex), plain)
        with pytest.raises(RuntimeError, match="boom"):
            with make():
                logits(llava, ex)
                raise RuntimeError("boom")
        assert hook_count(llava.model) == count
        assert torch.equal(logits(llava, ex), plain)


def test_intervention_that_never_runs_is_an_error(llava):
    with pytest.raises(vi.errors.HookNeverFiredError):
        with modulate_heads(llava, {"lm.head.0.1": 1.5}):
            pass


@pytest.mark.parametrize("which", [0, 1, 2])
def test_kv_cache_on_and_off_give_the_same_tokens(llava, ex, which):
    make = _interventions(llava)[which]
    with make():
        cached = tokens(llava, ex, n=8, use_cache=True)
    with make():
        uncached = tokens(llava, ex, n=8, use_cache=False)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, tokens(llava, ex, n=8)) or which == 0  # the intervention acts


# ---- IRI -----------------------------------------------------------------------------------
def test_iri_with_zero_coefficients_is_the_identity(llava, ex):
    plan = InjectionPlan({"attn": {1: {0: 1.0}}, "mlp": {1: {0: 0.7}}}, {"attn": 0.0, "mlp": 0.0})
    plain_tokens, plain_logits = tokens(llava, ex), logits(llava, ex)
    with inject(llava, plan):
        torch.testing.assert_close(logits(llava, ex), plain_logits, rtol=0, atol=0)
        assert torch.equal(tokens(llava, ex), plain_tokens)


def test_iri_matches_the_formula_at_the_last_token_only(llava, ex):
    a = llava.adapter
    plan = InjectionPlan({"attn": {1: {0: 1.0}}}, {"attn": 0.8})
    raw = {}

    def grab(name):
        def hook(mod, args, out):
            raw[name] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        return hook

    # raw torch hooks run after vlm-interp's, so they see the injected output
    handles = [llava.model.get_submodule(a.module_path("lm", "attn", l)).register_forward_hook(grab(l)) for l in (0, 1)]
    try:
        logits(llava, ex)
        plain = dict(raw)
        with inject(llava, plan):
            logits(llava, ex)
    finally:
        for h in handles:
            h.remove()
    injected = raw[1]
    o, src = plain[1][0, -1], plain[0][0, -1]
    added = o + 0.8 * src
    expected = added * o.norm() / added.norm()
    torch.testing.assert_close(injected[0, -1], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(injected[0, :-1], plain[1][0, :-1], rtol=0, atol=0)


def test_iri_plan_checks_and_round_trip(llava, tmp_path):
    with pytest.raises(InterventionError, match="earlier"):
        with inject(llava, InjectionPlan({"attn": {0: {1: 1.0}}}, {"attn": 1.0})):
            pass
    with pytest.raises(InterventionError, match="coefficient"):
        InjectionPlan({"mlp": {1: {0: 1.0}}}, {}).check(2)
    rr = xr.DataArray([[0.1, 0.6, 0.3, 0.0], [0.5, 0.2, -0.1, 0.0]], dims=("component", "layer"),
                      coords={"component": ["attn", "mlp"], "layer": [0, 1, 2, 3]})
    plan = plan_from_recovery(rr, k=2, coefficients={"attn": 0.3, "mlp": 0.2})
    assert plan.targets["attn"] == {3: {1: pytest.approx(2 / 3), 2: pytest.approx(1 / 3)}}
    assert set(plan.targets["mlp"]) == {2, 3} and plan.targets["mlp"][2] == {0: pytest.approx(5 / 7), 1: pytest.approx(2 / 7)}
    assert InjectionPlan.load(plan.save(tmp_path / "plan.json")) == plan
    (tmp_path / "bad.json").write_text('{"targets": 3}')
    with pytest.raises(InterventionError, match="not an IRI plan"):
        InjectionPlan.load(tmp_path / "bad.json")


def test_blip_has_no_decoder_lm_for_iri_and_vhr(image):
    blip = vi.wrap(*tiny("blip", seed=0))
    with pytest.raises(InterventionError, match="answer decoder"):
        with vhr(blip):
            pass
    with pytest.raises(InterventionError, match="answer decoder"):
        with inject(blip, InjectionPlan({"attn": {1: {0: 1.0}}}, {"attn": 1.0})):
            pass


# ---- VHD / VHR -----------------------------------------------------------------------------
def test_head_divergence_equals_runs_with_and_without_image(llava, ex):
    a = llava.adapter
    heads = a.n_heads["lm"]
    paths = [a.module_path("lm", "head", l) for l in range(a.n_layers["lm"])]

    def outputs(run):
        got = {}
        handles = [llava.model.get_submodule(p).register_forward_pre_hook(
            lambda m, args, p=p: got.__setitem__(p, args[0][0, -1].detach().clone())) for p in paths]
        try:
            with torch.no_grad():
                run()
        finally:
            for h in handles:
                h.remove()
        return torch.stack([split_heads(got[p], heads) for p in paths])

    ids = ex.inputs["input_ids"]
    text_ids = ids[:, ids[0] != llava.image_token_id]
    with_image = outputs(lambda: llava.model(**ex.inputs))
    without = outputs(lambda: llava.model.model.language_model(input_ids=text_ids))
    expected = (with_image - without).norm(dim=-1)
    got = head_divergence(llava, ex)
    np.testing.assert_allclose(got.values, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_vision_head_selection_rule():
    values = np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 1.5, 2.0, 40.0]])
    vhd = xr.DataArray(values, dims=("layer", "head"))
    # 40 is beyond Q3 + 1.5 IQR: an outlier; per layer, heads above the median of the rest stay
    assert select_vision_heads(vhd) == [(0, 2), (0, 3), (1, 2)]
    assert select_vision_heads(vhd, layers=[0]) == [(0, 2), (0, 3)]
    with pytest.raises(InterventionError, match="do not exist"):
        select_vision_heads(vhd, layers=[5])


def test_vhr_amplifies_the_heads_chosen_at_the_first_step(llava, ex):
    vhd = head_divergence(llava, ex)
    chosen = select_vision_heads(vhd)
    with vhr(llava, alpha=2.5) as state:
        got = logits(llava, ex)
    assert state.heads == [[f"lm.head.{l}.{h}" for l, h in chosen]]
    with modulate_heads(llava, {f"lm.head.{l}.{h}": 2.5 for l, h in chosen}):
        expected = logits(llava, ex)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    with vhr(llava, alpha=1.0):
        torch.testing.assert_close(logits(llava, ex), logits(llava, ex), rtol=0, atol=0)


def test_vhr_chooses_once_per_generated_sequence(llava, ex, other_image):
    other = llava.prepare(other_image, "What is the shape ?")
    with vhr(llava, alpha=2.0) as state:
        llava.generate(ex, max_new_tokens=4)
        llava.generate(other, max_new_tokens=4)
    assert len(state.heads) == 2
    np.testing.assert_allclose(state.divergence[1].values, head_divergence(llava, other).values, rtol=1e-5)


# ---- head scores ---------------------------------------------------------------------------
@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_head_scores_equal_one_ablation_per_forward(llava, ex, ablation):
    a = llava.adapter
    heads = a.n_heads["lm"]
    row = score_example(llava, ex, ablation=ablation, batch_size=3)
    answer = ex.answer_ids[0]
    p = torch.softmax(logits(llava, ex)[0, llava.answer_start(ex)], -1)[answer]
    for layer in range(a.n_layers["lm"]):
        for head in range(heads):
            def ablate(mod, args, kwargs, head=head):
                x = split_heads(args[0], heads).clone()
                others = [h for h in range(heads) if h != head]
                x[..., head, :] = 0 if ablation == "zero" else x[..., others, :].mean(-2)
                return (x.reshape(args[0].shape), *args[1:]), kwargs

            module = llava.model.get_submodule(a.module_path("lm", "head", layer))
            handle = module.register_forward_pre_hook(ablate, with_kwargs=True)
            try:
                q = torch.softmax(logits(llava, ex)[0, llava.answer_start(ex)], -1)[answer]
            finally:
                handle.remove()
            assert row["effect"][layer][head] == pytest.approx(float(p - q), abs=1e-6)


def test_head_scores_resume_save_and_kinds(llava, image, other_image, tmp_path):
    examples = [("a", llava.prepare(image, QUESTION, answer="yes")),
                ("b", llava.prepare(other_image, QUESTION, answer="no"))]
    scores = score_heads(llava, examples, folder=tmp_path / "s", progress=False, level="object")
    assert scores.data.dims == ("example", "layer", "head") and scores.data.sizes["example"] == 2
    first = (tmp_path / "s" / "a.json").read_text()
    again = score_heads(llava, examples, folder=tmp_path / "s", progress=False)
    assert (tmp_path / "s" / "a.json").read_text() == first
    np.testing.assert_array_equal(again.data.values, scores.data.values)
    np.testing.assert_allclose(scores.signed().values, scores.data.values.mean(0))
    for suffix in (".nc", ".json"):
        back = HeadScores.load(scores.save(tmp_path / f"scores{suffix}"))
        np.testing.assert_allclose(back.data.values, scores.data.values)
        assert list(back.data.coords["correct"].values) == list(scores.data.coords["correct"].values)
        assert back.attrs["level"] == "object"
    with pytest.raises(InterventionError, match=r"ablation='mean' \(now 'zero'\)"):
        score_heads(llava, examples, folder=tmp_path / "s", ablation="zero", progress=False)
    dataset = score_heads(llava, examples, ablation="dataset_mean", progress=False)
    assert np.isfinite(dataset.data.values).all()


def test_qformer_head_scores(instructblip, image):
    e = instructblip.prepare(image, QUESTION, answer="yes")
    s = score_heads(instructblip, [e], tower="qformer", component="xattn_head", progress=False)
    assert list(s.data.coords["layer"].values) == instructblip.adapter.layers_with("qformer", "xattn")
    assert np.isfinite(s.data.values).all() and np.abs(s.data.values).max() > 0


# ---- specs ---------------------------------------------------------------------------------
def test_specs(llava, ex, image, tmp_path):
    scores = score_heads(llava, [llava.prepare(image, QUESTION, answer="yes")], progress=False)
    path = scores.save(tmp_path / "scores.nc")
    with from_spec(f"heads:{path},lambda=2")(llava):
        a = logits(llava, ex)
    with modulate_heads(llava, v_seam_scales(scores.signed(), 2.0)):
        b = logits(llava, ex)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with from_spec("scale:lm.head.0.1=1.5+lm.head.1.0=0")(llava):
        c = logits(llava, ex)
    with modulate_heads(llava, {"lm.head.0.1": 1.5, "lm.head.1.0": 0.0}):
        torch.testing.assert_close(c, logits(llava, ex), rtol=0, atol=0)
    with from_spec("vhr:alpha=3,layers=0-1")(llava) as state:
        logits(llava, ex)
    assert state.alpha == 3.0 and state.layers == [0, 1]
    for bad, message in [("warp:x=1", "unknown intervention"), ("", "empty intervention"),
                         ("vhr:beta=2", "unknown vhr option"), ("vhr:alpha=1,alpha=2", "given twice"),
                         ("vhr:layers=1-x", "integer"), ("scale:lm.head.0.1", "SITE=FACTOR"),
                         ("vhr:alpha=x", "must be a number"), ("iri:/nonexistent.json", "not found"),
                         (f"heads:{path},kind=odd", "kind must be")]:
        with pytest.raises(InterventionError, match=message):
            from_spec(bad)


def test_iri_plan_sources_leave_room_for_a_target():
    rr = xr.DataArray([[0.1, 0.2, 0.3, 0.9]], dims=("component", "layer"),
                      coords={"component": ["attn"], "layer": [0, 1, 2, 3]})
    plan = plan_from_recovery(rr, k=1, coefficients={"attn": 1.0})
    assert plan.targets == {"attn": {3: {2: 1.0}}}  # layer 3 recovers most but nothing comes after it
