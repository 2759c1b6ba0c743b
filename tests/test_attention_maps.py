"""Attention maps and rollout: weights from the dispatcher equal transformers' eager attention weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vlm_interp as vi
from vlm_interp.hooks import Hook
from vlm_interp.tiny import tiny
from vlm_interp.tracing.attention import AttentionMaps, attention_maps, rollout
from vlm_interp.tracing.knockout import KnockoutError, knocked_out, knockout

from conftest import QUESTION

_MODELS: dict[str, vi.VLM] = {}


def model(family: str, implementation: str = "sdpa") -> vi.VLM:
    key = f"{family}/{implementation}"
    if key not in _MODELS:
        m, p = tiny(family, seed=0)
        m.set_attn_implementation(implementation)
        _MODELS[key] = vi.wrap(m, p)
    return _MODELS[key]


def eager_attentions(vlm, ex) -> dict[str, tuple]:
    """transformers' own eager attention weights, per tower, from output_attentions=True."""
    seen: dict = {}
    call = Hook("qformer", fn=lambda args, kwargs: seen.update(args=args, kwargs=kwargs), kind="call",
                allow_unused=True)
    with torch.no_grad(), vlm.attach([call] if hasattr(vlm.model, "qformer") else []):
        out = vlm.model(**ex.inputs, output_attentions=True)
    if not seen:
        return {"lm": out.attentions}
    with torch.no_grad():  # the Q-Former's own output keeps its attentions when it is called by itself
        qformer = vlm.model.qformer(*seen["args"], **{**seen["kwargs"], "output_attentions": True})
    return {"lm": out.language_model_outputs.attentions, "qformer.xattn": qformer.cross_attentions}


@pytest.mark.parametrize("family, implementation", [
    (f, i) for f in ("llava", "instructblip", "qwen2_5_vl", "gemma3") for i in ("eager", "sdpa")
] + [("paligemma", "eager")])  # PaliGemma 2's Gemma 2 has no sdpa; its eager attention soft-caps the scores
def test_weights_equal_eager_attention(family, implementation, image):
    """Under eager, the dispatcher's eager attention meets transformers' on the same inputs; under sdpa the inputs
    differ by sdpa's rounding only."""
    vlm = model(family, implementation)
    ex = vlm.prepare(image, QUESTION, answer="yes")
    maps = attention_maps(vlm, ex, query="last")
    reference = eager_attentions(model(family, "eager"), ex)["lm"]
    last = ex.groups["lm"]["last"][0]
    tol = 1e-6 if implementation == "eager" else 1e-5
    for layer in range(vlm.adapter.n_layers["lm"]):
        expected = reference[layer][0, :, last].numpy()  # (heads, keys)
        assert np.allclose(maps.data.sel(layer=layer).values, expected, atol=tol, rtol=0)
    assert maps.attrs["causal"].startswith("attention weights are correlational")


@pytest.mark.parametrize("family", ["blip2", "instructblip"])
def test_qformer_cross_attention_maps_equal_eager(family, image):
    vlm = model(family, "eager")
    ex = vlm.prepare(image, QUESTION, answer="yes")
    maps = attention_maps(vlm, ex, tower="qformer", component="xattn", query="image")
    reference = [a for a in eager_attentions(vlm, ex)["qformer.xattn"] if a is not None]
    assert maps.attrs["keys_tower"] == "vision" and len(reference) == maps.data.sizes["layer"]
    queries = ex.groups["qformer"]["image"]
    for k, layer in enumerate(maps.data.coords["layer"].values):
        expected = reference[k][0][:, queries].mean(1).numpy()
        assert np.allclose(maps.data.sel(layer=layer).values, expected, atol=1e-6, rtol=0)
    with pytest.raises(KnockoutError, match="rollout"):
        attention_maps(vlm, ex, tower="qformer", component="xattn", query="image", with_rollout=True)


def test_rollout_equals_an_independent_computation(image):
    vlm = model("llava", "eager")
    ex = vlm.prepare(image, QUESTION, answer="yes")
    maps = attention_maps(vlm, ex, query="question")
    reference = eager_attentions(vlm, ex)["lm"]
    n = reference[0].shape[-1]
    total = np.eye(n)
    for layer, weights in enumerate(reference):
        a = 0.5 * weights[0].mean(0).double().numpy() + 0.5 * np.eye(n)
        a /= a.sum(-1, keepdims=True)
        total = a @ total
        expected = total[ex.groups["lm"]["question"]].mean(0)
        assert np.allclose(maps.rollout().sel(layer=layer).values, expected, atol=1e-6)
    assert np.allclose(rollout([torch.eye(3) / 1.0])[0].numpy(), np.eye(3))


def test_captured_weights_stack_with_a_knockout(image):
    """Weight capture and knockout share the dispatcher: under the cut, the last token puts no weight on the image."""
    vlm = model("llava")
    ex = vlm.prepare(image, QUESTION, answer="yes")
    with knocked_out(vlm, ex, "image", "last", layers=[1]):
        maps = attention_maps(vlm, ex, query="last")
    image = ex.groups["lm"]["image"]
    assert np.all(maps.data.sel(layer=1).values[:, image] == 0)
    assert np.all(maps.data.sel(layer=0).values[:, image].sum(-1) > 0)
    assert np.allclose(maps.data.sum("position").values, 1, atol=1e-5)


def test_maps_plot_over_the_image_next_to_knockout_and_save(image, tmp_path):
    vlm = model("llava")
    ex = vlm.prepare(image, QUESTION, answer="yes", region=(0, 0, 16, 16))
    maps = attention_maps(vlm, ex, query="last")
    heat = maps.on_image(maps.mean_heads().sel(layer=0), ex)
    box = ex.boxes["lm"][ex.groups["lm"]["image"][0]]
    y0, x0 = int(round(box[0])), int(round(box[1]))
    assert heat[max(0, y0), max(0, x0)] == pytest.approx(maps.mean_heads().sel(layer=0).values[ex.groups["lm"]["image"][0]])
    result = knockout(vlm, ex, progress=False)
    assert maps.plot(ex, tmp_path / "maps.png", knockout=result).stat().st_size > 0
    loaded = AttentionMaps.load(maps.save(tmp_path / "maps.nc"))
    assert loaded.data.equals(maps.data) and loaded.attrs["rollout"] == maps.attrs["rollout"]


def test_blip_attention_maps_say_why_they_cannot_be_taken(image):
    blip = model("blip", "eager")
    ex = blip.prepare(image, QUESTION, answer="yes")
    with pytest.raises(KnockoutError, match="AttentionInterface"):
        attention_maps(blip, ex, tower="text", component="xattn", query="question")


def test_attention_command_writes_maps_next_to_knockout(tmp_path, capsys):
    from vlm_interp.cli import main

    out = tmp_path / "attention"
    assert main(["attention", "--model", "tiny:instructblip", "--image", "shapes:3", "--question",
                 "Is there a circle in the image?", "--tower", "qformer", "--component", "xattn", "--query", "image",
                 "--knockout", "--out", str(out)]) == 0
    maps = AttentionMaps.load(out / "attention.json")
    assert maps.attrs["keys_tower"] == "vision" and "rollout" not in maps.attrs
    assert (out / "attention.png").stat().st_size > 1000 and (out / "knockout.json").exists()
    assert "not a causal effect" in capsys.readouterr().out
