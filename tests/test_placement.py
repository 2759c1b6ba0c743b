"""Loading real checkpoints: keyword routing, placement options, and models accelerate dispatched and offloaded
to disk, whose hooks, traces (fast path included), interventions and batched answers equal the undispatched model's."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import vlm_interp as vi
from vlm_interp import batching
from vlm_interp.corruptions import noise
from vlm_interp.errors import LoadError
from vlm_interp.interventions import modulate_heads, score_heads
from vlm_interp.tiny import tiny
from vlm_interp.tracing import trace
from vlm_interp.tracing.engine import FastPathWarning

QUESTION = "Is there a red circle ?"
# small enough that accelerate keeps the vision tower in memory and offloads the language model to disk
MAX_MEMORY = {"llava": 150_000, "instructblip": 120_000}


@pytest.fixture(scope="module", params=sorted(MAX_MEMORY))
def pair(request, tmp_path_factory):
    """(the tiny model in memory, the same checkpoint dispatched by accelerate with its LM offloaded to disk)."""
    folder = tmp_path_factory.mktemp(request.param)
    model, processor = tiny(request.param)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    plain = vi.load(str(folder))
    placed = vi.load(str(folder), device_map="auto", max_memory={"cpu": MAX_MEMORY[request.param]},
                     offload_folder=str(folder / "offload"))
    return plain, placed


def test_the_language_model_is_offloaded_to_disk_and_never_moved(pair):
    _, placed = pair
    layers = placed.adapter.adapter.towers["lm"].layers
    where = placed.model.hf_device_map
    on_disk = [m for m, d in where.items() if d == "disk"]
    assert any(layers.startswith(m + ".") or m.startswith(layers) for m in on_disk), where
    assert "cpu" in where.values()  # some modules stay in memory
    assert any(p.device.type == "meta" for p in placed.model.parameters())  # offloaded weights load per call
    assert placed.device == torch.device("cpu")


def test_dispatched_traces_equal_undispatched(pair, image):
    plain, placed = pair
    grids = {}
    for name, vlm in (("plain", plain), ("placed", placed)):
        ex = vlm.prepare(image, QUESTION, answer="yes")
        bad = noise(vlm, ex, scale="3sd", tokens="image", seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FastPathWarning)  # the fast path applies to the dispatched model too
            fast = trace(vlm, ex, bad, components=["lm.hidden", "lm.attn", "lm.mlp"], progress=False)
        general = trace(vlm, ex, bad, components=["lm.head"], tokens=["image", "last"], progress=False,
                        fast_path=False)
        vision = trace(vlm, ex, bad, components=["vision.hidden"], tokens="all", progress=False)
        grids[name] = [fast.data.values, general.data.values, vision.data.values]
    for a, b in zip(grids["plain"], grids["placed"]):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)


def test_dispatched_interventions_head_scores_and_batches_equal_undispatched(pair, image, other_image):
    plain, placed = pair
    out = {}
    for name, vlm in (("plain", plain), ("placed", placed)):
        ex = vlm.prepare(image, QUESTION, answer="yes")
        with modulate_heads(vlm, {"lm.head.0.1": 0.0, "lm.head.1.2": 2.0}):
            text = vlm.generate(ex, max_new_tokens=5)
            logits = vlm.first_token_logits(ex)
        heads = score_heads(vlm, [ex], progress=False).data.values
        batch = batching.collate(vlm, [ex, vlm.prepare(other_image, "Is there a star ?")])
        out[name] = (text, logits, heads, batching.first_token_logits(vlm, batch))
    assert out["placed"][0] == out["plain"][0]
    for k in (1, 3):
        torch.testing.assert_close(out["placed"][k], out["plain"][k], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out["placed"][2], out["plain"][2], atol=1e-5, rtol=0)


def test_each_keyword_goes_only_where_it_is_taken(pair, tmp_path):
    plain, _ = pair
    folder = tmp_path / "ckpt"
    plain.model.save_pretrained(folder)
    plain.processor.save_pretrained(folder)
    vlm = vi.load(str(folder), local_files_only=True, use_fast=True, attn_implementation="eager")
    assert not hasattr(vlm.model.config, "use_fast")  # a processor keyword is not written into the config
    assert vlm.model.config.get_text_config()._attn_implementation == "eager"
    with pytest.raises(LoadError, match="does not know where the keyword"):
        vi.load(str(folder), colour="blue")


@pytest.mark.parametrize("options, message", [
    ({"device": "cpu", "device_map": "auto"}, "both place the model"),
    ({"max_memory": {"cpu": 1000}}, "pass device_map='auto'"),
    ({"offload_folder": "x"}, "pass device_map='auto'"),
    ({"dtype": "float8"}, "unknown dtype"),
])
def test_placement_options_that_contradict_each_other_are_errors(pair, tmp_path, options, message):
    plain, _ = pair
    plain.model.save_pretrained(tmp_path)
    plain.processor.save_pretrained(tmp_path)
    with pytest.raises(LoadError, match=message):
        vi.load(str(tmp_path), **options)


def test_bitsandbytes_without_its_package_or_a_gpu_is_a_clear_error(pair, tmp_path):
    import importlib.util

    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") and torch.cuda.is_available():
        pytest.skip("this machine can run bitsandbytes")
    plain, _ = pair
    plain.model.save_pretrained(tmp_path)
    plain.processor.save_pretrained(tmp_path)
    with pytest.raises(LoadError, match="bitsandbytes quantization needs"):
        vi.load(str(tmp_path), quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    with pytest.raises(LoadError, match="bitsandbytes quantization needs"):
        vi.load(str(tmp_path), quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True})


def test_tiny_models_take_dtype_but_not_device_maps():
    assert vi.load("tiny:blip", dtype="bf16").dtype == torch.bfloat16
    with pytest.raises(LoadError, match="built in memory"):
        vi.load("tiny:llava", device_map="auto")
