"""Idefics3 and SmolVLM on tiny random models: tiled geometry by hand, the connector's token order, residual
sums, the fast path, interventions during generate, POPE, and refusals."""

from __future__ import annotations

import pytest
from PIL import Image

import vlm_interp as vi
from vlm_interp.errors import ImageTokenMismatchError
from vlm_interp.tiny import tiny

import family_checks as checks


@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def vlm(request) -> vi.VLM:
    return vi.wrap(*tiny(request.param, seed=0))


@pytest.fixture(scope="module")
def idefics3() -> vi.VLM:
    return vi.wrap(*tiny("idefics3", seed=0))


def test_adapter_and_sites_command(vlm, capsys):
    assert vlm.adapter.n_layers == {"vision": 2, "lm": 2} and vlm.adapter.folds("vision")
    out = checks.check_sites_command(vlm.family, capsys)
    assert "vision.head: 8 sites" in out and "lm.head: 8 sites" in out


def test_prompt_uses_the_chat_template_and_tags_are_text(vlm, image):
    ex = vlm.prepare(image, checks.QUESTION)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": checks.QUESTION}]}]
    assert ex.prompt == vlm.processor.apply_chat_template(conversation, add_generation_prompt=True)
    lm = ex.groups["lm"]
    tags = [ex.tokens[p] for p in lm["text"] if ex.tokens[p].startswith("<") and ex.tokens[p] != "<s>"]
    assert tags[:2] == ["<fake_token_around_image>", "<row_1_col_1>"] and "<global-img>" in tags
    assert len(lm["image"]) == 5 * 4 and len(ex.groups["vision"]["image"]) == 5 * 16  # 4 tiles + global


def test_image_token_count_mismatch_is_explained(idefics3, image):
    model, processor = tiny("idefics3")
    processor.image_seq_len = 3
    with pytest.raises(ImageTokenMismatchError, match="image tokens"):
        vi.wrap(model, processor).prepare(image, checks.QUESTION)


def test_object_group_on_a_wide_image_by_hand(idefics3):
    """48x24 (width x height): resized to 32x16, stretched to 32x16 = 1 row of 2 tiles of 16 pixels (scale 2/3 in
    both axes), then the global tile (scale 16/48 across, 16/24 down)."""
    image = Image.new("RGB", (48, 24))
    ex = idefics3.prepare(image, checks.QUESTION, region=(30, 3, 33, 9))  # pixel centres x 30.5..32.5, y 3.5..8.5
    # split tiles: x -> 20.3..21.7 stretched: tile 1 (x 16..32), patch column 1; y -> 2.3..5.7: patch rows 0 and 1
    # -> positions 16 + 1, 16 + 5; global tile: x -> 10.2..10.8: column 2; y -> 2.3..5.7: rows 0, 1 -> 32 + 2, 32 + 6
    assert ex.groups["vision"]["object"] == [17, 21, 34, 38]
    # LM tokens: 2x2 per tile of 8 stretched pixels: tile 1 token (0, 0) -> index 4; global token (0, 1) -> 8 + 1
    assert ex.groups["lm"]["object"] == [ex.groups["lm"]["image"][k] for k in (4, 9)]


def test_lm_boxes_follow_the_connector(idefics3, image):
    checks.check_lm_boxes_follow_the_connector(idefics3, image, "model.vision_model")


def test_residual_in_plus_attn_plus_mlp_is_residual_out(idefics3, image):
    checks.check_residual_sums(idefics3, image)


@pytest.mark.filterwarnings("error::FutureWarning")
def test_fast_path_equals_plain_loop(idefics3, image):
    checks.check_fast_path_equals_plain_loop(idefics3, image, "lm_head", components=("input", "mlp"))


@pytest.mark.filterwarnings("error::FutureWarning", "error::DeprecationWarning")
@pytest.mark.usefixtures("no_transformers_deprecations")
def test_interventions_during_generate_with_cache_on_and_off(idefics3, image):
    checks.check_interventions_during_generate(idefics3, image)


def test_pope_on_two_images(tmp_path):
    checks.check_pope_on_two_images("idefics3", tmp_path)


def test_different_image_sizes_are_refused(idefics3, image):
    checks.check_different_image_sizes_are_refused(idefics3, image)
