"""Corruptions: seeded noise at exact positions, minimal pairs, region edits, pair checks, STR, specs."""

from __future__ import annotations

import json
import string
import sys
import warnings
from functools import lru_cache

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import vlm_interp as vi
from vlm_interp import corruptions as C
from vlm_interp.corruptions import CorruptionError, NotMinimalPairWarning
from vlm_interp.errors import HookNeverFiredError
from vlm_interp.hooks import AttachedHooks, Hook
from vlm_interp.tiny import tiny
from vlm_interp.zoo.scene_pairs import PAIR_LEVELS, NoMinimalPairError, minimal_pair
from vlm_interp.zoo.shapes import COLORS, SHAPES, World

QUESTION = "Is there a red circle ?"
BOX = (8, 8, 16, 16)  # exactly vision patch (1, 1) of the tiny models' 4x4 grid of 8-pixel patches
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@lru_cache(maxsize=None)
def tiny_vlm(family: str) -> vi.VLM:
    return vi.wrap(*tiny(family, seed=0))


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def other_image() -> Image.Image:
    return Image.fromarray((np.random.default_rng(1).random((32, 32, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def organism() -> vi.VLM:
    """Untrained shapes-llava organism with the project's BPE (" left" etc. are multi-token)."""
    from vlm_interp.zoo.organisms import RECIPES, build, build_tokenizer

    recipe = RECIPES["shapes-llava"]
    return vi.wrap(*build(recipe, build_tokenizer(recipe)))


def _capture(vlm, ex, module, kind="output"):
    """The tensor at ``module`` when ``ex`` runs with its edits (the capture hook runs after them)."""
    grab = Hook(module, kind=kind, capture=True)
    with C.applied(vlm, ex), AttachedHooks(vlm.model, [grab]), torch.no_grad():
        vlm.logits(ex.inputs)
    return grab.value


def _observe(vlm):
    """Where to look at embeddings noise: the LM input (LM positions), or BLIP's vision output."""
    if vlm.family == "blip":
        return "vision_model", "output", "vision"
    return vlm.adapter.adapter.towers["lm"].layers + ".0", "input", "lm"


def _changed(a: torch.Tensor, b: torch.Tensor) -> list[int]:
    return (a != b).any(dim=-1).any(dim=0).nonzero().flatten().tolist()


# ----------------------------------------------------------------------------------- noise


@pytest.mark.parametrize("family", ["llava", "llava_next", "blip2", "instructblip", "blip"])
@pytest.mark.parametrize("which", ["image", "subset"])
def test_embedding_noise_touches_exactly_the_chosen_positions_and_is_seeded(family, which, image):
    vlm = tiny_vlm(family)
    ex = vlm.prepare(image, QUESTION, answer="yes", region=BOX)
    module, kind, tower = _observe(vlm)
    if which == "image":
        tokens, expected = "image", ex.groups[tower]["image"]
    elif family in ("llava", "llava_next"):
        tokens = expected = ex.groups["lm"]["object"]
        tokens = "object"
    else:
        tokens = expected = ex.groups[tower]["image"][1:3] if tower == "lm" else [0, 3, 7]
    bad = C.noise(vlm, ex, scale=0.5, tokens=tokens, seed=3)
    assert ex.edits == [] and len(bad.edits) == 1  # the clean example is untouched
    clean, noisy = _capture(vlm, ex, module, kind), _capture(vlm, bad, module, kind)
    assert _changed(clean, noisy) == sorted(expected)
    again = C.noise(vlm, ex, scale=0.5, tokens=tokens, seed=3)
    assert torch.equal(again.edits[0].noise, bad.edits[0].noise)
    assert torch.equal(_capture(vlm, again, module, kind), noisy)
    other = C.noise(vlm, ex, scale=0.5, tokens=tokens, seed=4)
    assert not torch.equal(other.edits[0].noise, bad.edits[0].noise)
    samples = C.noise_samples(vlm, ex, n=2, seed=3, scale=0.5, tokens=tokens)
    assert torch.equal(samples[0].edits[0].noise, bad.edits[0].noise)
    assert torch.equal(samples[1].edits[0].noise, other.edits[0].noise)


@pytest.mark.parametrize("family", ["llava", "blip2", "blip"])
def test_patch_and_pixel_noise_touch_exactly_the_chosen_patches(family, image):
    vlm = tiny_vlm(family)
    ex = vlm.prepare(image, QUESTION, region=BOX)
    module = {"llava": "model.vision_tower.embeddings", "blip2": "vision_model.embeddings",
              "blip": "vision_model.embeddings"}[family]  # independent of the adapter's table
    assert vlm.adapter.adapter.noise_places["patches"].module == module
    bad = C.noise(vlm, ex, scale=1.0, tokens="object", place="patches", seed=0)
    assert _changed(_capture(vlm, ex, module), _capture(vlm, bad, module)) == ex.groups["vision"]["object"] == [6]
    bad = C.noise(vlm, ex, scale=1.0, tokens=[1, 16], place="pixels", seed=0)
    assert bad.edits == []
    diff = (bad.inputs["pixel_values"] != ex.inputs["pixel_values"]).any(dim=1)[0]
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[0:8, 0:8] = expected[24:32, 24:32] = True  # vision positions 1 and 16 = first and last patch
    assert torch.equal(diff, expected)
    with pytest.raises(CorruptionError, match="CLS"):
        C.noise(vlm, ex, scale=1.0, tokens=[0], place="pixels")


def test_noise_on_tiled_llava_next_and_object_limits(image):
    vlm = tiny_vlm("llava_next")
    ex = vlm.prepare(image, QUESTION, region=BOX)
    bad = C.noise(vlm, ex, scale=1.0, place="patches")
    tiles = ex.inputs["pixel_values"].shape[1]
    assert bad.edits[0].noise.shape[0] == tiles > 1
    grab = _capture(vlm, bad, "model.vision_tower.embeddings")
    assert _changed(_capture(vlm, ex, "model.vision_tower.embeddings"), grab) == list(range(1, 17))
    for place in ("patches", "pixels"):
        with pytest.raises(CorruptionError, match="place='embeddings'"):
            C.noise(vlm, ex, scale=1.0, tokens="object", place=place)
    with pytest.raises(CorruptionError, match="Q-Former queries"):
        C.noise(tiny_vlm("blip2"), tiny_vlm("blip2").prepare(image, QUESTION, region=BOX), tokens="object")
    with pytest.raises(CorruptionError, match="not image tokens"):
        C.noise(vlm, ex, scale=1.0, tokens=ex.groups["lm"]["question"])


@pytest.mark.parametrize("family", ["llava", "blip2", "blip"])
def test_3sd_is_three_times_an_independent_std(family, image, other_image):
    vlm = tiny_vlm(family)
    exs = [vlm.prepare(im, QUESTION) for im in (image, other_image)]
    pixels = torch.cat([e.inputs["pixel_values"] for e in exs])
    m = vlm.model
    with torch.no_grad():
        if family == "llava":
            feats = torch.cat(list(m.model.get_image_features(pixel_values=pixels).pooler_output))
        elif family == "blip2":
            feats = m.get_image_features(pixel_values=pixels).pooler_output
        else:
            feats = m.vision_model(pixel_values=pixels).last_hidden_state[:, 1:]
    independent = float(np.std(feats.numpy().astype(np.float64), ddof=1))
    std = C.embedding_std(vlm, exs, "embeddings")
    assert std == pytest.approx(independent, rel=1e-5)
    bad = C.noise(vlm, exs[0], scale="3sd", std_examples=exs, seed=7)
    edit = bad.edits[0]
    expected = torch.randn(edit.noise.shape, generator=torch.Generator().manual_seed(7)) * (3 * std)
    assert torch.allclose(edit.noise, expected)
    assert bad.meta["corruption"]["scale"] == pytest.approx(3 * std)

    def boom(*a, **k):
        raise AssertionError("embedding_std re-ran the model instead of using its cache")

    vlm.logits = boom  # an instance attribute shadows the method; removed below
    try:
        assert C.embedding_std(vlm, exs, "embeddings") == std
    finally:
        del vlm.logits
    pix = float(np.std(pixels[:1].numpy().astype(np.float64), ddof=1))
    assert C.embedding_std(vlm, exs[:1], "pixels") == pytest.approx(pix, rel=1e-5)


def test_scale_parsing_errors():
    assert C.parse_scale("3sd") == (3.0, True) and C.parse_scale(0.25) == (0.25, False)
    assert C.parse_scale("0.5") == (0.5, False)
    for bad in ("three", "-1sd", 0, "0sd", float("nan"), True, None):
        with pytest.raises(CorruptionError):
            C.parse_scale(bad)


@pytest.mark.parametrize("family", ["llava", "llava_next", "blip2"])
def test_noise_batches_by_broadcast_and_by_stacking(family, image):
    vlm = tiny_vlm(family)
    ex = vlm.prepare(image, QUESTION, answer="yes")
    bad1, bad2 = C.noise_samples(vlm, ex, n=2, scale=1.0)
    single = [C.run(vlm, e)[0] for e in (ex, bad1, bad2)]
    batch = C.run(vlm, C.stack([ex, bad1, bad2]))
    for row, alone in zip(batch, single):
        assert torch.allclose(row, alone, atol=1e-5)
    twice = {k: torch.cat([v, v]) for k, v in bad1.inputs.items()}
    rows = C.run(vlm, bad1, inputs=twice)  # one corruption broadcast over a batch of two
    assert torch.allclose(rows[0], single[1], atol=1e-5) and torch.allclose(rows[1], single[1], atol=1e-5)
    with C.applied(vlm, bad1):
        assert isinstance(vlm.generate(bad1, max_new_tokens=2), str)  # cached decode steps pass through
        assert torch.equal(C.run(vlm, bad1)[0], single[1])  # nested: the noise is added once, not twice
    assert C.score(vlm, bad1).logprob != pytest.approx(vlm.score(ex).logprob, abs=1e-7)


def test_edits_never_silently_do_nothing(image):
    vlm = tiny_vlm("llava")
    bad = C.noise(vlm, vlm.prepare(image, QUESTION), scale=1.0)
    with pytest.raises(HookNeverFiredError, match="noise"):
        with C.applied(vlm, bad), torch.no_grad():
            vlm.model.model.language_model(input_ids=bad.inputs["input_ids"][:, -3:])  # the projector never runs
    with pytest.raises(CorruptionError, match="rows"):
        C.run(vlm, C.stack([bad, bad]), inputs={k: torch.cat([v] * 3) for k, v in bad.inputs.items()})


# --------------------------------------------------------------------------- minimal pairs


def _pairs(world: World, level: str, n: int = 1):
    out = []
    for seed in range(200):  # some scenes cannot support an edit (NoMinimalPairError); take the next seed
        scene = world.scene(seed)
        try:
            out.append(minimal_pair(world, scene, level, seed))
        except NoMinimalPairError:
            continue
        if len(out) == n:
            return out
    raise AssertionError(f"no {level} pair in 200 scenes")


@pytest.mark.parametrize("which", ["tiny", "organism"])
def test_shapes_pairs_give_examples_with_identical_layouts(which, request):
    vlm = tiny_vlm("llava") if which == "tiny" else request.getfixturevalue("organism")
    world = World()
    for level in PAIR_LEVELS:
        pair = _pairs(world, level)[0]
        for qi, q in enumerate(pair.questions[:2]):
            clean, corrupt = C.from_shapes_pair(vlm, pair, question_index=qi)
            assert torch.equal(clean.inputs["input_ids"], corrupt.inputs["input_ids"])
            assert clean.groups == corrupt.groups and clean.groups["lm"]["object"]
            assert not torch.equal(clean.inputs["pixel_values"], corrupt.inputs["pixel_values"])
            assert (clean.answer, corrupt.answer) == (q.clean_answer, q.corrupt_answer)
            with warnings.catch_warnings():
                warnings.simplefilter("error", NotMinimalPairWarning)
                report = C.check_pair(clean, corrupt)
            assert report.outside_pixels == 0 and report.minimal
            assert 0 < report.pixel_fraction <= pair.mask.mean()
            assert set(report.patches_changed) <= set(clean.groups["vision"]["object"])
    with pytest.raises(CorruptionError, match="out of range"):
        C.from_shapes_pair(vlm, pair, question_index=9)


def test_pair_checks_warn_when_the_change_spills_or_is_empty(image):
    arr = np.asarray(image).copy()
    moved = arr.copy()
    moved[10:12, 10:12] = 0
    moved[30, 30] = 255 - moved[30, 30]
    with pytest.warns(NotMinimalPairWarning, match=r"1 changed pixels .* outside the mask dilated by 2 px"):
        report = C.check_pair(arr, moved, (8, 8, 16, 16), grid=(4, 4))
    assert report.pixels_changed == 5 and report.patches_changed == [5, 15] and report.patch_fraction == 2 / 16
    with pytest.warns(NotMinimalPairWarning):
        assert C.check_pair(arr, moved, (8, 8, 16, 16), vlm=tiny_vlm("llava")).patches_changed == [5, 15]
    assert C.check_pair(arr, moved, (8, 8, 16, 16), dilate_px=15, warn=False).minimal  # (30, 30) is within 15 px
    with pytest.warns(NotMinimalPairWarning, match="identical"):
        assert not C.check_pair(arr, arr.copy()).minimal
    with pytest.raises(CorruptionError, match="same size"):
        C.check_pair(arr, arr[:16])


def _write_png(path, array):
    Image.fromarray(array).save(path)
    return path.name


def test_jsonl_pairs_read_load_and_name_file_and_line(tmp_path, image, other_image):
    vlm = tiny_vlm("instructblip")
    a = _write_png(tmp_path / "a.png", np.asarray(image))
    edited = np.asarray(image).copy()
    edited[8:16, 8:16] = 0
    b = _write_png(tmp_path / "b.png", edited)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:16, 8:16] = 255
    m = _write_png(tmp_path / "m.png", mask)
    good = [{"clean_image": a, "corrupt_image": b, "question": QUESTION, "clean_answer": "yes",
             "corrupt_answer": "no", "mask": m},
            {"clean_image": a, "corrupt_image": b, "question": QUESTION, "box": [8, 8, 16, 16]}]
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(good[0]) + "\n\n" + json.dumps(good[1]) + "\n")
    records = C.read_pairs(path)
    assert [r.line for r in records] == [1, 3]
    for clean, corrupt in C.pairs_from_file(vlm, path):
        C.check_layout(clean, corrupt, same_ids=True)
        assert clean.groups["vision"]["object"] == [6] and clean.meta["mask"].sum() == 64
        assert C.check_pair(clean, corrupt).outside_pixels == 0
    assert C.load_pair(vlm, records[0])[1].answer == "no"
    bad_lines = {
        "{not json": "not valid JSON",
        json.dumps({**good[0], "corrupt_image": "nope.png"}): "nope.png",
        json.dumps({k: v for k, v in good[0].items() if k != "question"}): "question",
        json.dumps({**good[1], "box": [8, 8, 4, 16]}): "x1 > x0",
        json.dumps({**good[0], "colour": 1}): "unknown key",
        "[1, 2]": "JSON object",
    }
    for text, message in bad_lines.items():
        path.write_text(json.dumps(good[1]) + "\n" + text + "\n")
        with pytest.raises(CorruptionError, match=message) as err:
            C.read_pairs(path)
        assert f"{path}:2" in str(err.value)
    with pytest.raises(CorruptionError, match="not found"):
        C.read_pairs(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------------------- region edits


@pytest.mark.parametrize("fill", ["blur", "mean", "patch"])
def test_classical_fills_edit_only_the_region_and_keep_the_layout(fill, image):
    vlm = tiny_vlm("llava")
    ex = vlm.prepare(image, QUESTION, answer="yes", region=BOX)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotMinimalPairWarning)
        bad = C.region_edit(vlm, ex, fill=fill, seed=1)  # region: the example's object patches
    before, after = np.asarray(ex.image), np.asarray(bad.image)
    region = np.zeros((32, 32), bool)
    region[8:16, 8:16] = True
    assert np.array_equal(before[~region], after[~region]) and not np.array_equal(before, after)
    C.check_layout(ex, bad, same_ids=True)
    assert bad.meta["corruption"]["fill"] == fill
    assert np.array_equal(np.asarray(C.region_edit(vlm, ex, fill=fill, seed=1).image), after)  # deterministic
    with pytest.raises(CorruptionError, match="no region"):
        C.region_edit(vlm, vlm.prepare(image, QUESTION), fill=fill)


@pytest.fixture(scope="module")
def inpainter(tmp_path_factory):
    """A tiny random StableDiffusionInpaintPipeline built offline (character-level CLIP tokenizer)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tok")
    chars = list(string.ascii_lowercase)
    vocab = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                                        vocab_size=len(vocab), max_position_embeddings=16, bos_token_id=0,
                                        eos_token_id=1, pad_token_id=1, projection_dim=32))
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=9,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=(2, 4), norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=8)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionInpaintPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_diffusers_inpainting_changes_only_the_dilated_region(inpainter, image):
    vlm = tiny_vlm("llava")
    ex = vlm.prepare(image, QUESTION, answer="yes")
    box = (8, 4, 20, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotMinimalPairWarning)
        bad = C.region_edit(vlm, ex, box, fill="inpaint", pipeline=inpainter, prompt="a blue star", steps=2,
                            dilate_px=2, seed=5)
    region = np.zeros((32, 32), bool)
    region[4:16, 8:20] = True
    grown = C.dilate(region, 2)
    before, after = np.asarray(ex.image), np.asarray(bad.image)
    assert np.array_equal(before[~grown], after[~grown])
    assert (before[region] != after[region]).any()
    C.check_layout(ex, bad, same_ids=True)
    assert np.array_equal(bad.meta["mask"], region)
    again = C.inpaint(ex.image, box, inpainter, "a blue star", steps=2, dilate_px=2, seed=5)
    assert np.array_equal(np.asarray(again), after)  # seeded
    with pytest.raises(CorruptionError, match="pipeline="):
        C.region_edit(vlm, ex, box, fill="inpaint")


def test_missing_optional_dependencies_give_install_hints(monkeypatch, image):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(ImportError, match=r"vlm-interp\[edit\]"):
        C.load_inpainting("some/model")
    with pytest.raises(ImportError, match=r"vlm-interp\[clip\]"):
        C.clip_region_score(object(), image, image, BOX, "circle", "square")


def test_clip_region_score_from_an_object_and_a_local_folder(tmp_path, image):
    import open_clip
    from open_clip.model import CLIP

    cfg = {"embed_dim": 16, "vision_cfg": {"layers": 1, "width": 32, "patch_size": 8, "image_size": 32,
                                          "head_width": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    model = CLIP(**cfg).eval()
    edited = np.asarray(image).copy()
    edited[8:16, 8:16] = [50, 90, 235]
    score = C.clip_region_score(model, image, edited, BOX, "circle", "square")
    pre = open_clip.image_transform(32, is_train=False)
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(pre(Image.fromarray(edited).crop((8, 8, 16, 16)))[None]),
                                            dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(tok(["a photo of a circle", "a photo of a square"])),
                                            dim=-1)
    manual = (img @ txt.T)[0]
    assert [score.corrupt_old, score.corrupt_new] == pytest.approx(manual.tolist(), abs=1e-5)
    assert score.matches_new == bool(manual[1] > manual[0]) and -2 <= score.shift <= 2
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    torch.save(model.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    again = C.clip_region_score(str(tmp_path), image, edited, BOX, "circle", "square")
    assert again.corrupt_new == pytest.approx(score.corrupt_new, abs=1e-5)


# ------------------------------------------------------------------------------------ STR


def test_str_on_a_bpe_tokenizer_rejects_length_changes_and_accepts_matches(organism):
    scene = World().scene(0)
    ex = organism.prepare(scene.pil(), "Is the circle left of the square?", answer="yes", region=scene.objects[0].mask)
    with pytest.raises(CorruptionError, match=r"'left' is 4 tokens .* 'right' is 5 tokens") as err:
        C.replace_tokens(organism, ex, {"left": "right"})
    assert "shift" in str(err.value)
    for replacements, n_changed in (({"left of": "above"}, 5), ({"circle": "square"}, 1),
                                    ([("circle", "star"), ("square", "cross")], 2)):
        bad = C.replace_tokens(organism, ex, replacements)
        a, b = ex.inputs["input_ids"][0], bad.inputs["input_ids"][0]
        changed = (a != b).nonzero().flatten().tolist()
        assert a.shape == b.shape and len(changed) == n_changed
        assert set(changed) <= set(ex.groups["lm"]["question"]) and bad.groups == ex.groups
        assert bad.meta["corruption"]["positions"]["lm"] == changed and bad.answer == "yes"
        assert torch.equal(bad.inputs["pixel_values"], ex.inputs["pixel_values"])
    for replacements, message in (({"star": "cross"}, "does not occur"), ({"circle": "<image>"}, "image placeholder"),
                                  ({"circle": "circle"}, "changes nothing"), ({"circle": " star"}, "spaces"),
                                  ({}, "no replacements")):
        with pytest.raises(CorruptionError, match=message):
            C.replace_tokens(organism, ex, replacements)
    tok = organism.tokenizer
    assert C.str_candidates(organism, "above", ["right", "below", "left"]) == ["right"]
    assert C.str_candidates(organism, "left", ["right", "above", "below"]) == []
    same = [s for s in SHAPES if s != "circle" and len(tok.tokenize(" " + s)) == len(tok.tokenize(" circle"))]
    assert C.str_candidates(organism, "circle", SHAPES, context=ex) == same
    with pytest.raises(CorruptionError, match="one string"):
        C.str_candidates(organism, "circle", "square")


@pytest.mark.parametrize("family", ["llava", "blip", "blip2", "instructblip"])
def test_str_keeps_every_token_stream_aligned(family, image):
    vlm = tiny_vlm(family)
    ex = vlm.prepare(image, QUESTION, answer="yes")
    bad = C.replace_tokens(vlm, ex, {"red": "blue"})
    positions = bad.meta["corruption"]["positions"]
    for key in ("input_ids", "qformer_input_ids"):
        if key in ex.inputs:
            assert (ex.inputs[key] != bad.inputs[key]).sum() == 1
    if family == "instructblip":
        assert positions["qformer"] and positions["lm"]
    C.check_layout(ex, bad)  # same layout, different ids: fine for tracing and batching
    with pytest.raises(CorruptionError, match="input_ids differs"):
        C.check_layout(ex, bad, same_ids=True)  # what image pairs must also keep
    batch = C.run(vlm, C.stack([ex, bad]))
    assert torch.allclose(batch[1], C.run(vlm, bad)[0], atol=1e-5)
    assert torch.allclose(batch[0], C.run(vlm, ex)[0], atol=1e-5)
    with pytest.raises(CorruptionError, match="not in the vocabulary"):
        C.replace_tokens(vlm, ex, {"red": "zebra"})
    assert C.str_candidates(vlm, "red", COLORS) == [c for c in COLORS if c != "red"]


WORDS = st.one_of(st.sampled_from(list(SHAPES + COLORS) + ["left", "right", "above", "below", "of", "the", "Is"]),
                  st.text(alphabet=string.ascii_letters + " ?<>", min_size=0, max_size=7))


@pytest.mark.parametrize("which", ["organism", "llava"])
def test_str_property_only_documented_errors(which, request):
    vlm = request.getfixturevalue("organism") if which == "organism" else tiny_vlm("llava")
    scene = World().scene(1)
    ex = vlm.prepare(scene.pil(), "Is the red circle left of the square?", answer="yes")

    @FAST
    @given(old=st.one_of(st.sampled_from(ex.question.rstrip("?").split()), WORDS), new=WORDS)
    def check(old, new):
        try:
            bad = C.replace_tokens(vlm, ex, {old: new})
        except CorruptionError as err:
            assert str(err)
            return
        a, b = ex.inputs["input_ids"], bad.inputs["input_ids"]
        assert a.shape == b.shape
        changed = set((a[0] != b[0]).nonzero().flatten().tolist())
        assert changed and changed <= set(ex.groups["lm"]["question"])

    check()


@FAST
@given(seed=st.integers(0, 2**31), h=st.integers(1, 12), w=st.integers(1, 12), flips=st.integers(0, 20),
       fill=st.sampled_from(["blur", "mean", "patch", "inpaint", "smudge"]), dilation=st.integers(0, 3))
def test_pair_checks_and_fills_property(seed, h, w, flips, fill, dilation):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = rng.random((h, w)) < rng.random()
    other = img.copy()
    for _ in range(flips):
        other[rng.integers(h), rng.integers(w)] = rng.integers(0, 256, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = C.check_pair(img, other, mask if mask.any() else None, grid=(min(h, 3), min(w, 3)),
                              dilate_px=dilation)
    assert all(issubclass(c.category, NotMinimalPairWarning) for c in caught)
    assert 0 <= report.pixel_fraction <= 1 and 0 <= report.patch_fraction <= 1
    assert report.minimal == (not caught)
    if report.outside_pixels is not None:
        assert 0 <= report.outside_pixels <= report.pixels_changed
    try:
        out = np.asarray(C.fill_region(img, mask, fill, seed=seed))
    except CorruptionError as err:
        assert str(err)
        return
    assert out.shape == img.shape and np.array_equal(out[~mask], img[~mask])


# ---------------------------------------------------------------------------------- specs


def test_from_spec_parses_the_cli_forms(tmp_path, image, other_image):
    vlm = tiny_vlm("llava")
    ex = vlm.prepare(image, QUESTION, answer="yes", region=BOX)
    plain = C.from_spec(vlm, ex, "noise")
    assert torch.equal(plain.edits[0].noise, C.noise(vlm, ex).edits[0].noise)
    bad = C.from_spec(vlm, ex, "noise:scale=3sd,tokens=object,place=pixels,seed=1")
    direct = C.noise(vlm, ex, scale="3sd", tokens="object", place="pixels", seed=1)
    assert torch.equal(bad.inputs["pixel_values"], direct.inputs["pixel_values"])
    assert C.from_spec(vlm, ex, "noise:tokens=5+6,scale=0.5").meta["corruption"]["positions"] == [5, 6]
    assert C.from_spec(vlm, ex, "str:red=blue,circle=square").question == "Is there a blue square ?"
    assert C.from_spec(vlm, ex, "edit:fill=patch,seed=2").meta["corruption"] == {
        "kind": "edit", "fill": "patch", "seed": 2, "prompt": None}
    other_image.save(tmp_path / "b.png")
    assert np.array_equal(np.asarray(C.from_spec(vlm, ex, f"pair:{tmp_path / 'b.png'}").image), np.asarray(other_image))
    image.save(tmp_path / "a.png")
    line = {"clean_image": "a.png", "corrupt_image": "b.png", "question": QUESTION, "corrupt_answer": "no"}
    (tmp_path / "p.jsonl").write_text(json.dumps(line) + "\n" + json.dumps(line) + "\n")
    assert C.from_spec(vlm, ex, f"pair:{tmp_path / 'p.jsonl'},line=2").answer == "no"
    for spec, message in (("blur", "unknown corruption spec"), ("noise:foo=1", "unknown noise option"),
                          ("noise:seed=1,seed=2", "given twice"), ("noise:seed", "key=value"),
                          ("noise:scale=abc", "neither a number"), ("noise:seed=x", "integer"),
                          ("str:red", "OLD=NEW"), ("str:", "at least one"), ("edit:fill=smear", "unknown fill"),
                          (f"pair:{tmp_path / 'p.jsonl'}", "choose one"), ("pair:", "needs a path"),
                          (f"pair:{tmp_path / 'none.png'}", "not found"), ("", "empty")):
        with pytest.raises(CorruptionError, match=message):
            C.from_spec(vlm, ex, spec)
