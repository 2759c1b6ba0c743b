"""InternVL (-hf classes) on a tiny random model: tiles with CLS tokens by hand, the connector's token order,
residual sums with the layer scale, the fast path, interventions during generate, POPE, and refusals."""

from __future__ import annotations

import pytest
from PIL import Image

import vlm_interp as vi
from vlm_interp.errors import ImageTokenMismatchError
from vlm_interp.tiny import tiny

import family_checks as checks


@pytest.fixture(scope="module")
def internvl() -> vi.VLM:
    return vi.wrap(*tiny("internvl", seed=0))


def test_adapter_and_sites_command(internvl, capsys):
    vision = internvl.adapter.adapter.towers["vision"]
    assert internvl.adapter.folds("vision") and set(vision.residual_scale) == {"attn", "mlp"}
    out = checks.check_sites_command("internvl", capsys)
    assert "vision.head: 8 sites" in out and "lm.head: 8 sites" in out


def test_prompt_layout_and_groups(internvl, image):
    ex = internvl.prepare(image, checks.QUESTION)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": checks.QUESTION}]}]
    assert ex.prompt == internvl.processor.apply_chat_template(conversation, add_generation_prompt=True)
    image_pos = ex.groups["lm"]["image"]
    assert ex.tokens[image_pos[0] - 1] == "<img>" and ex.tokens[image_pos[-1] + 1] == "</img>"
    assert image_pos == list(range(image_pos[0], image_pos[0] + 5 * 4))  # 2x2 tiles + thumbnail, 4 tokens each
    assert ex.groups["vision"]["cls"] == [0, 17, 34, 51, 68]


def test_image_token_count_mismatch_is_explained(image):
    model, processor = tiny("internvl")
    processor.image_seq_length = 3
    with pytest.raises(ImageTokenMismatchError, match="image tokens"):
        vi.wrap(model, processor).prepare(image, checks.QUESTION)


def test_object_group_on_a_wide_image_by_hand(internvl):
    """48x24 (width x height): the closest grid is 2 columns x 1 row, so the image is stretched to 32x16 (scale 2/3
    in both axes) and cut into 2 tiles, then the thumbnail (scale 16/48 across, 16/24 down)."""
    image = Image.new("RGB", (48, 24))
    ex = internvl.prepare(image, checks.QUESTION, region=(30, 3, 33, 9))  # pixel centres x 30.5..32.5, y 3.5..8.5
    # tile 1 (positions 17..33, CLS at 17): x -> 20.3..21.7 is column 1, y -> 2.3..5.7 rows 0, 1
    # -> 17 + 1 + 1, 17 + 1 + 5
    # thumbnail (CLS at 34): x -> 10.2..10.8 is column 2, y -> 2.3..5.7 rows 0, 1 -> 34 + 1 + 2, 34 + 1 + 6
    assert ex.groups["vision"]["object"] == [19, 23, 37, 41]
    assert ex.groups["lm"]["object"] == [ex.groups["lm"]["image"][k] for k in (4, 9)]


def test_lm_boxes_follow_the_connector(internvl, image):
    checks.check_lm_boxes_follow_the_connector(internvl, image, "model.vision_tower")


def test_residual_in_plus_scaled_attn_and_mlp_is_residual_out(internvl, image):
    checks.check_residual_sums(internvl, image)


def test_fast_path_equals_plain_loop(internvl, image):
    checks.check_fast_path_equals_plain_loop(internvl, image, "lm_head", components=("attn", "head"))


@pytest.mark.filterwarnings("error::FutureWarning", "error::DeprecationWarning")
@pytest.mark.usefixtures("no_transformers_deprecations")
def test_interventions_during_generate_with_cache_on_and_off(internvl, image):
    checks.check_interventions_during_generate(internvl, image)


def test_pope_on_two_images(tmp_path):
    checks.check_pope_on_two_images("internvl", tmp_path)


def test_different_image_sizes_are_refused(internvl, image):
    checks.check_different_image_sizes_are_refused(internvl, image)
