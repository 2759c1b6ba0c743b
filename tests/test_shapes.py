"""Tests of the procedural shapes world, its tasks, POPE sets, minimal pairs and tokenizer."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vlm_interp.zoo.scene_pairs import PAIR_LEVELS, NoMinimalPairError, minimal_pair
from vlm_interp.zoo.pope_set import pope_questions, read_jsonl, write_pope
from vlm_interp.zoo.shapes import SHAPES, World, WorldConfig, cooccurrence
from vlm_interp.zoo.tasks import CAPTION_PROMPT, caption, make_qa
from vlm_interp.zoo.text import (
    IMAGE,
    multi_token_words,
    train_bpe_tokenizer,
    world_corpus,
    world_words,
)

WORLD = World()
SEEDS = st.integers(min_value=0, max_value=2**31 - 1)
FAST = settings(max_examples=30, deadline=None)
QUESTION_RE = {
    "existence": re.compile(r"^Is there a (\w+) in the image\?$"),
    "attribute": re.compile(r"^What color is the (\w+)\?$"),
    "relation": re.compile(r"^Is the (\w+) (left of|right of|above|below) the (\w+)\?$"),
}


# --------------------------------------------------------------------------- scenes


def test_same_seed_same_scene_and_different_seeds_differ():
    a, b = WORLD.scene(123), WORLD.scene(123)
    assert np.array_equal(a.image, b.image)
    assert a.graph() == b.graph()
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.objects, b.objects))
    assert not np.array_equal(a.image, WORLD.scene(124).image)
    batch = WORLD.scenes(5, seed=9)
    again = WORLD.scenes(5, seed=9)
    assert all(np.array_equal(x.image, y.image) and x.graph() == y.graph() for x, y in zip(batch, again))
    redrawn = WORLD.scene(batch[3].seed)  # a scene of a batch can be redrawn alone
    assert np.array_equal(redrawn.image, batch[3].image)


def test_scene_basic_layout():
    scene = WORLD.scene(5)
    assert scene.image.dtype == np.uint8 and scene.image.shape == (64, 64, 3)
    assert scene.pil().size == (64, 64) and scene.pil().mode == "RGB"
    assert scene.grid_shape == (8, 8)
    with pytest.raises(ValueError, match="obj_index"):
        scene.patch_mask(len(scene.objects))


@FAST
@given(seed=SEEDS)
def test_masks_patches_and_pixels_agree(seed):
    c = WORLD.config
    scene = WORLD.scene(seed)
    lo, hi = c.n_objects
    assert lo <= len(scene.objects) <= hi
    union = np.zeros((c.canvas, c.canvas), dtype=bool)
    for i, obj in enumerate(scene.objects):
        assert obj.shape in c.shapes and obj.color in c.colors
        assert obj.mask.shape == (c.canvas, c.canvas) and obj.mask.any()
        assert not (union & obj.mask).any(), "objects overlap"
        union |= obj.mask
        blocks = obj.mask.reshape(c.grid, c.patch_size, c.grid, c.patch_size)
        has_pixel = blocks.any(axis=(1, 3))
        expected = [r * c.grid + col for r in range(c.grid) for col in range(c.grid) if has_pixel[r, col]]
        assert list(obj.patches) == expected
        assert np.array_equal(scene.patch_mask(i), has_pixel)
        assert np.allclose(obj.patch_coverage, blocks.mean(axis=(1, 3)))
        # the mask sits within the bounding circle of the object
        rows, cols = np.nonzero(obj.mask)
        assert np.all((cols + 0.5 - obj.x) ** 2 + (rows + 0.5 - obj.y) ** 2 <= obj.radius**2 + 1e-6)
    bg = scene.image[~union]
    assert bg.min() >= c.background_level - c.background_noise
    assert bg.max() <= c.background_level + c.background_noise


def test_weak_objects_are_small_or_faint():
    c = WORLD.config
    objs = [o for s in WORLD.scenes(300, seed=4) for o in s.objects]
    weak = [o for o in objs if o.weak]
    assert 0.1 < len(weak) / len(objs) < 0.3  # p_weak = 0.2
    for o in weak:
        assert o.radius <= c.weak_radius_range[1] or o.contrast <= c.weak_contrast_range[1]
    for o in objs:
        if not o.weak:
            assert o.radius >= c.radius_range[0] and o.contrast >= c.contrast_range[0]


def test_partners_can_be_weaker_than_other_objects():
    """p_weak_partner applies only to objects pulled in by the prior; None leaves every draw as it was."""
    only_partners = World(WorldConfig(p_weak=0.0, p_weak_partner=1.0))
    scenes = only_partners.scenes(300, seed=8)
    weak = [(s, o) for s in scenes for o in s.objects if o.weak]
    assert len(weak) > 30
    for s, o in weak:  # every weak object was pulled in by a present, non-weak partner
        partner = next(p for p in s.objects if p.shape == only_partners.config.partner(o.shape))
        assert not partner.weak
    singles = [s for s in scenes if len(s.objects) == 1]
    assert singles and not any(o.weak for s in singles for o in s.objects)
    same = World(WorldConfig(p_weak_partner=WorldConfig().p_weak))
    for a, b in zip(WORLD.scenes(20, seed=9), same.scenes(20, seed=9)):
        assert np.array_equal(a.image, b.image)
    with pytest.raises(ValueError, match="p_weak_partner"):
        WorldConfig(p_weak_partner=1.5)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="hexagon"):
        WorldConfig(shapes=("circle", "hexagon"))
    with pytest.raises(ValueError, match="magenta"):
        WorldConfig(colors=("red", "magenta"))
    with pytest.raises(ValueError, match="n_objects"):
        WorldConfig(n_objects=(0, 3))
    with pytest.raises(ValueError, match="n_objects"):
        WORLD.scene(0, n_objects=7)
    with pytest.raises(ValueError, match="hexagon"):
        WORLD.make_object("hexagon", "red", 5, 20, 20)
    with pytest.raises(ValueError, match="medium"):
        pope_questions(WORLD, 2, 0, "medium")
    with pytest.raises(ValueError, match="scene"):
        minimal_pair(WORLD, WORLD.scene(0), "scene", 0)
    with pytest.raises(ValueError, match="essay"):
        make_qa(WORLD, WORLD.scene(0), "essay", np.random.default_rng(0))


# --------------------------------------------------------------------------- prior


def test_cooccurrence_prior_is_planted():
    pairs = WORLD.config.cooccur_pairs
    co = cooccurrence(WORLD.scenes(800, seed=11), SHAPES)
    partner, other = co.pair_rates(pairs)
    assert partner > 0.55 and partner > 2 * other
    # without the planted prior, partners are no more frequent than other shapes
    flat = World(WorldConfig(p_cooccur=0.0))
    rng = np.random.default_rng(0)
    co0 = cooccurrence((flat.sample_shapes(rng, int(rng.integers(1, 5))) for _ in range(3000)), SHAPES)
    p0, o0 = co0.pair_rates(pairs)
    assert abs(p0 - o0) < 0.08


# --------------------------------------------------------------------------- tasks


def _check_qa(scene, qa):
    objs = scene.objects
    if qa.task == "caption":
        assert qa.question == CAPTION_PROMPT and qa.answer == caption(scene)
        return
    m = QUESTION_RE[qa.task].match(qa.question)
    assert m, qa.question
    if qa.task == "existence":
        present = any(o.shape == m.group(1) for o in objs)
        assert qa.answer == ("yes" if present else "no")
    elif qa.task == "attribute":
        matching = [o for o in objs if o.shape == m.group(1)]
        assert len(matching) == 1 and qa.answer == matching[0].color
    else:
        a_name, rel, b_name = m.groups()
        (a,) = [o for o in objs if o.shape == a_name]
        (b,) = [o for o in objs if o.shape == b_name]
        dx, dy = b.x - a.x, b.y - a.y  # independent recomputation from centres
        truth = {"left of": dx > 0, "right of": dx < 0, "above": dy > 0, "below": dy < 0}[rel]
        assert qa.answer == ("yes" if truth else "no")
        axis_gap = abs(dx) if rel in ("left of", "right of") else abs(dy)
        assert axis_gap >= WORLD.config.relation_margin


def test_qa_answers_match_scene_graph():
    rng = np.random.default_rng(0)
    seen = {t: set() for t in QUESTION_RE}
    for scene in WORLD.scenes(200, seed=21):
        for task in ("existence", "attribute", "relation", "caption"):
            qa = make_qa(WORLD, scene, task, rng)
            if qa is None:
                continue
            _check_qa(scene, qa)
            if task in seen:
                seen[task].add(qa.answer)
    assert seen["existence"] == {"yes", "no"} and seen["relation"] == {"yes", "no"}
    assert len(seen["attribute"]) == len(WORLD.config.colors)


def test_caption_format_left_to_right():
    w = WORLD
    objs = [
        w.make_object("star", "blue", 6, 40, 20),
        w.make_object("circle", "red", 6, 12, 40),
        w.make_object("cross", "orange", 6, 54, 50),
    ]
    scene = w.compose(objs, background_seed=0)
    assert caption(scene) == "a red circle, a blue star and an orange cross"
    assert caption(w.compose(objs[:2], 0)) == "a red circle and a blue star"
    assert caption(w.compose(objs[:1], 0)) == "a blue star"
    cap_re = re.compile(r"^(an? \w+ \w+)((, an? \w+ \w+)* and an? \w+ \w+)?$")
    for s in WORLD.scenes(50, seed=2):
        text = caption(s)
        assert cap_re.match(text), text
        words = re.findall(r"an? (\w+) (\w+)", text)
        expected = [(o.color, o.shape) for o in sorted(s.objects, key=lambda o: o.x)]
        assert words == expected


# --------------------------------------------------------------------------- POPE


def test_pope_files_layout_balance_and_adversarial(tmp_path):
    n = 40
    paths = write_pope(WORLD, tmp_path, n_images=n, seed=5)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    scenes = WORLD.scenes(n, seed=5)
    captions = read_jsonl(paths["captions"])
    assert len(captions) == n
    by_image = {}
    for row, scene in zip(captions, scenes):
        assert set(row) >= {"image", "objects", "caption"}
        assert row["objects"] == [s for s in SHAPES if s in scene.shape_set()]
        assert row["caption"] == caption(scene)
        png = Image.open(io.BytesIO((paths["images"] / row["image"]).read_bytes()))
        assert np.array_equal(np.asarray(png.convert("RGB")), scene.image)
        by_image[row["image"]] = scene
    freq = WORLD.shape_stats().frequency()
    for split in ("random", "popular", "adversarial"):
        rows = read_jsonl(paths[split])
        assert all(set(r) == {"question_id", "image", "text", "label"} for r in rows)
        assert len({r["question_id"] for r in rows}) == len(rows)
        assert sum(r["label"] == "yes" for r in rows) * 2 == len(rows)
        negatives: dict[str, list[str]] = {}
        for r in rows:
            shape = QUESTION_RE["existence"].match(r["text"]).group(1)
            present = shape in by_image[r["image"]].shape_set()
            assert present == (r["label"] == "yes")
            if not present:
                negatives.setdefault(r["image"], []).append(shape)
        for image, negs in negatives.items():
            present = by_image[image].shape_set()
            absent = [s for s in SHAPES if s not in present]
            if split == "popular":
                top = sorted(absent, key=lambda s: -freq[SHAPES.index(s)])[: len(negs)]
                assert sorted(negs) == sorted(top)
            if split == "adversarial":
                partners = {WORLD.config.partner(s) for s in present} - present - {None}
                assert sum(s in partners for s in negs) == min(len(partners), len(negs))
    # the in-memory set agrees with the file
    pope = pope_questions(WORLD, n, 5, "adversarial")
    assert [q.to_json() for q in pope.questions] == read_jsonl(paths["adversarial"])
    assert json.loads(paths["adversarial"].read_text().splitlines()[0])["question_id"] == 1


# --------------------------------------------------------------------------- minimal pairs


def _check_pair(pair):
    diff = (pair.clean.image != pair.corrupt.image).any(axis=-1)
    assert diff.any(), "the edit changed no pixel"
    assert not (diff & ~pair.mask).any(), "pixels changed outside the mask"
    assert pair.patch_mask().shape == pair.clean.grid_shape
    for q in pair.questions:
        assert q.clean_answer != q.corrupt_answer
        if q.task == "caption":
            assert q.clean_answer == caption(pair.clean) and q.corrupt_answer == caption(pair.corrupt)
            continue
        for scene, answer in ((pair.clean, q.clean_answer), (pair.corrupt, q.corrupt_answer)):
            probe = type("Q", (), {"task": q.task, "question": q.question, "answer": answer})
            _check_qa(scene, probe)


@pytest.mark.parametrize("level,kind", [("object", "replace"), ("object", "remove"),
                                        ("attribute", "recolor"), ("relation", "swap")])
@settings(max_examples=25, deadline=None)
@given(seed=SEEDS)
def test_minimal_pairs_differ_only_inside_mask(level, kind, seed):
    scene = WORLD.scene(seed, n_objects=int(seed % 3) + 2)
    assert WORLD.config.background_noise > 0  # noise must be reproduced exactly
    try:
        pair = minimal_pair(WORLD, scene, level, np.random.default_rng(seed), kind=kind)
    except NoMinimalPairError:
        return  # this scene cannot support the edit (e.g. two objects of one shape)
    assert pair.level == level and pair.kind == kind
    _check_pair(pair)
    clean_objs, corrupt_objs = pair.clean.objects, pair.corrupt.objects
    if kind == "replace":
        (i,) = pair.object_indices
        assert pair.change["from"] == clean_objs[i].shape and pair.change["to"] == corrupt_objs[i].shape
        assert pair.change["to"] not in pair.clean.shape_set()
    elif kind == "remove":
        assert len(corrupt_objs) == len(clean_objs) - 1
    elif kind == "recolor":
        (i,) = pair.object_indices
        assert (pair.change["from"], pair.change["to"]) == (clean_objs[i].color, corrupt_objs[i].color)
    else:
        i, j = pair.object_indices
        assert (corrupt_objs[i].x, corrupt_objs[i].y) == (clean_objs[j].x, clean_objs[j].y)
        assert (corrupt_objs[j].x, corrupt_objs[j].y) == (clean_objs[i].x, clean_objs[i].y)
    untouched = [k for k in range(len(clean_objs)) if k not in pair.object_indices]
    if kind != "remove":
        for k in untouched:
            assert clean_objs[k].describe() == corrupt_objs[k].describe()


def test_every_level_yields_pairs():
    rng = np.random.default_rng(1)
    made = {level: 0 for level in PAIR_LEVELS}
    for scene in WORLD.scenes(30, seed=8):
        for level in PAIR_LEVELS:
            try:
                _check_pair(minimal_pair(WORLD, scene, level, rng))
            except NoMinimalPairError:
                continue
            made[level] += 1
    assert all(v >= 5 for v in made.values()), made


# --------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(world_corpus(WORLD, 300, seed=0))


def test_tokenizer_splits_some_world_words_and_keeps_image_whole(tokenizer):
    words = world_words(WORLD)
    multi = multi_token_words(tokenizer, words)
    assert multi, "no world word is split"
    assert set(words) - set(multi), "every world word is split"
    assert any(w in multi for w in WORLD.config.shapes + WORLD.config.colors)
    ids = tokenizer(f"{IMAGE}\nIs there a star in the image?{IMAGE}x").input_ids
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    assert ids.count(image_id) == 2 and ids[0] == tokenizer.bos_token_id
    assert {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token} == {
        "<s>", "</s>", "<pad>", "<unk>"}
    assert IMAGE in tokenizer.all_special_tokens


def test_tokenizer_is_deterministic(tokenizer):
    again = train_bpe_tokenizer(world_corpus(WORLD, 300, seed=0))
    assert again.get_vocab() == tokenizer.get_vocab()
    text = "Is the diamond left of the purple triangle? no"
    assert again(text).input_ids == tokenizer(text).input_ids
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(["a b"], vocab_size=100)


def test_side_and_relation_choice_questions_follow_the_centres():
    """The training-only tasks answer from object centres, and only when the centres are clearly apart."""
    from vlm_interp.zoo.tasks import RELATION_SIDES, SIDES

    rng = np.random.default_rng(3)
    half, margin = WORLD.config.canvas / 2, WORLD.config.relation_margin
    answers = {"side": [], "relation_choice": []}
    for scene in WORLD.scenes(300, seed=22):
        side = make_qa(WORLD, scene, "side", rng)
        if side is not None:
            obj = scene.objects[side.object_index]
            axis = "x" if side.answer in SIDES["x"] else "y"
            assert scene.count(obj.shape) == 1 and abs(getattr(obj, axis) - half) >= margin / 2
            assert side.answer == SIDES[axis][getattr(obj, axis) > half]
            assert side.question == f"Is the {obj.shape} {'on' if axis == 'x' else 'at'} the {SIDES[axis][0]} or the {SIDES[axis][1]}?"
            answers["side"].append(side.answer)
        choice = make_qa(WORLD, scene, "relation_choice", rng)
        if choice is not None:
            a, b = scene.objects[choice.object_index], scene.objects[choice.other_index]
            axis = "x" if choice.answer in RELATION_SIDES["x"] else "y"
            assert abs(getattr(a, axis) - getattr(b, axis)) >= margin
            assert choice.answer == RELATION_SIDES[axis][getattr(a, axis) > getattr(b, axis)]
            assert choice.question.startswith(f"Is the {a.shape} ") and choice.question.endswith(f" the {b.shape}?")
            answers["relation_choice"].append(choice.answer)
    assert set(answers["side"]) == {"left", "right", "top", "bottom"}
    assert set(answers["relation_choice"]) == {"left", "right", "above", "below"}
