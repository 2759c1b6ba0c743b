"""VLM.prepare, token groups, answer scoring and loading, checked by hand-made computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vlm_interp as vi
from vlm_interp.errors import AnswerEncodingError, ImageTokenMismatchError, PromptError
from vlm_interp.tiny import tiny

from conftest import QUESTION, run_logits


def test_groups_partition_the_lm_sequence(vlm, image):
    ex = vlm.prepare(image, QUESTION)
    lm = ex.groups["lm"]
    if vlm.family == "blip":
        assert lm["last"] == [0] and ex.groups["text"]["question"]
        words = [ex.inputs["input_ids"][0, p] for p in ex.groups["text"]["question"]]
        assert vlm.tokenizer.decode(words).replace(" ", "") == QUESTION.replace(" ", "")
        return
    ids = ex.inputs["input_ids"][0]
    assert lm.get("image", []) == [p for p in range(len(ids)) if ids[p] == vlm.image_token_id]
    assert ("image" in lm) == vlm.adapter.adapter.image_in_lm
    assert sorted(lm.get("image", []) + lm["text"]) == list(range(len(ids)))
    assert lm["last"] == [len(ids) - 1]
    question = vlm.tokenizer.decode(ids[lm["question"]])
    assert question.replace(" ", "") == QUESTION.replace(" ", "")
    if "qformer" in ex.groups:
        assert ex.groups["qformer"]["image"] == list(range(vlm.model.config.num_query_tokens))


# Tiled families, by hand: the vision positions (tiles in turn) and the LM image tokens (their index among the image
# tokens) that the box (8, 8, 16, 16) of a 32x32 image covers.
TILED_OBJECT = {
    # 2x2 tiles of 16 pixels in 4-pixel patches (16 per tile), then the global tile (the image at half size);
    # LM tokens: 2x2 per tile (8 pixels each; 4 in the global tile's coordinates)
    "idefics3": ([10, 11, 14, 15, 64 + 5], [3, 16]),
    "smolvlm": ([10, 11, 14, 15, 64 + 5], [3, 16]),
    # 2x2 tiles then the thumbnail, each a CLS token and 4x4 patches; LM tokens 2x2 per tile
    "internvl": ([1 + 10, 1 + 11, 1 + 14, 1 + 15, 4 * 17 + 1 + 5], [3, 16]),
    # a 2x2 canvas of 16-pixel tiles, each a CLS token and 4x4 patches (and 7 padding positions in the vision
    # encoders); no LM image token: the tokens cross-attention reads hold the object
    "mllama": ([1 + 10, 1 + 11, 1 + 14, 1 + 15], []),
}
CROSS_OBJECT = {"mllama": [1 + 10, 1 + 11, 1 + 14, 1 + 15]}


def test_object_group_on_an_unresized_image(vlm, image):
    """32x32 images are not resized: the box (8, 8, 16, 16) is exactly patch (1, 1) of the 4x4 grid."""
    ex = vlm.prepare(image, QUESTION, region=(8, 8, 16, 16))
    if vlm.adapter.adapter.image_layout is not None:
        vision, lm = TILED_OBJECT[vlm.family]
        assert ex.groups["vision"]["object"] == vision
        assert ex.groups["lm"].get("object", []) == [ex.groups["lm"]["image"][k] for k in lm]
        if vlm.family in CROSS_OBJECT:
            assert ex.groups["cross"]["object"] == CROSS_OBJECT[vlm.family]
        return
    # patch 5 of the grid: after the CLS token in CLIP and ViT towers (position 6), at position 5 in SigLIP towers
    if vlm.adapter.adapter.vision_boxes is None:  # Qwen: vision positions in merge-window order (its own tests)
        assert ex.groups["vision"]["object"] == [6 if "cls" in ex.groups["vision"] else 5]
    image_pos = ex.groups["lm"].get("image")
    if vlm.family in ("llava", "paligemma"):  # one LM image token per patch
        assert ex.groups["lm"]["object"] == [image_pos[5]]
    if vlm.family in ("llava_next", "llava_onevision"):
        # base 4x4 grid, then one 4x4 tile written row by row with a newline token after each row
        assert ex.groups["lm"]["object"] == [image_pos[5], image_pos[16 + 1 * 5 + 1]]
    if vlm.family == "gemma3":  # 2x2 LM tokens, each the average of 2x2 patches: patch (1, 1) is in token (0, 0)
        assert ex.groups["lm"]["object"] == [image_pos[0]]
    if vlm.family in ("blip", "blip2", "instructblip"):
        assert "object" not in ex.groups["lm"]
    if vlm.family.startswith("qwen"):
        # 4-pixel patches: the box is patches (2..3, 2..3), merged 2 x 2 into block (1, 1) = block 5 of the 4 x 4 LM grid
        assert ex.groups["lm"]["object"] == [ex.groups["lm"]["image"][5]]
        # the vision tower holds block 5's four patches together: at 5 * 4 in row-major block order, at 3 * 4 in
        # Qwen2.5-VL's window order (2 x 2-block windows: blocks 0, 1, 4, 5 come first)
        first = 12 if vlm.family == "qwen2_5_vl" else 20
        assert ex.groups["vision"]["object"] == list(range(first, first + 4))
        return


def test_object_group_undoes_resize_and_centre_crop():
    vlm = vi.load("tiny:llava")
    img = Image.new("RGB", (48, 40))  # width 48, height 40 -> resized to 38x32, 3 columns cropped left
    mask = np.zeros((40, 48), bool)
    mask[15, 20] = True  # centre (15.5, 20.5): row 15.5 // 10 = 1; column (20.5 * 0.8 - 3) // 8 = 1
    ex = vlm.prepare(img, QUESTION, region=mask)
    assert ex.groups["vision"]["object"] == [1 + 1 * 4 + 1]
    cropped = np.zeros((40, 48), bool)
    cropped[:, :3] = True  # these columns are cropped away
    with pytest.warns(UserWarning, match="crops it away"):
        ex = vlm.prepare(img, QUESTION, region=cropped)
    assert ex.groups["vision"]["object"] == []


def _manual_first_logits(vlm, inputs: dict) -> torch.Tensor:
    """The answer logits computed without vlm.logits: plain forward, or BLIP's modules by hand."""
    m = vlm.model
    if vlm.family != "blip":
        return m(**inputs).logits[0, -1]
    image_embeds = m.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
    question = m.text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                              encoder_hidden_states=image_embeds).last_hidden_state
    dec = inputs.get("decoder_input_ids", torch.tensor([[m.decoder_start_token_id]]))
    return m.text_decoder(input_ids=dec, encoder_hidden_states=question,
                          encoder_attention_mask=inputs["attention_mask"]).logits[0, -1]


# the token type of answer tokens fed after the prompt: text (Gemma 3), the causal suffix after the prefix (PaliGemma)
ANSWER_TOKEN_TYPE = {"gemma3": 0, "paligemma": 1}


def test_scores_equal_a_plain_token_by_token_loop(vlm, image):
    answer = "red circle"
    ex = vlm.prepare(image, QUESTION, answer=answer)
    assert len(ex.answer_ids) == 2
    score = vlm.score(ex)
    total = 0.0
    with torch.no_grad():
        for i, token in enumerate(ex.answer_ids):
            inputs = dict(ex.inputs)
            done = torch.tensor([ex.answer_ids[:i]], dtype=torch.long)
            if vlm.family == "blip":
                inputs["decoder_input_ids"] = torch.cat([torch.tensor([[vlm.model.decoder_start_token_id]]), done], 1)
            else:
                inputs["input_ids"] = torch.cat([inputs["input_ids"], done], 1)
                inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
                for key in vlm.adapter.adapter.text_aligned_inputs:  # Mllama: each new token sees the image too
                    inputs[key] = torch.cat([inputs[key]] + [inputs[key][:, -1:]] * i, 1)
                if "token_type_ids" in inputs:
                    kind = torch.full_like(done, ANSWER_TOKEN_TYPE[vlm.family])
                    inputs["token_type_ids"] = torch.cat([inputs["token_type_ids"], kind], 1)
                if "mm_token_type_ids" in inputs:  # Qwen: answer tokens are text (type 0)
                    inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], 0 * done], 1)
            logp = torch.log_softmax(_manual_first_logits(vlm, inputs), -1)[token].item()
            if i == 0:
                assert score.first_logprob == pytest.approx(logp, abs=1e-5)
                assert score.first_prob == pytest.approx(np.exp(logp), rel=1e-5)
            total += logp
    assert score.logprob == pytest.approx(total, abs=1e-5)
    assert score.prob == pytest.approx(np.exp(total), rel=1e-4)


def test_logit_diff_equals_manual_difference(vlm, image):
    ex = vlm.prepare(image, QUESTION)
    with torch.no_grad():
        logits = _manual_first_logits(vlm, ex.inputs)
    yes, no = vlm.encode_answer(ex, "yes")[0], vlm.encode_answer(ex, "no")[0]
    assert vlm.logit_diff(ex, "yes", "no") == pytest.approx(float(logits[yes] - logits[no]), abs=1e-5)


def test_generate_returns_only_new_text(vlm, image):
    ex = vlm.prepare(image, QUESTION)
    text = vlm.generate(ex, max_new_tokens=3)
    assert isinstance(text, str)
    assert len(vlm.tokenizer(text, add_special_tokens=False)["input_ids"]) <= 3


def test_bad_answers_are_named(vlm, image):
    ex = vlm.prepare(image, QUESTION)
    with pytest.raises(AnswerEncodingError, match="cannot encode"):
        vlm.encode_answer(ex, "zebra")
    with pytest.raises(AnswerEncodingError, match="empty"):
        vlm.encode_answer(ex, "  ")
    with pytest.raises(AnswerEncodingError, match="no answer"):
        vlm.score(ex)
    with pytest.raises(AnswerEncodingError, match="share their first token"):
        vlm.logit_diff(ex, "red circle", "red star")


def test_prompt_placeholder_rules(vlm, image):
    mark = vlm.image_token  # the placeholder a prompt holds (Gemma 3: its start-of-image token)
    if vlm.adapter.adapter.image_placeholder:
        with pytest.raises(PromptError, match="0 times"):
            vlm.prepare(image, QUESTION, template="USER: {question} ASSISTANT:")
        with pytest.raises(PromptError, match="2 times"):
            vlm.prepare(image, QUESTION, template=f"{mark} {mark} {{question}}")
    else:
        with pytest.raises(PromptError, match="adds the image tokens itself"):
            vlm.prepare(image, QUESTION, template=f"{mark or '<image>'} {{question}}")
    with pytest.raises(PromptError, match="no '\\{question\\}'"):
        vlm.prepare(image, QUESTION, template=f"USER: {mark or '<image>'} ASSISTANT:")


@pytest.mark.parametrize("family, setting, value", [
    ("llava", "num_additional_image_tokens", 0),
    ("llava", "patch_size", 16),
    ("llava_next", "num_additional_image_tokens", 0),
    ("blip2", "num_query_tokens", 3),
    ("instructblip", "num_query_tokens", 5),
    ("llava_onevision", "num_image_tokens", 9),
    ("paligemma", "image_seq_length", 9),
])
def test_image_token_count_mismatch_is_explained(family, setting, value, image):
    model, processor = tiny(family)
    setattr(processor, setting, value)
    vlm = vi.wrap(model, processor)
    with pytest.raises(ImageTokenMismatchError, match="image tokens") as err:
        vlm.prepare(image, QUESTION)
    assert setting in str(err.value)


@pytest.mark.parametrize("family", ["llava", "llava_next", "blip", "blip2", "instructblip", "llava_onevision",
                                    "gemma3", "paligemma"])
def test_load_from_a_saved_folder_gives_the_same_model(family, tmp_path, image):
    model, processor = tiny(family, seed=3)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    original = vi.wrap(model, processor)
    loaded = vi.load(str(tmp_path))
    assert type(loaded.model) is type(model) and loaded.family == family
    a, b = original.prepare(image, QUESTION), loaded.prepare(image, QUESTION)
    assert torch.equal(a.inputs["input_ids"], b.inputs["input_ids"])
    torch.testing.assert_close(run_logits(loaded, b), run_logits(original, a), rtol=1e-5, atol=1e-5)


def test_load_rejects_unknown_architecture_before_reading_weights(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=10, architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    with pytest.raises(vi.VLMInterpError, match="LlamaForCausalLM.*Supported"):
        vi.load(str(tmp_path))


def test_fcct_groups_partition_the_lm_sequence():
    import vlm_interp as vi
    from vlm_interp.tiny import tiny

    vlm = vi.wrap(*tiny("llava", seed=0))
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    ex = vlm.prepare(image, "Is there a red circle in the image?", region=(8, 8, 20, 20))
    groups = vlm.add_fcct_groups(ex, "circle")
    n = ex.inputs["input_ids"].shape[1]
    flat = sorted(p for g in groups.values() for p in g)
    assert flat == list(range(n))  # every position in exactly one group
    assert all(groups[g] for g in ("early_visual", "object_visual", "late_visual", "object_text", "last"))
    assert "".join(ex.tokens[p] for p in groups["object_text"]).replace("Ġ", "").strip() == "circle"
    assert max(groups["early_visual"]) < min(groups["object_visual"]) < max(groups["late_visual"])
    with pytest.raises(ValueError, match="does not occur"):
        vlm.add_fcct_groups(ex, "square")
    plain = vlm.prepare(image, "Is there a red circle in the image?")
    with pytest.raises(ValueError, match="region"):
        vlm.add_fcct_groups(plain, "circle")
    from vlm_interp.corruptions import noise
    from vlm_interp.tracing import trace

    ex.answer, ex.answer_ids = "yes", vlm.encode_answer(ex, "yes")
    tr = trace(vlm, ex, noise(vlm, ex, scale=1.0, seed=0), components=["lm.hidden"], tokens=list(groups),
               progress=False)
    assert list(tr.data.coords["group"].values) == list(groups)
