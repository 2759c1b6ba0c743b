"""Every family on a tiny random model of its real transformers class.

Numbers are checked against computations that do not go through the hook engine: raw
torch hooks, hand-made head splits, and manual forwards of the model's final layers.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vlm_interp as vi
from vlm_interp.adapters import adapter_for, supported
from vlm_interp.errors import HookNeverFiredError, SiteError, UnknownArchitectureError

from conftest import QUESTION, run_logits

# Where the residual sum that contains a component's output can be read without our engine:
# (module path relative to the layer, "input" or "output") by layer kind and component.
LLAMA = {"attn": ("post_attention_layernorm", "input"), "mlp": ("", "output")}
VIT = {"attn": ("layer_norm2", "input"), "mlp": ("", "output")}
BERT = {"attn": ("attention.output.LayerNorm", "input"), "xattn": ("crossattention.output.LayerNorm", "input"),
        "mlp": ("output.LayerNorm", "input")}
QFORMER = {**BERT, "mlp": ("output_query.LayerNorm", "input")}
QWEN_VIT = {"attn": ("norm2", "input"), "mlp": ("", "output")}
RESIDUAL_AFTER = {
    "llava": {"vision": VIT, "lm": LLAMA},
    "llava_next": {"vision": VIT, "lm": LLAMA},
    "blip": {"vision": VIT, "text": BERT, "lm": BERT},
    "blip2": {"vision": VIT, "qformer": QFORMER, "lm": LLAMA},
    "instructblip": {"vision": VIT, "qformer": QFORMER, "lm": LLAMA},
    "qwen2_vl": {"vision": QWEN_VIT, "lm": LLAMA},
    "qwen2_5_vl": {"vision": QWEN_VIT, "lm": LLAMA},
    "qwen3_vl": {"vision": QWEN_VIT, "lm": LLAMA},
}
# The modules that turn the last LM hidden state into logits.
FINAL = {
    "llava": lambda m, h: m.lm_head(m.model.language_model.norm(h)),
    "llava_next": lambda m, h: m.lm_head(m.model.language_model.norm(h)),
    "blip2": lambda m, h: m.language_model.lm_head(m.language_model.model.norm(h)),
    "instructblip": lambda m, h: m.language_model.lm_head(m.language_model.model.norm(h)),
    "blip": lambda m, h: m.text_decoder.cls(h),
    **{f: lambda m, h: m.lm_head(m.model.language_model.norm(h)) for f in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")},
}
VISION_MODULE = {"llava": "model.vision_tower", "llava_next": "model.vision_tower", "blip": "vision_model",
                 "blip2": "vision_model", "instructblip": "vision_model",
                 **{f: "model.visual" for f in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")}}


def batched(t: torch.Tensor) -> torch.Tensor:
    """A packed tower's (positions, width) tensor as one batch row, as the library shows it."""
    return t[None] if t.dim() == 2 else t


def raw_grab(model: nn.Module, path: str, kind: str) -> tuple[list, torch.utils.hooks.RemovableHandle]:
    """Record a module's input or output with a plain torch hook (independent of vlm_interp.hooks)."""
    store: list[torch.Tensor] = []
    module = model.get_submodule(path)
    if kind == "input":
        def pre(mod, args, kwargs):
            store.append(batched((args[0] if args else kwargs["hidden_states"]).detach().clone()))
        return store, module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(mod, args, out):
        store.append(batched((out if torch.is_tensor(out) else out[0]).detach().clone()))
    return store, module.register_forward_hook(post)


def probe_position(ex: vi.Example, tower: str) -> int:
    return {"vision": 1, "qformer": 0, "text": ex.groups.get("text", {}).get("last", [0])[0],
            "lm": ex.groups["lm"]["last"][0]}[tower]


def test_adapter_table_matches_config(vlm):
    a = vlm.adapter
    cfg = vlm.model.config
    assert a.n_layers["vision"] == cfg.vision_config.num_hidden_layers
    assert a.n_heads["vision"] == cfg.vision_config.num_attention_heads
    if vlm.family == "blip":
        assert set(a.towers()) == {"vision", "text", "lm"}
    else:
        assert a.n_kv_heads["lm"] == cfg.text_config.num_key_value_heads == 2  # grouped-query attention
        assert a.n_heads["lm"] == 4
    if vlm.family in ("blip2", "instructblip"):
        freq = cfg.qformer_config.cross_attention_frequency
        assert a.layers_with("qformer", "xattn") == [l for l in range(a.n_layers["qformer"]) if l % freq == 0]
    assert len(a.sites("lm", "head")) == a.n_layers["lm"] * a.n_heads["lm"]


def all_sites(vlm) -> list:
    a = vlm.adapter
    return [s for t in a.towers() for c in a.components(t) for s in a.sites(t, c)]


def test_identity_hooks_everywhere_leave_logits_bit_identical(vlm, image):
    ex = vlm.prepare(image, QUESTION)
    base = run_logits(vlm, ex)
    for fn in (lambda t: t, lambda t: t.clone(), lambda t: None):
        hooks = [vlm.hook(s, fn) for s in all_sites(vlm)]
        with vlm.hooks(hooks):
            out = run_logits(vlm, ex)
        assert torch.equal(out, base)
        assert all(h.calls >= 1 for h in hooks)


@pytest.mark.parametrize("component", ["attn", "xattn", "mlp"])
def test_patching_a_site_moves_the_residual_by_exactly_the_difference(vlm, image, other_image, component):
    clean, source = vlm.prepare(image, QUESTION), vlm.prepare(other_image, QUESTION)
    checked = 0
    for tower, table in RESIDUAL_AFTER[vlm.family].items():
        if component not in table:
            continue
        layer = vlm.adapter.layers_with(tower, component)[-1]
        site = f"{tower}.{component}.{layer}"
        pos = probe_position(clean, tower)
        rel, kind = table[component]
        probe_path = vlm.adapter.module_path(tower, "hidden", layer) + (f".{rel}" if rel else "")

        grab_src = vlm.hook(site, capture=True)
        grab_base = vlm.hook(site, capture=True)
        with vlm.hooks([grab_src]):
            run_logits(vlm, source)
        store, handle = raw_grab(vlm.model, probe_path, kind)
        with vlm.hooks([grab_base]):
            run_logits(vlm, clean)
        residual_base = store.pop()

        def patch(t, src=grab_src.value, pos=pos):
            t = t.clone()
            t[:, pos] = src[:, pos]
            return t

        with vlm.hooks([vlm.hook(site, patch)]):
            run_logits(vlm, clean)
        handle.remove()
        residual_patched = store.pop()
        expected = residual_base.clone()
        expected[:, pos] += grab_src.value[:, pos] - grab_base.value[:, pos]
        assert not torch.allclose(grab_src.value[:, pos], grab_base.value[:, pos]), "source must differ"
        torch.testing.assert_close(residual_patched, expected, rtol=1e-5, atol=1e-5)
        checked += 1
    if component != "xattn" or vlm.family in ("blip", "blip2", "instructblip"):
        assert checked >= 1


def test_patching_last_lm_hidden_equals_manual_final_layers(vlm, image, other_image):
    clean, source = vlm.prepare(image, QUESTION), vlm.prepare(other_image, QUESTION)
    site = "lm.hidden.-1"
    grab = vlm.hook(site, capture=True)
    with vlm.hooks([grab]):
        run_logits(vlm, source)
    base = run_logits(vlm, clean)
    pos = clean.groups["lm"]["last"][0]

    def patch(t):
        t = t.clone()
        t[:, pos] = grab.value[:, pos]
        return t

    with vlm.hooks([vlm.hook(site, patch)]):
        patched = run_logits(vlm, clean)
    with torch.no_grad():
        manual = FINAL[vlm.family](vlm.model, grab.value[:, pos])
    torch.testing.assert_close(patched[:, pos], manual, rtol=1e-5, atol=1e-5)
    others = [p for p in range(patched.shape[1]) if p != pos]
    assert torch.equal(patched[:, others], base[:, others])  # causal: nothing else moves
    assert not torch.allclose(patched[:, pos], base[:, pos])


def test_head_edit_equals_manual_split_of_output_projection_input(vlm, image):
    ex = vlm.prepare(image, QUESTION)
    a = vlm.adapter
    for tower in a.towers():
        for component in ("head", "xattn_head"):
            if component not in a.components(tower):
                continue
            # first layer (LLaVA never reads its last vision layer), last head
            site = a.sites(tower, component)[a.n_heads[tower] - 1]
            heads = a.n_heads[tower]
            path = a.module_path(tower, component, site.layer)

            def manual(mod, args, kwargs, h=site.head, heads=heads):
                x = args[0]
                split = x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads).clone()
                split[..., h, :] = split[..., h, :] * 2.0 + 0.5
                return (split.reshape(x.shape), *args[1:]), kwargs

            handle = vlm.model.get_submodule(path).register_forward_pre_hook(manual, with_kwargs=True)
            expected = run_logits(vlm, ex)
            handle.remove()
            with vlm.hooks([vlm.hook(site, lambda t: t * 2.0 + 0.5)]):
                got = run_logits(vlm, ex)
            assert not torch.allclose(got, run_logits(vlm, ex)), f"{site} edit had no effect"
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_hooks_are_gone_after_an_exception(vlm, image):
    ex = vlm.prepare(image, QUESTION)
    base = run_logits(vlm, ex)
    before = {n: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for n, m in vlm.model.named_modules()}
    with pytest.raises(ZeroDivisionError):
        with vlm.hooks([vlm.hook(s, lambda t: t * 0) for s in all_sites(vlm)]):
            run_logits(vlm, ex)
            1 / 0
    after = {n: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for n, m in vlm.model.named_modules()}
    assert after == before
    assert torch.equal(run_logits(vlm, ex), base)


def test_a_hook_that_never_fires_raises(vlm, image):
    ex = vlm.prepare(image, QUESTION)
    vision = vlm.model.get_submodule(VISION_MODULE[vlm.family])
    pixels = ex.inputs["pixel_values"]
    pixels = pixels[0] if pixels.dim() == 5 else pixels  # LLaVA-NeXT stacks crops per image
    # Qwen's vision tower takes flattened patches and their grid
    call = {"hidden_states": pixels, "grid_thw": ex.inputs["image_grid_thw"]} if "image_grid_thw" in ex.inputs \
        else {"pixel_values": pixels}
    with pytest.raises(HookNeverFiredError, match="lm.hidden.0"):
        with vlm.hooks([vlm.hook("vision.hidden.0", capture=True), vlm.hook("lm.hidden.0", capture=True)]):
            with torch.no_grad():
                vision(**call)
    with vlm.hooks([vlm.hook("lm.hidden.0", capture=True, allow_unused=True)]):
        with torch.no_grad():
            vision(**call)


def test_unknown_sites_are_clear_errors(vlm):
    with pytest.raises(SiteError, match="layer out of range"):
        vlm.hook("lm.attn.99", capture=True)
    with pytest.raises(SiteError, match="head out of range"):
        vlm.hook("lm.head.0.99", capture=True)
    with pytest.raises(SiteError, match="no 'qformer' tower|no component"):
        vlm.hook("qformer.attn.0" if "qformer" not in vlm.adapter.towers() else "lm.xattn.0", capture=True)
    if vlm.family in ("blip2", "instructblip"):
        with pytest.raises(SiteError, match="layers that have it: \\[0\\]"):
            vlm.hook("qformer.xattn.1", capture=True)


def test_unknown_architecture_lists_supported_ones():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=10))
    with pytest.raises(UnknownArchitectureError, match="LlamaForCausalLM") as err:
        adapter_for(model)
    for name in supported():
        assert name in str(err.value)
    assert "how to add" in str(err.value).lower() or "to add a family" in str(err.value).lower()
