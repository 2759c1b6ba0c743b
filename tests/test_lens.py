"""The logit lens: the LM's own tail applied to the residual stream, checked against the model's logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vlm_interp as vi
from vlm_interp.tiny import tiny
from vlm_interp.tracing.lens import Lens, LensError, logit_lens

from conftest import QUESTION

_MODELS: dict[str, vi.VLM] = {}


def model(family: str) -> vi.VLM:
    if family not in _MODELS:
        _MODELS[family] = vi.wrap(*tiny(family, seed=0))
    return _MODELS[family]


@pytest.mark.parametrize("family", ["llava", "llava_next", "instructblip", "qwen2_5_vl"])
def test_the_lens_at_the_last_layer_is_the_models_own_logits(family, image):
    vlm = model(family)
    ex = vlm.prepare(image, QUESTION, answer="yes")
    lens = logit_lens(vlm, ex, ["lm.hidden"], k=3)
    with torch.no_grad():
        logits = vlm.logits(ex.inputs)[0].float()
    logp = torch.log_softmax(logits, -1)
    answer = vlm.encode_answer(ex, "yes")[0]
    last = lens.data.sel(component="hidden", layer=vlm.adapter.n_layers["lm"] - 1)
    assert np.allclose(last.sel(quantity="logprob").values, logp[:, answer].numpy(), atol=1e-6)
    assert np.allclose(last.sel(quantity="prob").values, logp[:, answer].exp().numpy(), atol=1e-6)
    ranks = (logits > logits[:, answer:answer + 1]).sum(-1).numpy()
    assert np.array_equal(last.sel(quantity="rank").values, ranks)
    top = [vlm.tokenizer.decode([t]) for t in logits.argmax(-1).tolist()]
    assert lens.top("hidden", -1) == top
    # reading position P is the model's prediction after P: the answer's log-probability at the last prompt position
    assert last.sel(quantity="logprob").values[-1] == pytest.approx(vlm.score(ex).first_logprob, abs=1e-5)


def test_a_layers_input_reads_what_the_layer_before_left(image):
    """lm.input.L+1 is lm.hidden.L (the residual stream between two layers), read twice independently."""
    vlm = model("llava")
    ex = vlm.prepare(image, QUESTION, answer="yes")
    lens = logit_lens(vlm, ex, ["lm.input", "lm.hidden"])
    after0 = lens.data.sel(component="hidden", layer=0)
    before1 = lens.data.sel(component="input", layer=1)
    assert np.allclose(after0.values, before1.values, atol=1e-6)
    assert not np.allclose(lens.data.sel(component="input", layer=0).values, before1.values)


def test_groups_hits_saving_and_plots(image, tmp_path):
    vlm = model("llava")
    ex = vlm.prepare(image, QUESTION, answer="yes", region=(0, 0, 16, 16))
    lens = logit_lens(vlm, ex, ["lm.hidden"], tokens=["image", "last"], k=2)
    assert [int(p) for p in lens.data.coords["position"]] == ex.groups["lm"]["image"] + ex.groups["lm"]["last"]
    word = lens.top("hidden", 0)[0]
    hits = lens.hits([word.upper() + " "], top=1)
    expected = [[t.strip().lower() == word.strip().lower() for t in lens.top("hidden", layer)] for layer in (0, 1)]
    assert hits.values.tolist() == expected and hits.values[0, 0]
    loaded = Lens.load(lens.save(tmp_path / "lens.json"))
    assert loaded.data.equals(lens.data) and loaded.attrs["top_tokens"] == lens.attrs["top_tokens"]
    assert lens.plot(tmp_path / "lens.png").stat().st_size > 0
    for show in ("top", "prob"):
        assert lens.plot_image(ex, tmp_path / f"image-{show}.png", show=show).stat().st_size > 0


def test_sites_and_families_the_lens_cannot_read_say_why(image):
    vlm = model("llava")
    ex = vlm.prepare(image, QUESTION, answer="yes")
    with pytest.raises(LensError, match="not the residual"):
        logit_lens(vlm, ex, ["lm.attn"])
    with pytest.raises(LensError, match="no unembedding"):
        logit_lens(vlm, ex, ["vision.hidden"])
    blip = model("blip")
    bex = blip.prepare(image, QUESTION, answer="yes")
    for site in ("text.hidden", "lm.hidden"):
        with pytest.raises(LensError, match="no unembedding"):
            logit_lens(blip, bex, [site])
    qformer = model("blip2")
    with pytest.raises(LensError, match="no unembedding"):
        logit_lens(qformer, qformer.prepare(image, QUESTION, answer="yes"), ["qformer.hidden"])


def test_lens_command_writes_the_array_and_pictures(tmp_path, capsys):
    from vlm_interp.cli import main

    out = tmp_path / "lens"
    assert main(["lens", "--model", "tiny:llava", "--image", "shapes:3", "--question", "Is there a circle in the image?",
                 "--answer", "yes", "--sites", "hidden,input", "--k", "3", "--out", str(out)]) == 0
    lens = Lens.load(out / "lens.json")
    assert list(lens.data.coords["component"].values) == ["hidden", "input"] and lens.attrs["k"] == 3
    assert all((out / f).stat().st_size > 1000 for f in ("lens.png", "lens_image.png", "lens_image_prob.png"))
    assert "P('yes')" in capsys.readouterr().out
