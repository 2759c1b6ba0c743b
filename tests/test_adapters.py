"""Every family on a tiny random model of its real transformers class.

Numbers are checked against computations that do not go through the hook engine: raw
torch hooks, hand-made head splits, and manual forwards of the model's final layers.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from packaging.version import Version
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
INTERNVIT = {"attn": ("layernorm_after", "input"), "mlp": ("", "output")}
MLLAMA_VISION = {"attn": ("post_attention_layernorm", "input"), "mlp": ("", "output")}
GEMMA = {"attn": ("pre_feedforward_layernorm", "input"), "mlp": ("", "output")}  # Gemma 2/3: normed, then added
QWEN_VIT = {"attn": ("norm2", "input"), "mlp": ("", "output")}
RESIDUAL_AFTER = {
    "mllama": {"vision": MLLAMA_VISION, "vision_global": MLLAMA_VISION,
               "lm": {**LLAMA, "xattn": ("post_attention_layernorm", "input")}},
    "idefics3": {"vision": VIT, "lm": LLAMA},
    "smolvlm": {"vision": VIT, "lm": LLAMA},
    "internvl": {"vision": INTERNVIT, "lm": LLAMA},
    "llava": {"vision": VIT, "lm": LLAMA},
    "llava_next": {"vision": VIT, "lm": LLAMA},
    "blip": {"vision": VIT, "text": BERT, "lm": BERT},
    "blip2": {"vision": VIT, "qformer": QFORMER, "lm": LLAMA},
    "instructblip": {"vision": VIT, "qformer": QFORMER, "lm": LLAMA},
    "llava_onevision": {"vision": VIT, "lm": LLAMA},
    "gemma3": {"vision": VIT, "lm": GEMMA},
    "paligemma": {"vision": VIT, "lm": GEMMA},
    "qwen2_vl": {"vision": QWEN_VIT, "lm": LLAMA},
    "qwen2_5_vl": {"vision": QWEN_VIT, "lm": LLAMA},
    "qwen3_vl": {"vision": QWEN_VIT, "lm": LLAMA},
}
# PaliGemma applies its text config's final-logit soft cap from transformers 5.23 (its forward before returns raw logits)
PALIGEMMA_CAPS = Version(transformers.__version__) >= Version("5.23.0")
# The modules that turn the last LM hidden state into logits.
FINAL = {
    "mllama": lambda m, h: m.lm_head(m.model.language_model.norm(h)),
    "idefics3": lambda m, h: m.lm_head(m.model.text_model.norm(h)),
    "smolvlm": lambda m, h: m.lm_head(m.model.text_model.norm(h)),
    "internvl": lambda m, h: m.lm_head(m.model.language_model.norm(h)),
    "llava": lambda m, h: m.lm_head(m.model.language_model.norm(h)),
    "llava_next": lambda m, h: m.lm_head(m.model.language_model.norm(h)),
    "blip2": lambda m, h: m.language_model.lm_head(m.language_model.model.norm(h)),
    "instructblip": lambda m, h: m.language_model.lm_head(m.language_model.model.norm(h)),
    "blip": lambda m, h: m.text_decoder.cls(h),
    "llava_onevision": lambda m, h: m.lm_head(m.model.language_model.norm(h)),
    "gemma3": lambda m, h: m.lm_head(m.model.language_model.norm(h)),  # no final-logit soft cap in this class
    "paligemma": lambda m, h: (lambda z, c: torch.tanh(z / c) * c if PALIGEMMA_CAPS else z)(
        m.lm_head(m.model.language_model.norm(h)), m.config.text_config.final_logit_softcapping),
    **{f: lambda m, h: m.lm_head(m.model.language_model.norm(h)) for f in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")},
}
VISION_MODULE = {"mllama": "model.vision_model", "idefics3": "model.vision_model", "smolvlm": "model.vision_model",
                 "internvl": "model.vision_tower", "llava": "model.vision_tower", "llava_next": "model.vision_tower",
                 "blip": "vision_model", "blip2": "vision_model", "instructblip": "vision_model",
                 "llava_onevision": "model.vision_tower", "gemma3": "model.vision_tower",
                 "paligemma": "model.vision_tower",
                 **{f: "model.visual" for f in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")}}


def folded(vlm, tower: str, t: torch.Tensor) -> torch.Tensor:
    """A raw tensor of one example as the adapter's sites show it: a tiled tower's tiles as one sequence."""
    return t.reshape(1, -1, t.shape[-1]) if vlm.adapter.folds(tower) else t


def residual_scale(vlm, tower: str, component: str, layer: int) -> torch.Tensor | float:
    """What the adapter says multiplies ``component`` before the residual add (1 where nothing does)."""
    spec = vlm.adapter.adapter.towers[tower].residual_scale.get(component)
    try:
        module = vlm.model.get_submodule(vlm.adapter.module_path(tower, "hidden", layer))
        param = module.get_parameter(spec[0]).detach() if spec else None
    except AttributeError:  # this layer has no such scale (Mllama's self-attention layers have no gates)
        param = None
    if param is None:
        return 1.0
    return param.tanh() if spec[1] == "tanh" else param


def batched(t: torch.Tensor) -> torch.Tensor:
    """A packed tower's (positions, width) tensor as one batch row, as the library shows it."""
    return t[None] if t.dim() == 2 else t


def raw_grab(model: nn.Module, path: str, kind: str) -> tuple[list, torch.utils.hooks.RemovableHandle]:
    """Record a module's input or output with a plain torch hook (independent of vlm_interp.hooks)."""
    store: list[torch.Tensor] = []
    module = model.get_submodule(path)
    if kind == "input":
        def pre(mod, args, kwargs):
            # transformers 5.13 calls Mllama's vision layers with hidden_state=
            x = args[0] if args else kwargs.get("hidden_states", kwargs.get("hidden_state"))
            store.append(batched(x.detach().clone()))
        return store, module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(mod, args, out):
        store.append(batched((out if torch.is_tensor(out) else out[0]).detach().clone()))
    return store, module.register_forward_hook(post)


def probe_position(ex: vi.Example, tower: str) -> int:
    return {"vision": 1, "vision_global": 1, "qformer": 0, "text": ex.groups.get("text", {}).get("last", [0])[0],
            "lm": ex.groups["lm"]["last"][0]}[tower]


def test_adapter_table_matches_config(vlm):
    a = vlm.adapter
    cfg = vlm.model.config
    vc = cfg.vision_config  # Qwen-VL's vision configs name these depth and num_heads (aliases from 5.2x)
    assert a.n_layers["vision"] == (getattr(vc, "num_hidden_layers", None) or vc.depth)
    assert a.n_heads["vision"] == (getattr(vc, "num_attention_heads", None) or vc.num_heads)
    if vlm.family == "blip":
        assert set(a.towers()) == {"vision", "text", "lm"}
    else:
        assert a.n_kv_heads["lm"] == cfg.text_config.num_key_value_heads == 2  # grouped-query attention
        assert a.n_heads["lm"] == 4
    if vlm.family in ("blip2", "instructblip"):
        freq = cfg.qformer_config.cross_attention_frequency
        assert a.layers_with("qformer", "xattn") == [l for l in range(a.n_layers["qformer"]) if l % freq == 0]
    assert len(a.sites("lm", "head")) == len(a.layers_with("lm", "head")) * a.n_heads["lm"]


def all_sites(vlm) -> list:
    a = vlm.adapter
    return [s for t in a.towers() for c in a.components(t) for s in a.sites(t, c)]


def test_identity_hooks_everywhere_leave_logits_bit_identical(vlm, image):
    ex = vlm.prepare(image, QUESTION)
    base = run_logits(vlm, ex)
    for fn in (lambda t: t, lambda t: t.clone(), lambda t: None):
        hooks = [vlm.hook(s, fn) for s in all_sites(vlm)]
        with vlm.attach(hooks):
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
        with vlm.attach([grab_src]):
            run_logits(vlm, source)
        store, handle = raw_grab(vlm.model, probe_path, kind)
        with vlm.attach([grab_base]):
            run_logits(vlm, clean)
        residual_base = folded(vlm, tower, store.pop())

        def patch(t, src=grab_src.value, pos=pos):
            t = t.clone()
            t[:, pos] = src[:, pos]
            return t

        with vlm.attach([vlm.hook(site, patch)]):
            run_logits(vlm, clean)
        handle.remove()
        residual_patched = folded(vlm, tower, store.pop())
        expected = residual_base.clone()
        scale = residual_scale(vlm, tower, component, layer)
        expected[:, pos] += scale * (grab_src.value[:, pos] - grab_base.value[:, pos])
        assert not torch.allclose(grab_src.value[:, pos], grab_base.value[:, pos]), "source must differ"
        torch.testing.assert_close(residual_patched, expected, rtol=1e-5, atol=1e-5)
        checked += 1
    if component != "xattn" or vlm.family in ("blip", "blip2", "instructblip"):
        assert checked >= 1


def test_patching_last_lm_hidden_equals_manual_final_layers(vlm, image, other_image):
    clean, source = vlm.prepare(image, QUESTION), vlm.prepare(other_image, QUESTION)
    site = "lm.hidden.-1"
    grab = vlm.hook(site, capture=True)
    with vlm.attach([grab]):
        run_logits(vlm, source)
    base = run_logits(vlm, clean)
    pos = clean.groups["lm"]["last"][0]

    def patch(t):
        t = t.clone()
        t[:, pos] = grab.value[:, pos]
        return t

    with vlm.attach([vlm.hook(site, patch)]):
        patched = run_logits(vlm, clean)
    with torch.no_grad():
        manual = FINAL[vlm.family](vlm.model, grab.value[:, pos])
    torch.testing.assert_close(patched[:, pos], manual, rtol=1e-5, atol=1e-5)
    others = [p for p in range(patched.shape[1]) if p != pos]
    assert torch.equal(patched[:, others], base[:, others])  # causal: nothing else moves
    assert not torch.allclose(patched[:, pos], base[:, pos])


def test_residual_in_plus_attn_plus_mlp_is_residual_out(vlm, image):
    """Where a tower's ``attn`` and ``mlp`` are the tensors added to the residual stream (Tower.residual_sum), a layer's
    input plus both (times the scales Tower.residual_scale names) is its output, at every layer, read with plain
    torch hooks; BERT-style post-norm towers say not."""
    ex = vlm.prepare(image, QUESTION)
    checked = []
    for tower, spec in vlm.adapter.adapter.towers.items():
        if not spec.residual_sum:
            if (vlm.family, tower) == ("mllama", "lm"):  # its cross-attention layers mask the MLP output of some rows
                continue
            assert "LayerNorm" in "".join(p for p, _ in RESIDUAL_AFTER[vlm.family][tower].values())  # post-norm
            continue
        attn_layers = set(vlm.adapter.layers_with(tower, "attn"))
        for layer in range(vlm.adapter.n_layers[tower]):
            grabs = {}
            handles = []
            attn = "attn" if layer in attn_layers else "xattn"  # Mllama's cross-attention layers have no self-attention
            for comp in ("input", attn, "mlp", "hidden"):
                rel, kind = spec.components[comp]
                store, handle = raw_grab(vlm.model, vlm.adapter.module_path(tower, comp, layer), kind)
                grabs[comp], handles = store, handles + [handle]
            try:
                run_logits(vlm, ex)
            finally:
                for handle in handles:
                    handle.remove()
            x, a, m, out = (folded(vlm, tower, grabs[c][0]) for c in ("input", attn, "mlp", "hidden"))
            a_scale, m_scale = (residual_scale(vlm, tower, c, layer) for c in (attn, "mlp"))  # layer scale, tanh gates
            torch.testing.assert_close(x + a_scale * a + m_scale * m, out, rtol=1e-5, atol=1e-5)
            assert a.abs().max() > 0 and m.abs().max() > 0
            checked.append(tower)
    assert "lm" in checked or vlm.family in ("blip", "mllama")


def test_the_tail_reproduces_the_logits(vlm, image):
    """The adapter's tail (final norm, LM head, soft cap) on the last layer's output gives the model's logits."""
    if not vlm.decoder.continues_prompt:  # BLIP's answer decoder: its logits are a module's output (FINAL checks it)
        return
    ex = vlm.prepare(image, QUESTION)
    grab = vlm.hook("lm.hidden.-1", capture=True)
    with vlm.attach([grab]):
        logits = run_logits(vlm, ex)
    with torch.no_grad():
        tail = vlm.adapter.tail_logits("lm", grab.value)
    torch.testing.assert_close(tail, logits, rtol=0, atol=1e-6)


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
            with vlm.attach([vlm.hook(site, lambda t: t * 2.0 + 0.5)]):
                got = run_logits(vlm, ex)
            assert not torch.allclose(got, run_logits(vlm, ex)), f"{site} edit had no effect"
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_hooks_are_gone_after_an_exception(vlm, image):
    ex = vlm.prepare(image, QUESTION)
    base = run_logits(vlm, ex)
    before = {n: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for n, m in vlm.model.named_modules()}
    with pytest.raises(ZeroDivisionError):
        with vlm.attach([vlm.hook(s, lambda t: t * 0) for s in all_sites(vlm)]):
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
    tiles = {k: ex.inputs[k] for k in ("aspect_ratio_ids", "aspect_ratio_mask") if k in ex.inputs}  # Mllama
    # Qwen's vision tower takes flattened patches and their grid
    call = {"hidden_states": pixels, "grid_thw": ex.inputs["image_grid_thw"]} if "image_grid_thw" in ex.inputs \
        else {"pixel_values": pixels, **tiles}
    with pytest.raises(HookNeverFiredError, match="lm.hidden.0"):
        with vlm.attach([vlm.hook("vision.hidden.0", capture=True), vlm.hook("lm.hidden.0", capture=True)]):
            with torch.no_grad():
                vision(**call)
    with vlm.attach([vlm.hook("lm.hidden.0", capture=True, allow_unused=True)]):
        with torch.no_grad():
            vision(**call)


def test_unknown_sites_are_clear_errors(vlm):
    with pytest.raises(SiteError, match="layer out of range"):
        vlm.hook("lm.attn.99", capture=True)
    with pytest.raises(SiteError, match="head out of range"):
        vlm.hook("lm.head.0.99", capture=True)
    with pytest.raises(SiteError, match="no 'qformer' tower|no component"):
        vlm.hook("qformer.attn.0" if "qformer" not in vlm.adapter.towers() else "lm.xattn.0", capture=True)
    if vlm.family == "mllama":  # cross-attention on layer 1 only, self-attention on the others
        with pytest.raises(SiteError, match="layers that have it: \\[1\\]"):
            vlm.hook("lm.xattn.0", capture=True)
        with pytest.raises(SiteError, match="layers that have it: \\[0, 2\\]"):
            vlm.hook("lm.attn.1", capture=True)
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


def test_patch_projector_maps_each_vision_token_into_the_lm(vlm, image):
    """Adapter.patch_projector: LLaVA's layers, in order and with the configured activation between them, turn each
    selected vision token into the LM's input embedding at its image position (read without the hook engine);
    the BLIP families have no such projector."""
    from transformers.activations import ACT2FN

    layers = [vlm.model.get_submodule(p) for p in vlm.adapter.adapter.patch_projector]
    if vlm.family not in ("llava", "llava_next"):
        assert layers == []
        return
    config = vlm.model.config
    assert len(layers) == 2
    assert layers[0].in_features == config.vision_config.hidden_size
    assert layers[-1].out_features == config.text_config.hidden_size
    if vlm.family == "llava_next":  # its image tokens are re-ordered into tiles; the widths are what is checked
        return
    ex = vlm.prepare(image, QUESTION)
    seen = {}

    def record(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    handle = vlm.model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            vlm.model(**ex.inputs)
            tower = vlm.model.model.vision_tower(pixel_values=ex.inputs["pixel_values"], output_hidden_states=True)
    finally:
        handle.remove()
    selected = tower.hidden_states[config.vision_feature_layer][:, 1:]  # "default": CLS dropped
    manual = layers[1](ACT2FN[config.projector_hidden_act](layers[0](selected)))
    torch.testing.assert_close(seen["embeds"][0, ex.groups["lm"]["image"]], manual[0])
