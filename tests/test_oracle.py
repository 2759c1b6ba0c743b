"""Oracle image features: the per-patch code matches the scene graph, and the hook feeds it to the projector."""

from __future__ import annotations

import pytest
import torch

import vlm_interp as vi
from vlm_interp.zoo import RECIPES
from vlm_interp.zoo.oracle import OracleVision, patch_code
from vlm_interp.zoo.shapes import World
from vlm_interp.zoo.batches import pixel_normaliser
from vlm_interp.zoo.scene_bank import SceneBank, patch_owners

CONFIG = RECIPES["shapes-llava"].world


@pytest.fixture(scope="module")
def bank() -> SceneBank:
    return SceneBank.render(World(CONFIG), 6, seed=3, progress=False)


def test_patch_code_matches_a_plain_loop_over_the_scene_graph(bank):
    code = patch_code(bank, [4, 1], CONFIG, 128)
    grid, n_shapes, n_colors = CONFIG.grid, len(CONFIG.shapes) + 1, len(CONFIG.colors) + 1
    assert code.shape == (2, 1 + grid * grid, 128)
    assert not code[:, 0].any()
    for row, i in enumerate([4, 1]):
        scene = bank.scenes[i]
        owner = patch_owners(scene)
        for p in range(grid * grid):
            expected = torch.zeros(128)
            obj = scene.objects[owner[p]] if owner[p] >= 0 else None
            expected[0 if obj is None else 1 + CONFIG.shapes.index(obj.shape)] = 1
            expected[n_shapes + (0 if obj is None else 1 + CONFIG.colors.index(obj.color))] = 1
            expected[n_shapes + n_colors + p // grid] = 1
            expected[n_shapes + n_colors + grid + p % grid] = 1
            assert torch.equal(code[row, 1 + p], expected), (i, p)


def test_patch_code_refuses_a_tower_too_narrow(bank):
    with pytest.raises(ValueError, match="dimensions"):
        patch_code(bank, [0], CONFIG, 16)


def test_oracle_hook_feeds_the_code_to_the_projector_and_is_removed(bank):
    vlm = vi.load("zoo:shapes-llava")
    llava = vlm.model.model
    pixels = pixel_normaliser(vlm.processor)(bank.images[:2])
    kwargs = dict(vision_feature_layer=-1, vision_feature_select_strategy="default")
    with torch.no_grad():
        own = torch.stack(llava.get_image_features(pixels, **kwargs).pooler_output)
        code = patch_code(bank, [0, 1], CONFIG, 128)
        with OracleVision(vlm) as oracle:
            oracle.code = code
            fed = torch.stack(llava.get_image_features(pixels, **kwargs).pooler_output)
        after = torch.stack(llava.get_image_features(pixels, **kwargs).pooler_output)
        expected = llava.multi_modal_projector(code[:, 1:])
    torch.testing.assert_close(fed, expected)
    assert not torch.allclose(own, expected)
    torch.testing.assert_close(after, own)
    layer = vlm.model.get_submodule(vlm.adapter.module_path("vision", "hidden", oracle.site.layer))
    hooks_before = dict(layer._forward_hooks)  # transformers keeps its own hook for recording hidden states
    with pytest.raises(ValueError, match="set .code"):
        with OracleVision(vlm) as oracle:
            oracle.code = code[:1]  # one image's code for a batch of two
            llava.get_image_features(pixels, **kwargs)
    assert dict(layer._forward_hooks) == hooks_before, "the hook must be removed also when the forward fails"


def test_oracle_refuses_other_families():
    with pytest.raises(ValueError, match="names no such projector"):
        OracleVision(vi.load("zoo:shapes-blip"))


def test_oracle_binding_script_writes_its_result(tmp_path, monkeypatch):
    """scripts/oracle_binding.py runs end to end on a few steps and writes one JSON, nothing half-written."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "oracle_binding.py"
    spec = importlib.util.spec_from_file_location("oracle_binding", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["oracle_binding.py", "--features", "oracle", "--steps", "2", "--scenes", "64",
                                      "--held-out", "40", "--out", str(tmp_path)])
    threads = torch.get_num_threads()
    try:
        module.main()
    finally:
        torch.set_num_threads(threads)  # the script sets its own thread count
    assert [p.name for p in tmp_path.iterdir()] == ["oracle_binding-oracle.json"]
    result = json.loads((tmp_path / "oracle_binding-oracle.json").read_text())
    assert result["features"] == "oracle" and result["steps"] == 2 and result["questions"] > 0
    assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["shortcut_accuracy"] <= 1.0
