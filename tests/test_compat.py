"""The declared transformers range, and the one module that knows transformers-version details."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from packaging.version import Version

from vlm_interp import compat

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_declares_the_tested_range():
    """pyproject.toml's transformers floor is compat.TESTED's floor, and its ceiling admits the tested ceiling's
    patch releases only."""
    text = (ROOT / "pyproject.toml").read_text()
    spec = re.search(r'"transformers>=([\d.]+),<([\d.]+)"', text)
    assert spec, "pyproject.toml must declare transformers>=FLOOR,<NEXT_MINOR"
    floor, below = (Version(v) for v in spec.groups())
    tested_floor, tested_ceiling = (Version(v) for v in compat.TESTED)
    assert floor == tested_floor
    assert below == Version(f"{tested_ceiling.major}.{tested_ceiling.minor + 1}")
    assert tested_floor <= compat.VERSION < below, f"this environment has transformers {compat.VERSION}"


def test_no_module_but_compat_touches_private_transformers_names():
    private = re.compile(r"transformers\.models\.|from transformers\.\w+ import _|\._attn_implementation|"
                         r"past_key_values|modeling_\w+ import")
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "vlm_interp").rglob("*.py")
                 if p.name != "compat.py" and private.search(p.read_text())]
    assert offenders == []


@pytest.mark.parametrize("version, warns", [("5.99.0", True), ("4.57.0", True), ("5.24.3", False)])
def test_versions_outside_the_tested_range_warn(monkeypatch, version, warns):
    monkeypatch.setattr(compat, "VERSION", Version(version))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        message = compat.check_version()
    assert (message is not None) == warns
    assert len([w for w in caught if issubclass(w.category, compat.UntestedTransformersWarning)]) == int(warns)


def test_caches_are_found_by_type_under_any_keyword():
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.update(torch.ones(1, 2, 5, 4), torch.zeros(1, 2, 5, 4), 0)
    assert compat.find_cache({"x": 1, "whatever_name": cache}) == ("whatever_name", cache)
    assert compat.find_cache({"past_key_values": None}) == ("past_key_values", None)
    assert compat.find_cache({"x": 1}) == (None, None)
    with pytest.raises(compat.CompatibilityError, match="2 key/value caches"):
        compat.find_cache({"a": cache, "b": cache})
    assert compat.cache_length(cache) == 5 and compat.cache_length(None) == 0
    (keys, values), = compat.cache_entries(cache)
    assert torch.equal(keys, torch.ones(1, 2, 5, 4)) and torch.equal(values, torch.zeros(1, 2, 5, 4))
    with pytest.raises(compat.CompatibilityError, match="length"):
        compat.cache_length(object())


def test_llava_next_geometry_helpers_agree_with_a_hand_worked_grid():
    """A 30x60 image on 2x2-tile pinpoints of side 10 (grid 2): the best fit is 1 tile high, 2 wide; unpadding a
    2x4 feature map of a 1:2 image removes nothing, of a 1:4 image removes the padded rows."""
    assert compat.anyres_grid_shape((30, 60), [[10, 20], [20, 10], [20, 20]], 10) == (1, 2)
    assert tuple(compat.unpad_image(torch.zeros(1, 2, 4), torch.tensor((30, 60))).shape) == (1, 2, 4)
    assert tuple(compat.unpad_image(torch.zeros(1, 4, 4), torch.tensor((10, 40))).shape) == (1, 2, 4)


@pytest.mark.parametrize("version, caps, uncached_ok", [("5.13.0", False, False), ("5.18.0", False, True),
                                                         ("5.22.0", False, True), ("5.23.0", True, True)])
def test_what_paligemma_does_by_release(monkeypatch, version, caps, uncached_ok):
    """PaliGemma caps its final logits from 5.23 and types tokens generated without the cache from 5.18 (read in the
    releases' modeling_paligemma.py); other classes are not listed and apply what their adapter states."""
    monkeypatch.setattr(compat, "VERSION", Version(version))
    assert compat.applies_final_softcap("PaliGemmaForConditionalGeneration") == caps
    assert compat.applies_final_softcap("Gemma3ForConditionalGeneration")
    model = type("PaliGemmaForConditionalGeneration", (), {})()
    assert (compat.uncached_generation_problem(model) == "") == uncached_ok
