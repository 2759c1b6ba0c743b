"""Model organisms: recipes build real checkpoints, training runs, shipped ones load and agree with their cards."""

from __future__ import annotations


import numpy as np
import pytest
import torch

import vlm_interp as vi
from vlm_interp.zoo import ORGANISM_DIR, RECIPES, card, organism_path
from vlm_interp.hallucination.stats import binary_metrics
from vlm_interp.zoo.shapes import World
from vlm_interp.zoo.tasks import existence_qa
from vlm_interp.zoo.batches import PromptCache, make_batch, pixel_normaliser
from vlm_interp.zoo.scene_bank import SceneBank
from vlm_interp.zoo.train import train

SHIPPED = sorted(p.name for p in ORGANISM_DIR.glob("*") if (p / "config.json").exists()) if ORGANISM_DIR.exists() else []


@pytest.fixture(scope="module", params=sorted(RECIPES))
def briefly_trained(request, tmp_path_factory):
    """Each recipe trained for a handful of steps on a few scenes, saved and reloaded."""
    out = tmp_path_factory.mktemp(request.param)
    vlm, log = train(RECIPES[request.param], out=out, vision_steps=3, vqa_steps=3, train_scenes=64, progress=False)
    return request.param, vlm, log, out


def test_retraining_runs_and_saves_a_loadable_checkpoint(briefly_trained):
    name, vlm, log, out = briefly_trained
    assert all(np.isfinite(log["vqa_loss"])) and log["vqa_loss"]
    loaded = vi.load(str(out))
    assert loaded.family == RECIPES[name].family
    scene = World(RECIPES[name].world).scene(5)
    ex = loaded.prepare(scene.pil(), "Is there a star in the image?", answer="yes")
    again = vlm.prepare(scene.pil(), "Is there a star in the image?", answer="yes")
    assert loaded.score(ex).logprob == pytest.approx(vlm.score(again).logprob, abs=1e-5)


def test_training_inputs_match_the_inference_path(briefly_trained):
    """make_batch must feed exactly what VLM.prepare gives at inference: same ids, same pixels."""
    name, vlm, _, _ = briefly_trained
    world = World(RECIPES[name].world)
    bank = SceneBank.render(world, 4, seed=9, progress=False)
    normalise = pixel_normaliser(vlm.processor)
    rng = np.random.default_rng(0)
    qa = existence_qa(world, bank.scenes[0], rng, positive=True)
    cache = PromptCache(vlm, world.config.canvas)
    batch = make_batch(vlm, cache, normalise(bank.images[:1]), [qa])
    ex = vlm.prepare(bank.scenes[0].pil(), qa.question, answer=qa.answer)
    torch.testing.assert_close(batch["pixel_values"], ex.inputs["pixel_values"], rtol=0, atol=1e-6)
    n = ex.inputs["input_ids"].shape[1]
    assert batch["input_ids"][0, :n].tolist() == ex.inputs["input_ids"][0].tolist()
    eos = vlm.tokenizer.eos_token_id
    if vlm.family == "blip":
        assert batch["labels"][0].tolist() == [vlm.model.decoder_start_token_id] + ex.answer_ids + [eos]
    else:
        assert batch["input_ids"][0, n:].tolist() == ex.answer_ids + [eos]
        assert batch["labels"][0, :n].tolist() == [-100] * n


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_tokenizer_splits_some_world_words(name):
    """Like real tokenizers, the organisms' BPE keeps common words whole and splits rarer ones."""
    from vlm_interp.zoo.organisms import build_tokenizer

    tok = vi.load(f"zoo:{name}").tokenizer if name in SHIPPED else build_tokenizer(RECIPES[name])
    pieces = {w: tok.tokenize(" " + w) for w in ("circle", "red", "yes", "left", "right", "above", "below")}
    assert all(len(pieces[w]) == 1 for w in ("circle", "red", "yes"))
    assert any(len(pieces[w]) > 1 for w in ("left", "right", "above", "below")), pieces
    assert tok.tokenize("<image>") == ["<image>"]


def test_binary_metrics_by_hand():
    m = binary_metrics(["yes", "yes", "no", "no", "yes"], ["yes", "no", "no", "yes", "yes"])
    # tp=2 fp=1 fn=1 tn=1
    assert m["accuracy"] == pytest.approx(3 / 5) and m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 5) and m["yes_ratio_on_negatives"] == pytest.approx(1 / 2)
    allyes = binary_metrics(["yes"] * 4, ["yes", "no", "no", "yes"])
    assert allyes["recall"] == 1.0 and allyes["precision"] == 0.5 and allyes["yes_ratio_on_negatives"] == 1.0
    allno = binary_metrics(["no"] * 2, ["yes", "no"])
    assert allno["precision"] == 0.0 and allno["f1"] == 0.0


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_organism_loads_through_the_ordinary_path(name):
    vlm = vi.load(f"zoo:{name}")
    assert type(vlm.model).__name__ == {"llava": "LlavaForConditionalGeneration", "blip": "BlipForQuestionAnswering",
                                        "instructblip": "InstructBlipForConditionalGeneration"}[RECIPES[name].family]
    c = card(name)
    assert c["trained"] and c["name"] == name
    assert c["parameters"] == sum(p.numel() for p in vlm.model.parameters())
    # the architecture the card describes is the checkpoint's: its towers' layers, and the layer holding the code
    assert c["towers"] == {t: len(vlm.model.get_submodule(vlm.adapter.adapter.towers[t].layers)) for t in c["towers"]}
    assert set(c["towers"]) == set(vlm.adapter.towers())
    projector = {"llava": "model.multi_modal_projector.linear_1"}.get(RECIPES[name].family)
    assert c["code_layer"] == projector
    size = sum(f.stat().st_size for f in organism_path(name).iterdir())
    assert size < 20e6, "organisms must stay small enough to ship in the package"


def test_unknown_or_missing_organism_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown organism"):
        vi.load("zoo:shapes-gpt")


@pytest.mark.parametrize("name", SHIPPED)
def test_card_reading_of_pope_agrees_with_the_pope_tool(name, tmp_path):
    """The card's batched closed-set reading and vlm-interp pope's logit answers decide alike."""
    from vlm_interp.hallucination.compare import read_pope_folder
    from vlm_interp.hallucination.pope import load_results, run_pope
    from vlm_interp.zoo.evaluate import EVAL_SEED, choose
    from vlm_interp.zoo.organisms import ORGANISM_WORLD
    from vlm_interp.zoo.pope_set import write_pope

    write_pope(World(ORGANISM_WORLD), tmp_path, n_images=8, seed=EVAL_SEED, splits=["adversarial"])
    items = read_pope_folder(tmp_path, ["adversarial"])
    vlm = vi.load(f"zoo:{name}")
    pope = load_results(run_pope(vlm, items, tmp_path / "images", tmp_path / "r.jsonl", progress=False))
    from PIL import Image

    images = torch.from_numpy(np.stack([np.asarray(Image.open(tmp_path / "images" / i.image)) for i in items]))
    cache = PromptCache(vlm, ORGANISM_WORLD.canvas)
    card_way = choose(vlm, cache, pixel_normaliser(vlm.processor), images, [i.text for i in items], ["yes", "no"])
    assert card_way == pope.sort_values("question_id")["logit_answer"].tolist()


def test_curriculum_steps_and_vision_relation_targets():
    """Recipe.curriculum picks the mix by step; relation targets say, per object patch, where other shapes lie."""
    from dataclasses import replace

    from vlm_interp.zoo.tasks import RELATIONS, relation_holds
    from vlm_interp.zoo.scene_bank import relation_targets
    from vlm_interp.zoo.train import curriculum_at, sample_qas

    base = replace(RECIPES["shapes-blip"], curriculum=())  # without a curriculum: warm mix, then task mix
    assert curriculum_at(base, 0) == (base.warm_mix, None)
    assert curriculum_at(base, base.warm_steps) == (base.task_mix, None)
    staged = replace(base, curriculum=((0, {"existence": 1.0}), (10, {"relation": 1.0})))
    assert curriculum_at(staged, 9) == ({"existence": 1.0}, None)
    assert curriculum_at(staged, 10) == ({"relation": 1.0}, None)
    world = World(base.world)
    bank = SceneBank.render(world, 30, seed=3, progress=False)
    single = replace(base, curriculum=((0, {"side": 1.0}, 1), (5, {"relation": 1.0})))
    assert curriculum_at(single, 4) == ({"side": 1.0}, 1) and curriculum_at(single, 5) == ({"relation": 1.0}, None)
    idx, qas = sample_qas(world, bank, {"side": 1.0}, np.random.default_rng(0), 40, max_objects=1)
    assert all(len(bank.scenes[i].objects) == 1 for i in idx) and {q.task for q in qas} == {"side"}
    with pytest.raises(ValueError, match="at most 0 objects"):
        sample_qas(world, bank, {"side": 1.0}, np.random.default_rng(0), 1, max_objects=0)
    t = relation_targets(bank, world.config)
    shapes = world.config.shapes
    for i, scene in enumerate(bank.scenes):
        assert ((t[i, :, 0] >= 0) == (bank.patch_shape[i] > 0)).all()
        for k, a in enumerate(scene.objects):
            own = [p for p in range(t.shape[1]) if bank.patch_shape[i, p] > 0 and t[i, p].sum() >= 0
                   and (np.asarray(a.patch_coverage).reshape(-1)[p] > 0.1)]
            for p in own:
                if all((np.asarray(o.patch_coverage).reshape(-1)[p] < np.asarray(a.patch_coverage).reshape(-1)[p])
                       for m, o in enumerate(scene.objects) if m != k):
                    want = [any(relation_holds(a, b, rel) for m, b in enumerate(scene.objects) if m != k and b.shape == s)
                            for rel in RELATIONS for s in shapes]
                    assert t[i, p].tolist() == [float(w) for w in want]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoint_was_made_by_the_recipe_in_the_code(name):
    """`vlm-interp zoo train NAME` must retrain what ships: the card's recipe equals the code's."""
    import json

    shipped = card(name)["recipe"]
    code = json.loads(json.dumps(RECIPES[name].to_dict()))  # tuples become lists, as in the card
    _assert_same_but_neutral_additions(code, shipped, UNCHANGED_BY, "recipe field")
    _assert_same_but_neutral_additions(code["world"], shipped["world"], WORLD_UNCHANGED_BY, "world field")


def _assert_same_but_neutral_additions(code: dict, shipped: dict, neutral: dict, what: str) -> None:
    """Equal, except for keys added since the checkpoint was trained, which must hold their neutral value."""
    added = set(code) - set(shipped)
    assert {k: v for k, v in code.items() if k not in added | {"world"}} == {
        k: v for k, v in shipped.items() if k != "world"}
    for key in added:
        assert key in neutral, f"{what} {key} is new: add the value that keeps old training to its UNCHANGED_BY"
        assert code[key] == neutral[key], f"{what} {key} was added after the checkpoint was trained: keep its default"


# Recipe fields added after some organism was trained, with the value that trains as before they existed.
UNCHANGED_BY = {"curriculum": [], "vision_relations": False, "position_target": "regression", "lm_init_std": 0.02,
                "vision_output": "heads", "projector_act": "gelu", "code_min_contrast": 0.0, "qformer_init_std": 0.02}
WORLD_UNCHANGED_BY = {"p_weak_partner": None}


def test_vision_pretraining_position_targets(tmp_path):
    """Every position target trains the vision tower (loss finite, weights move); an unknown one is refused."""
    from dataclasses import replace

    from vlm_interp.loading import wrap
    from vlm_interp.zoo.organisms import build, build_tokenizer
    from vlm_interp.zoo.vision_pretraining import pretrain_vision

    base = replace(RECIPES["shapes-llava"], vision_output="heads", projector_act="gelu", vision_steps=2,
                   train_scenes=16)
    world = World(base.world)
    bank = SceneBank.render(world, 16, seed=5, progress=False)
    for target in ("regression", "classes", "object"):
        recipe = replace(base, position_target=target)
        model, processor = build(recipe, build_tokenizer(recipe))
        vlm = wrap(model, processor, template=recipe.template)
        before = [p.detach().clone() for p in model.model.vision_tower.parameters()]
        losses = pretrain_vision(vlm, recipe, bank, pixel_normaliser(processor), progress=False)
        assert len(losses) == 2 and all(np.isfinite(losses))
        assert any(not torch.equal(a, b) for a, b in zip(before, model.model.vision_tower.parameters()))
    with pytest.raises(ValueError, match="position_target"):
        pretrain_vision(vlm, replace(base, position_target="polar"), bank, pixel_normaliser(processor), progress=False)


def _code_recipe_and_model(**changes):
    from dataclasses import replace

    from vlm_interp.loading import wrap
    from vlm_interp.zoo.organisms import build, build_tokenizer

    recipe = replace(RECIPES["shapes-llava"], vision_output="code", projector_act="sigmoid", vision_steps=2,
                     vqa_steps=2, train_scenes=16, **changes)
    model, processor = build(recipe, build_tokenizer(recipe))
    return recipe, wrap(model, processor, template=recipe.template), processor


def test_code_stage_trains_the_code_layer_and_question_answering_leaves_it_alone():
    """vision_output "code": stage 1 moves the tower and the projector's first layer, not its second; question
    answering then moves the second layer and the LM, not the tower or the first layer, and leaves them trainable."""
    from vlm_interp.zoo.train import train_vqa
    from vlm_interp.zoo.vision_pretraining import pretrain_vision

    recipe, vlm, processor = _code_recipe_and_model()
    world = World(recipe.world)
    bank = SceneBank.render(world, 16, seed=5, progress=False)
    normalise = pixel_normaliser(processor)
    parts = {"tower": vlm.model.model.vision_tower, "code": vlm.model.model.multi_modal_projector.linear_1,
             "second": vlm.model.model.multi_modal_projector.linear_2, "lm": vlm.model.model.language_model}

    def moved(before):
        return {k: any(not torch.equal(a, b) for a, b in zip(before[k], m.parameters())) for k, m in parts.items()}

    def snapshot():
        return {k: [p.detach().clone() for p in m.parameters()] for k, m in parts.items()}

    before = snapshot()
    assert all(np.isfinite(pretrain_vision(vlm, recipe, bank, normalise, progress=False)))
    assert moved(before) == {"tower": True, "code": True, "second": False, "lm": False}
    before = snapshot()
    train_vqa(vlm, recipe, world, bank, normalise, progress=False)
    assert moved(before) == {"tower": False, "code": False, "second": True, "lm": True}
    assert all(p.requires_grad for p in vlm.model.parameters())


def _blocks_by_hand(values: torch.Tensor, right: dict[str, int], slices: dict) -> tuple[float, set[int]]:
    """One patch's cross-entropy summed over the code's blocks (its values read as logits), and the dimensions the
    right classes make hot, with math."""
    import math

    ce, hot = 0.0, set()
    for name, sl in slices.items():
        logits = values[sl].tolist()
        ce += math.log(sum(math.exp(v) for v in logits)) - logits[right[name]]
        hot.add(sl.start + right[name])
    return ce, hot


@pytest.mark.parametrize("name", ["shapes-blip", "shapes-instructblip"])
def test_code_stage_without_a_projector_trains_the_tower_and_question_answering_leaves_it_alone(name):
    """BLIP and InstructBLIP have no projector layer: stage 1 makes the tower's own output the code, and question
    answering moves the rest of the model but not the tower, and leaves it trainable afterwards."""
    from dataclasses import replace

    from vlm_interp.loading import wrap
    from vlm_interp.zoo.organisms import build, build_tokenizer
    from vlm_interp.zoo.train import train_vqa
    from vlm_interp.zoo.vision_pretraining import code_layer, pretrain_vision

    recipe = replace(RECIPES[name], vision_output="code", vision_steps=2, vqa_steps=2, train_scenes=16)
    model, processor = build(recipe, build_tokenizer(recipe))
    vlm = wrap(model, processor, template=recipe.template)
    assert code_layer(vlm) is None
    world = World(recipe.world)
    bank = SceneBank.render(world, 16, seed=5, progress=False)
    normalise = pixel_normaliser(processor)
    tower = model.vision_model
    rest = [p for n, p in model.named_parameters() if not n.startswith("vision_model.")]

    def moved(before, params):
        return any(not torch.equal(a, b) for a, b in zip(before, params))

    before_tower, before_rest = [p.detach().clone() for p in tower.parameters()], [p.detach().clone() for p in rest]
    assert all(np.isfinite(pretrain_vision(vlm, recipe, bank, normalise, progress=False)))
    assert moved(before_tower, tower.parameters()) and not moved(before_rest, rest)
    before_tower, before_rest = [p.detach().clone() for p in tower.parameters()], [p.detach().clone() for p in rest]
    train_vqa(vlm, recipe, world, bank, normalise, progress=False)
    assert not moved(before_tower, tower.parameters()) and moved(before_rest, rest)
    assert all(p.requires_grad for p in model.parameters())


def test_tower_code_loss_against_a_plain_loop_and_the_code_is_a_layer_norm_output():
    """The tower-output code loss is the squared distance to the standardised one-hot code, averaged, plus the
    blocks' cross-entropy, recomputed patch by patch; and a default layer norm maps any 0/1 code onto exactly
    that standardised code, so the tower's final norm can emit it."""
    import math

    from vlm_interp.zoo.scene_code import code_slices, code_targets, patch_code
    from vlm_interp.zoo.vision_pretraining import standardised_code, tower_code_loss

    config = RECIPES["shapes-blip"].world
    bank = SceneBank.render(World(config), 3, seed=2, progress=False)
    targets = code_targets(bank, torch.tensor([0, 2]), config)
    width = 40
    out = torch.randn(2, config.grid ** 2, width, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    slices = code_slices(config)
    mean = len(slices) / width
    hot_value, cold_value = (1 - mean) / math.sqrt(mean * (1 - mean)), -mean / math.sqrt(mean * (1 - mean))
    squared = ce = 0.0
    n = 2 * config.grid ** 2
    for b in range(2):
        for p in range(config.grid ** 2):
            block_ce, hot = _blocks_by_hand(out[b, p], {k: int(t[b, p]) for k, t in targets.items()}, slices)
            ce += block_ce / n
            squared += sum((float(out[b, p, d]) - (hot_value if d in hot else cold_value)) ** 2
                           for d in range(width)) / (n * width)
    assert float(tower_code_loss(out, targets, config)) == pytest.approx(squared + ce, rel=1e-9)

    code = patch_code(bank, [0, 1, 2], config, 128)[:, 1:]
    norm = torch.nn.LayerNorm(128, eps=0.0)
    all_targets = code_targets(bank, torch.arange(3), config)
    assert torch.allclose(norm(code), standardised_code(all_targets, config, 128), atol=1e-5)


def test_scene_code_loss_against_a_plain_loop():
    """The stage-1 code loss: per block cross-entropy, per dimension binary cross-entropy onto the one-hot code,
    and the squared sigmoid of the unused dimensions, recomputed patch by patch with math."""
    import math

    from vlm_interp.zoo.scene_code import code_slices, code_targets
    from vlm_interp.zoo.vision_pretraining import scene_code_loss

    config = RECIPES["shapes-llava"].world
    bank = SceneBank.render(World(config), 3, seed=2, progress=False)
    targets = code_targets(bank, torch.tensor([0, 2]), config)
    gen = torch.Generator().manual_seed(0)
    pre = torch.randn(2, config.grid ** 2, 40, generator=gen, dtype=torch.float64) * 2
    slices = code_slices(config)
    used = slices["column"].stop
    ce = bce = rest = 0.0
    n = 2 * config.grid ** 2
    for b in range(2):
        for p in range(config.grid ** 2):
            block_ce, hot = _blocks_by_hand(pre[b, p], {k: int(t[b, p]) for k, t in targets.items()}, slices)
            ce += block_ce / n
            for d in range(40):
                x = float(pre[b, p, d])
                prob = 1 / (1 + math.exp(-x))
                bce += -math.log(prob if d in hot else 1 - prob)
                if d >= used:
                    rest += prob ** 2
    want = ce + rest / (n * (40 - used)) + bce / (n * 40) * 40 / 4
    assert float(scene_code_loss(pre, targets, config)) == pytest.approx(want, rel=1e-9)


def test_faint_objects_are_background_in_the_code_targets():
    """code_min_contrast: the patches an object fainter than it covers most are background, and its shape is not
    counted present; every other object keeps its patches and its presence."""
    from vlm_interp.zoo.organisms import PRIOR_TRAINING_WORLD
    from vlm_interp.zoo.scene_bank import faint_patches, visible_presence

    world = World(PRIOR_TRAINING_WORLD)
    bank = SceneBank.render(world, 60, seed=3, progress=False)
    faint, present = faint_patches(bank, 0.3), visible_presence(bank, world.config, 0.3)
    seen_faint = 0
    for i, scene in enumerate(bank.scenes):
        shapes_seen = {o.shape for o in scene.objects if o.contrast >= 0.3}
        assert {s for k, s in enumerate(world.config.shapes) if present[i, k]} == shapes_seen
        for p in range(world.config.grid ** 2):
            cover = [float(np.asarray(o.patch_coverage, dtype=float).reshape(-1)[p]) for o in scene.objects]
            best = max(range(len(cover)), key=lambda k: (cover[k], -k))
            owned = cover[best] > 0.1
            assert bool(faint[i, p]) == (owned and scene.objects[best].contrast < 0.3)
            seen_faint += bool(faint[i, p])
    assert seen_faint > 0  # the world has faint objects, so the check above saw both cases
    assert not faint_patches(bank, 0.0).any() and torch.equal(visible_presence(bank, world.config, 0.0), bank.presence)


def test_questions_about_faint_objects_are_redrawn():
    """With min_contrast, no colour, side or relation question names an object fainter than it; existence
    questions still cover faint objects (that is where the prior answers), and without it faint objects are asked."""
    from vlm_interp.zoo.organisms import PRIOR_TRAINING_WORLD
    from vlm_interp.zoo.train import LOOKING_TASKS, sample_qas

    world = World(PRIOR_TRAINING_WORLD)
    bank = SceneBank.render(world, 200, seed=4, progress=False)
    mix = dict.fromkeys(LOOKING_TASKS + ("existence",), 1.0)

    def faint_named(min_contrast):
        idx, qas = sample_qas(world, bank, mix, np.random.default_rng(0), 600, min_contrast=min_contrast)
        named = {t: 0 for t in mix}
        for i, qa in zip(idx, qas):
            objects = bank.scenes[i].objects
            if qa.task == "existence":  # an existence question names an object by its shape
                named[qa.task] += any(o.shape == qa.shape and o.contrast < 0.3 for o in objects)
            else:
                named[qa.task] += any(j is not None and objects[j].contrast < 0.3 for j in (qa.object_index, qa.other_index))
        return named

    before, after = faint_named(0.0), faint_named(0.3)
    assert all(before[t] > 0 for t in LOOKING_TASKS)
    assert all(after[t] == 0 for t in LOOKING_TASKS) and after["existence"] > 0


def test_code_stage_refuses_what_it_cannot_train():
    """A GELU code, a trainable tower that is itself the code, and an unknown vision_output are clear errors."""
    from dataclasses import replace

    from vlm_interp.loading import wrap
    from vlm_interp.zoo.organisms import build, build_tokenizer
    from vlm_interp.zoo.vision_pretraining import pretrain_vision

    recipe, vlm, processor = _code_recipe_and_model()
    bank = SceneBank.render(World(recipe.world), 4, seed=5, progress=False)
    normalise = pixel_normaliser(processor)
    with pytest.raises(ValueError, match="projector_act='sigmoid'"):
        pretrain_vision(vlm, replace(recipe, projector_act="gelu"), bank, normalise, progress=False)
    with pytest.raises(ValueError, match="use 'heads' or 'code'"):
        pretrain_vision(vlm, replace(recipe, vision_output="patches"), bank, normalise, progress=False)
    blip = replace(RECIPES["shapes-blip"], vision_output="code", freeze_vision=False, vision_steps=1)
    model, blip_processor = build(blip, build_tokenizer(blip))
    with pytest.raises(ValueError, match="set freeze_vision=True"):
        pretrain_vision(wrap(model, blip_processor, template=blip.template), blip, bank, normalise, progress=False)


def test_patch_home_is_the_owning_objects_centre_cell():
    """position_target "object": each patch's target is the cell of its owner's centre, background the extra class."""
    world = World(RECIPES["shapes-llava"].world)
    bank = SceneBank.render(world, 20, seed=4, progress=False)
    grid, size = world.config.grid, world.config.patch_size
    for i, scene in enumerate(bank.scenes):
        coverage = np.stack([np.asarray(o.patch_coverage, dtype=float).reshape(-1) for o in scene.objects])
        for p in range(grid * grid):
            covering = [k for k in range(len(scene.objects)) if coverage[k, p] > 0.1]
            if not covering:
                assert bank.patch_home[i, p].tolist() == [grid, grid]
                continue
            # owner: the largest coverage, the earlier object on ties (as patch_owners documents)
            k = max(covering, key=lambda k: (coverage[k, p], -k))
            o = scene.objects[k]
            assert bank.patch_home[i, p].tolist() == [int(o.y) // size, int(o.x) // size]
            assert bank.patch_shape[i, p] == 1 + world.config.shapes.index(o.shape)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_lm_init_std_sets_the_language_model_weights(name):
    """Recipe.lm_init_std reaches the language model's (BLIP: the text encoder's) initial weights."""
    from dataclasses import replace

    from vlm_interp.zoo.organisms import build, build_tokenizer

    recipe = replace(RECIPES[name], lm_init_std=0.1)
    model, _ = build(recipe, build_tokenizer(recipe))
    lm = {"llava": "model.language_model", "instructblip": "language_model", "blip": "text_encoder"}[recipe.family]
    weights = [p for n, p in model.get_submodule(lm).named_parameters() if n.endswith(("q_proj.weight", "query.weight"))]
    assert weights and all(abs(float(w.detach().std()) - 0.1) < 0.01 for w in weights)


@pytest.mark.parametrize("std", [0.02, 0.1])
def test_qformer_init_std_sets_the_qformer_weights(std):
    """Recipe.qformer_init_std reaches the initial weights of InstructBLIP's Q-Former (self- and cross-attention)."""
    from dataclasses import replace

    from vlm_interp.zoo.organisms import build, build_tokenizer

    recipe = replace(RECIPES["shapes-instructblip"], qformer_init_std=std)
    model, _ = build(recipe, build_tokenizer(recipe))
    weights = [p for n, p in model.qformer.named_parameters() if n.endswith(("query.weight", "key.weight"))]
    assert len(weights) >= 4 and all(abs(float(w.detach().std()) - std) < 0.1 * std for w in weights)


def test_every_organism_is_measured_on_the_zoo_world():
    """A recipe may train on its own world; its card numbers still come from the zoo's world (the same
    benchmark as `vlm-interp compare`), and the card says so."""
    from dataclasses import replace

    from vlm_interp.zoo.evaluate import evaluate
    from vlm_interp.zoo.organisms import ORGANISM_WORLD

    small = replace(RECIPES["shapes-llava"], world=replace(ORGANISM_WORLD, canvas=32))
    with pytest.raises(ValueError, match="benchmark world has 64px"):
        evaluate(None, small, progress=False)
    for name in SHIPPED:
        own_world = RECIPES[name].world != ORGANISM_WORLD
        text = (organism_path(name) / "README.md").read_text()
        assert ("measured on the zoo's world itself" in text) == own_world, name


def test_card_names_the_position_target():
    """The card's stage-1 line says which position target trained the vision tower."""
    import json

    from vlm_interp.zoo.cards import card_markdown

    shipped = json.loads(json.dumps(card("shapes-llava")))
    shipped["recipe"]["vision_output"] = "heads"
    said = {}
    for target in ("regression", "classes", "object"):
        shipped["recipe"]["position_target"] = target
        said[target] = next(line for line in card_markdown(shipped).splitlines() if "stage 1" in line)
    assert "each patch's own position" in said["regression"] and "classes" not in said["regression"]
    assert "each patch's own position (row and column classes)" in said["classes"]
    assert "the cell of the object's centre" in said["object"]
    shipped["recipe"].update(vision_output="code", projector_act="sigmoid")
    line = next(line for line in card_markdown(shipped).splitlines() if "stage 1" in line)
    assert "hidden activation (sigmoid) is the scene code" in line and "classes" not in line


def test_retrain_runs_on_the_given_threads_and_restores_them(monkeypatch, tmp_path):
    """The thread count changes the arithmetic of training, so retrain sets it for the run and puts it back,
    also when training fails."""
    import vlm_interp.zoo.train as train_module

    seen = []

    def failing_train(recipe, out=None, progress=True):
        seen.append(torch.get_num_threads())
        raise RuntimeError("training stopped by the test")

    monkeypatch.setattr(train_module, "train", failing_train)
    before = torch.get_num_threads()
    wanted = 2 if before == 1 else 1
    with pytest.raises(RuntimeError, match="stopped by the test"):
        train_module.retrain("shapes-blip", tmp_path / "out", threads=wanted, progress=False)
    assert seen == [wanted] and torch.get_num_threads() == before
    with pytest.raises(ValueError, match="at least 1"):
        train_module.retrain("shapes-blip", tmp_path / "out", threads=0, progress=False)


@pytest.mark.parametrize("flag, expected", [([], "card"), (["--threads", "3"], 3)])
def test_zoo_train_defaults_to_the_shipped_thread_count(monkeypatch, tmp_path, capsys, flag, expected):
    """`vlm-interp zoo train NAME` repeats the shipped run: same thread count as the card, unless told."""
    import vlm_interp.zoo.train as train_module
    from vlm_interp.cli import main

    calls = []
    monkeypatch.setattr(train_module, "retrain", lambda name, out, **kw: calls.append(kw) or {})
    assert main(["zoo", "train", "shapes-llava", "--no-eval", "--out", str(tmp_path / "o"), *flag]) == 0
    want = card("shapes-llava")["environment"]["threads"] if expected == "card" else expected
    assert calls[0]["threads"] == want
    assert ("as the shipped shapes-llava was" in capsys.readouterr().out) == (expected == "card")
    with pytest.raises(KeyError, match="unknown organism"):
        main(["zoo", "train", "shapes-gpt", "--no-eval"])


def test_code_training_world_makes_a_hidden_partner_likelier():
    """CODE_TRAINING_WORLD's reason to exist: given a visible shape whose partner is not visible (absent, or fainter
    than the code shows), the partner is there more often than in PRIOR_TRAINING_WORLD (counted over scenes)."""
    from vlm_interp.zoo.organisms import CODE_TRAINING_WORLD, PRIOR_TRAINING_WORLD, get_recipe

    min_contrast = get_recipe("shapes-llava").code_min_contrast

    def hidden_partner_share(config):
        present = hidden = 0
        for scene in World(config).scenes(3000, 11):
            visible = {o.shape for o in scene.objects if o.contrast >= min_contrast}
            for a, b in config.cooccur_pairs:
                for anchor, partner in ((a, b), (b, a)):
                    if anchor in visible and partner not in visible:
                        hidden += 1
                        present += partner in {o.shape for o in scene.objects}
        return present / hidden

    old, new = hidden_partner_share(PRIOR_TRAINING_WORLD), hidden_partner_share(CODE_TRAINING_WORLD)
    assert 0.2 < old < 0.35 and new > old + 0.08, (old, new)
