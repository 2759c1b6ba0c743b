"""Attention knockout through vlm-interp's attention dispatcher, checked against hand-built masks and hand edits."""

from __future__ import annotations

import pytest
import torch

import vlm_interp as vi
from vlm_interp import compat
from vlm_interp.errors import HookNeverFiredError
from vlm_interp.hooks import Hook
from vlm_interp.sites import Site
from vlm_interp.tiny import FAMILIES, tiny
from vlm_interp.tracing.knockout import (Cut, EdgeKnockout, Knockout, KnockoutError, knocked_out, knockout,
                                         make_cut, run_cuts)
from vlm_interp.tracing.metrics import make_metric

from conftest import QUESTION

# every family whose answer tower is a decoder LM computing attention through transformers' AttentionInterface
CAUSAL = tuple(f for f in FAMILIES if f != "blip")
_MODELS: dict[str, vi.VLM] = {}


def model(family: str) -> vi.VLM:
    if family not in _MODELS:
        _MODELS[family] = vi.wrap(*tiny(family, seed=0))
    return _MODELS[family]


def example(family: str, image):
    return model(family).prepare(image, QUESTION, answer="yes", region=(0, 0, 16, 16))


def logits(vlm, inputs) -> torch.Tensor:
    with torch.no_grad():
        return vlm.logits(inputs)


def mask_inputs(vlm, inputs: dict, allowed: torch.Tensor) -> dict:
    """Inputs with a hand-built 4-D boolean mask (query x key). Models that derive positions from the 2-D mask (Qwen's
    M-RoPE) also get the position ids of their plain run, read with a plain torch pre-hook (call this outside hooks)."""
    seen: dict = {}
    if "mm_token_type_ids" in inputs:
        lm = vlm.model.get_submodule(vlm.adapter.adapter.towers["lm"].layers.rsplit(".", 1)[0])
        handle = lm.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
        try:
            with torch.no_grad():
                vlm.model(**inputs)
        finally:
            handle.remove()
    extra = {"position_ids": seen["position_ids"]} if seen else {}
    return {**inputs, "attention_mask": allowed[None, None], **extra}

def implementations(vlm) -> list:
    return [compat.attn_implementation(m.config) for m in vlm.model.modules() if hasattr(m, "config")
            and isinstance(m, torch.nn.Module) and hasattr(m.config, "_attn_implementation")]


@pytest.mark.parametrize("family", CAUSAL)
def test_knocking_out_nothing_is_the_plain_forward_bit_for_bit(family, image):
    """Same sdpa kernel, the mask materialised from the model's own mask function: identical logits."""
    vlm, ex = model(family), example(family, image)
    plain, before = logits(vlm, ex.inputs), implementations(vlm)
    layers = frozenset(vlm.adapter.layers_with("lm", "attn"))
    edit = EdgeKnockout(vlm, [Cut(layers, (), ())])
    with compat.attention_edits(vlm.model, [edit]):
        cut = logits(vlm, ex.inputs)
    assert torch.equal(plain, cut)
    assert implementations(vlm) == before  # restored afterwards (sdpa; eager for Gemma 2, which has no sdpa)


@pytest.mark.parametrize("family", ["llava", "instructblip", "qwen2_5_vl"])
def test_image_to_all_at_every_layer_equals_a_hand_built_4d_mask(family, image):
    vlm, ex = model(family), example(family, image)
    n = ex.inputs["input_ids"].shape[1]
    allowed = torch.ones(n, n).tril().bool()
    allowed[:, ex.groups["lm"]["image"]] = False
    hand_hidden, masked = vlm.hook(Site("lm", "hidden", 0), capture=True), mask_inputs(vlm, ex.inputs, allowed)
    with torch.no_grad(), vlm.attach([hand_hidden]):
        hand = vlm.model(**masked).logits
    ours_hidden = vlm.hook(Site("lm", "hidden", 0), capture=True)  # composes with the hook engine
    with vlm.attach([ours_hidden]), knocked_out(vlm, ex, "image", list(range(n))):
        ours = logits(vlm, ex.inputs)
    assert torch.allclose(hand, ours, atol=1e-6, rtol=0)
    assert torch.allclose(hand_hidden.value, ours_hidden.value, atol=1e-6, rtol=0)
    assert not torch.allclose(ours, logits(vlm, ex.inputs), atol=1e-4)  # the cut changes the answer logits


@pytest.mark.parametrize("family", ["blip2", "instructblip"])
def test_qformer_cross_attention_knockout_equals_a_hand_built_encoder_mask(family, image):
    """Q-Former queries cut off from the object's patches = the Q-Former run with a 4-D encoder mask hiding them."""
    vlm, ex = model(family), example(family, image)
    seen: dict = {}
    call = Hook("qformer", fn=lambda args, kwargs: seen.update(args=args, kwargs=kwargs), kind="call")
    out = Hook("qformer", capture=True)
    with vlm.attach([call, out]), knocked_out(vlm, ex, "object", "image", tower="qformer", component="xattn"):
        logits(vlm, ex.inputs)
    kwargs = dict(seen["kwargs"])
    queries, keys = kwargs["query_embeds"].shape[1], kwargs["encoder_hidden_states"].shape[1]
    mask = torch.ones(1, 1, queries, keys, dtype=torch.bool)
    mask[..., ex.groups["vision"]["object"]] = False
    with torch.no_grad():
        hand = vlm.model.qformer(*seen["args"], **{**kwargs, "encoder_attention_mask": mask})[0]
    assert torch.allclose(hand[:, :queries], out.value[:, :queries], atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["llava", "instructblip", "qwen2_5_vl"])
def test_one_head_knockout_equals_the_same_edit_by_hand(family, image):
    """Cut image->last for one head of the last layer; by hand: that head's output from a run with the edge cut for
    every head (earlier layers restored from the plain run), written into the plain run."""
    vlm, ex = model(family), example(family, image)
    last, head = vlm.adapter.n_layers["lm"] - 1, 1
    n = ex.inputs["input_ids"].shape[1]
    plain_prev = vlm.hook(Site("lm", "hidden", last - 1), capture=True)
    with vlm.attach([plain_prev]):
        plain = logits(vlm, ex.inputs)
    allowed = torch.ones(n, n).tril().bool()
    allowed[ex.groups["lm"]["last"][0], ex.groups["lm"]["image"]] = False
    restore = vlm.hook(Site("lm", "hidden", last - 1), lambda t: plain_prev.value)
    cut_head, masked = vlm.hook(Site("lm", "head", last, head), capture=True), mask_inputs(vlm, ex.inputs, allowed)
    with torch.no_grad(), vlm.attach([restore, cut_head]):
        vlm.model(**masked)
    write = vlm.hook(Site("lm", "head", last, head), lambda t: cut_head.value)
    with vlm.attach([write]):
        hand = logits(vlm, ex.inputs)
    with knocked_out(vlm, ex, "image", "last", layers=[last], heads=[head]):
        ours = logits(vlm, ex.inputs)
    assert torch.allclose(hand, ours, atol=1e-6, rtol=0)
    assert not torch.allclose(ours, plain, atol=1e-5)


def test_knockout_during_cached_generation_equals_whole_sequence_forwards(image):
    """With a key/value cache each step's single query sits at the end of the keys: the second step's scores equal a
    whole-sequence forward of prompt plus first token under the same cut."""
    vlm, ex = model("llava"), example("llava", image)
    everything = list(range(4 * ex.inputs["input_ids"].shape[1]))
    with knocked_out(vlm, ex, "image", everything, heads=[1]), torch.no_grad():
        out = vlm.model.generate(**ex.inputs, max_new_tokens=2, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
    ids = out.sequences[:, :ex.inputs["input_ids"].shape[1] + 1]
    with knocked_out(vlm, ex, "image", everything, heads=[1]):
        whole = logits(vlm, {**ex.inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert torch.allclose(out.scores[1][0], whole[0, -1], atol=1e-5, rtol=0)
    assert not torch.allclose(out.scores[1][0], logits(vlm, {**ex.inputs, "input_ids": ids,
                                                           "attention_mask": torch.ones_like(ids)})[0, -1], atol=1e-4)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_batched_rows_equal_one_at_a_time(family, image):
    vlm, ex = model(family), example(family, image)
    metric = make_metric(vlm, ex)
    cuts = [make_cut(vlm, ex, s, t, layers, heads)[1] for s, t, layers, heads in [
        ("image", "last", [0], None), ("object", "last", [1], [2]), ("image", "question", [0, 1], None),
        ("question", "last", None, [0, 3]), ("image", "image", [1], None)]]
    together = run_cuts(vlm, ex, cuts, metric, batch_size=5, progress=False)
    alone = run_cuts(vlm, ex, cuts, metric, batch_size=1, progress=False)
    assert torch.allclose(together, alone, atol=1e-6, rtol=0)
    assert len(set(together.tolist())) > 2


def test_sweep_is_labelled_saved_and_plotted(image, tmp_path):
    vlm, ex = model("llava"), example("llava", image)
    result = knockout(vlm, ex, window=2, progress=False)
    assert result.data.dims == ("layer", "edge")
    assert list(result.data.coords["edge"].values) == ["image->question", "image->last", "question->last",
                                                       "object->last"]
    metric = make_metric(vlm, ex)
    _, cut = make_cut(vlm, ex, "object", "last", layers=[0, 1])  # window 2 around layer 1 covers layers 0-1
    expected = run_cuts(vlm, ex, [cut], metric, progress=False)[0]
    assert result.data.sel(layer=1, edge="object->last").item() == pytest.approx(expected.item(), abs=1e-6)
    assert result.effect().sel(layer=1, edge="object->last").item() == pytest.approx(
        expected.item() - result.attrs["clean_score"], abs=1e-6)
    heads = knockout(vlm, ex, edges=[("image", "last")], heads="each", progress=False)
    assert heads.data.dims == ("layer", "edge", "head") and heads.data.sizes["head"] == 4
    for suffix in (".json", ".nc"):
        loaded = Knockout.load(result.save(tmp_path / f"k{suffix}"))
        assert loaded.data.equals(result.data) and loaded.attrs["clean_score"] == result.attrs["clean_score"]
    summary = Knockout.mean([result, result])
    assert float(summary["sem"].max()) == 0.0
    assert result.plot(tmp_path / "k.png").stat().st_size > 0


def test_edits_stack_and_the_implementation_comes_back_after_an_error(image):
    vlm, ex = model("llava"), example("llava", image)
    with knocked_out(vlm, ex, "image", "last"), knocked_out(vlm, ex, "question", "last"):
        nested = logits(vlm, ex.inputs)
    both = [make_cut(vlm, ex, s, "last")[1] for s in ("image", "question")]
    edit = EdgeKnockout(vlm, [Cut(both[0].layers, both[0].sources + both[1].sources, both[0].targets)])
    with compat.attention_edits(vlm.model, [edit]):
        union = logits(vlm, ex.inputs)
    assert torch.equal(nested, union)
    with pytest.raises(RuntimeError, match="inside"):
        with knocked_out(vlm, ex, "image", "last"):
            raise RuntimeError("inside")
    assert set(implementations(vlm)) == {"sdpa"}


def test_an_edit_that_never_runs_is_an_error(image):
    vlm, ex = model("llava"), example("llava", image)
    with pytest.raises(HookNeverFiredError, match="never ran"):
        with knocked_out(vlm, ex, "image", "last"):
            pass


def test_families_and_sites_where_knockout_cannot_apply_say_why(image):
    blip = model("blip")
    ex = blip.prepare(image, QUESTION, answer="yes")
    with pytest.raises(KnockoutError, match="never attends to image"):
        knockout(blip, ex, progress=False)
    with pytest.raises(KnockoutError, match="AttentionInterface"):
        knockout(blip, ex, edges=[("image", "question")], tower="text", component="xattn", progress=False)
    llava, lex = model("llava"), example("llava", image)
    with pytest.raises(KnockoutError, match="no attention component 'xattn'"):
        knockout(llava, lex, tower="lm", component="xattn", progress=False)
    with pytest.raises(KnockoutError, match="empty|no token group"):
        knockout(llava, llava.prepare(image, QUESTION, answer="yes"), edges=[("object", "image")], progress=False)


def test_knockout_command_writes_the_array_and_plot(tmp_path, capsys):
    from vlm_interp.cli import main

    out = tmp_path / "knockout"
    assert main(["knockout", "--model", "tiny:llava", "--image", "shapes:3", "--question",
                 "Is there a circle in the image?", "--answer", "yes", "--edges", "image->last,object->last",
                 "--heads", "0,1", "--out", str(out)]) == 0
    result = Knockout.load(out / "knockout.json")
    assert list(result.data.coords["edge"].values) == ["image->last", "object->last"]
    assert result.attrs["heads"] == [0, 1] and (out / "knockout.png").stat().st_size > 1000
    assert "image->last: L0" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["knockout", "--image", "shapes:3", "--question", "q", "--edges", "image,last"])
