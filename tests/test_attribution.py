"""Gradient estimates of tracing grids against independent computations and exact patching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from vlm_interp.corruptions import CorruptionError, applied, noise
from vlm_interp.errors import SiteError
from vlm_interp.tracing import Trace, agreement, agreement_cells, attribution_patching, integrated_patching, trace

from conftest import QUESTION

# (tower, component, tokens) per family: every tower and a head component of each family
CASES = {
    "llava": [("lm", "input", "each"), ("lm", "hidden", "each"), ("lm", "attn", "each"),
              ("lm", "head", ["image", "last"]), ("vision", "mlp", "each")],
    "llava_next": [("lm", "mlp", ["image", "question", "last"]), ("lm", "head", ["last"]), ("vision", "attn", "each")],
    "blip": [("text", "xattn", "each"), ("text", "xattn_head", ["question"]), ("lm", "mlp", "each"),
             ("vision", "attn", "each")],
    "blip2": [("qformer", "xattn", "each"), ("qformer", "xattn_head", ["image"]), ("lm", "attn", "each")],
    "instructblip": [("qformer", "attn", "each"), ("lm", "head", ["image"]), ("lm", "mlp", "each"),
                     ("qformer", "input", ["image"])],
    # tiled vision towers: positions run over the tiles in turn
    "idefics3": [("lm", "attn", ["image", "last"]), ("vision", "mlp", {"tile 0": [10, 15], "global": [69]}),
                 ("vision", "head", {"tile 3": [63]})],
    "smolvlm": [("lm", "mlp", ["image", "last"]), ("vision", "attn", {"tile 1": [16, 20]})],
    "internvl": [("lm", "head", ["image", "last"]), ("vision", "mlp", {"cls": [0, 68], "patches": [11, 74]}),
                 ("vision", "input", {"tile 2": [40]})],
    "mllama": [("lm", "xattn", ["question", "last"]), ("lm", "xattn_head", ["last"]),
               ("vision_global", "mlp", {"tile 0": [11, 16]}), ("vision", "attn", {"cls": [0, 24]})],
    "llava_onevision": [("lm", "mlp", ["image", "question", "last"]), ("vision", "attn", "each")],
    "gemma3": [("lm", "attn", "each"), ("lm", "head", ["image", "last"]), ("vision", "mlp", ["image"])],
    "paligemma": [("lm", "mlp", "each"), ("lm", "head", ["last"]), ("vision", "hidden", ["image"])],
    "qwen2_vl": [("lm", "attn", ["image", "last"]), ("vision", "hidden", ["image"])],
    "qwen2_5_vl": [("lm", "hidden", ["image", "question", "last"]), ("lm", "head", ["image", "last"]),
                   ("vision", "mlp", {f"patch {p}": [p] for p in (0, 13, 37, 63)}), ("vision", "head", ["image"])],
    "qwen3_vl": [("lm", "input", ["image", "question", "last"]), ("vision", "attn", ["image"])],
}


def _hook_store(module, kind: str, store: list):
    """A plain torch hook that keeps the module's primary tensor (output, or first input) as it flows."""
    if kind == "input":
        return module.register_forward_pre_hook(
            lambda m, a, kw: store.append(a[0] if a else kw["hidden_states"]), with_kwargs=True)
    return module.register_forward_hook(lambda m, a, o: store.append(o if torch.is_tensor(o) else o[0]))


def plain_gradient_estimate(vlm, clean, corrupt, tower, component, layer, answer_id):
    """Per (position, channel) (clean - corrupt) * d P(answer) / d activation, by plain hooks and autograd."""
    rel, kind = vlm.adapter.adapter.towers[tower].components[component]
    module = vlm.model.get_submodule(vlm.adapter.module_path(tower, component, layer))
    clean_store, bad_store = [], []
    handle = _hook_store(module, kind, clean_store)
    try:
        with torch.no_grad(), applied(vlm, clean):
            vlm.logits(clean.inputs)
    finally:
        handle.remove()
    handle = _hook_store(module, kind, bad_store)
    try:
        with torch.enable_grad(), applied(vlm, corrupt):
            logits = vlm.logits(corrupt.inputs)
            prob = torch.softmax(logits[0, vlm.answer_start(corrupt)].float(), -1)[answer_id]
            (grad,) = torch.autograd.grad(prob, [bad_store[0]], allow_unused=True)
    finally:
        handle.remove()
    act = bad_store[0].detach()
    if grad is None:
        grad = torch.zeros_like(act)
    product = (clean_store[0] - act) * grad
    if vlm.adapter.folds(tower):  # a tiled tower: its positions run over the tiles in turn
        return product.reshape(-1, product.shape[-1])
    if product.dim() == 2:  # a packed tower (Qwen's vision tower): (positions, channels) already
        return product
    return product.sum(0)  # (positions, channels), summed over sub-rows (LLaVA-NeXT's crops)


def test_estimate_equals_a_plain_autograd_computation(vlm, image, other_image):
    """Every cell = corrupt score + sum over its positions (and head channels) of delta * gradient."""
    clean = vlm.prepare(image, QUESTION, answer="yes")
    corrupt = vlm.prepare(other_image, QUESTION, answer="yes")
    answer_id = vlm.encode_answer(clean, "yes")[0]
    for tower, component, tokens in CASES[vlm.family]:
        est = attribution_patching(vlm, clean, corrupt, components=[f"{tower}.{component}"], tokens=tokens)
        data = est.data.sel(component=component)
        positions = est.attrs["positions"]
        n_heads = vlm.adapter.n_heads[tower]
        for layer in vlm.adapter.layers_with(tower, component):
            product = plain_gradient_estimate(vlm, clean, corrupt, tower, component, layer, answer_id)
            width = product.shape[-1] // n_heads
            heads = data.coords["head"].values if "head" in data.dims else [None]
            for head in heads:
                cols = slice(None) if head is None else slice(head * width, (head + 1) * width)
                for k, pos in enumerate(positions):
                    cell = data.sel(layer=layer, position=k, **({} if head is None else {"head": head}))
                    effect = float(product[pos][:, cols].sum())
                    expected = est.attrs["corrupt_score"] + effect
                    assert float(cell) == pytest.approx(expected, abs=1e-10 + 1e-4 * abs(effect)), \
                        (tower, component, layer, head, k)
        assert np.nanmax(np.abs(est.indirect().values)) > 0  # the estimates are not all zero


def test_noising_direction_uses_the_clean_run_gradient(image, other_image):
    import vlm_interp as vi

    vlm = vi.load("tiny:llava")
    clean = vlm.prepare(image, QUESTION, answer="yes")
    corrupt = vlm.prepare(other_image, QUESTION, answer="yes")
    est = attribution_patching(vlm, clean, corrupt, components=["lm.mlp"], tokens="each", direction="noise")
    answer_id = vlm.encode_answer(clean, "yes")[0]
    # noising swaps the roles: the gradient is taken on the clean run and the delta is corrupt - clean
    product = plain_gradient_estimate(vlm, corrupt, clean, "lm", "mlp", 1, answer_id)
    expected = est.attrs["clean_score"] + product.sum(-1).numpy()
    assert np.allclose(est.data.sel(component="mlp", layer=1).values, expected, atol=1e-7)


def test_a_tiny_corruption_is_linear_so_the_estimate_is_exact(image):
    """With noise of 1e-4 on the image embeddings the first-order estimate equals exact patching."""
    import vlm_interp as vi

    vlm = vi.load("tiny:llava")
    clean = vlm.prepare(image, QUESTION, answer="yes")
    bad = noise(vlm, clean, scale=1e-4, tokens="image", seed=0)
    components = ["lm.hidden", "lm.attn", "lm.mlp"]
    exact = trace(vlm, clean, bad, components=components, progress=False).indirect().values
    est = attribution_patching(vlm, clean, bad, components=components).indirect().values
    assert np.abs(exact).max() > 0
    assert np.abs(est - exact).max() < 0.02 * np.abs(exact).max()
    # ten times larger noise: the second-order error grows (the estimate is only first-order)
    big = noise(vlm, clean, scale=1e-2, tokens="image", seed=0)
    exact_big = trace(vlm, clean, big, components=components, progress=False).indirect().values
    est_big = attribution_patching(vlm, clean, big, components=components).indirect().values
    assert np.abs(est_big - exact_big).max() / np.abs(exact_big).max() > np.abs(est - exact).max() / np.abs(exact).max()


def test_the_layout_is_that_of_trace(image, other_image):
    import vlm_interp as vi

    vlm = vi.load("tiny:blip2")  # Q-Former cross-attention exists on some layers only: NaN rows must match
    clean = vlm.prepare(image, QUESTION, answer="yes")
    corrupt = vlm.prepare(other_image, QUESTION, answer="yes")
    for components, tokens in ((["qformer.hidden", "qformer.xattn"], ["image"]), (["lm.head"], ["image", "last"])):
        exact = trace(vlm, clean, corrupt, components=components, tokens=tokens, progress=False)
        for est in (attribution_patching(vlm, clean, corrupt, components=components, tokens=tokens),
                    integrated_patching(vlm, clean, corrupt, components=components, tokens=tokens, steps=2,
                                        progress=False)):
            assert est.data.dims == exact.data.dims and est.data.shape == exact.data.shape
            for name, coord in exact.data.coords.items():
                assert np.array_equal(est.data.coords[name].values, coord.values), name
            assert {k: v for k, v in est.attrs.items() if k not in ("method", "steps", "ig_method")} == exact.attrs
            assert np.array_equal(np.isnan(est.data.values), np.isnan(exact.data.values))
            assert est.rr().shape == exact.rr().shape


def test_integrated_patching_is_complete_per_site(image, other_image):
    """IG over all positions of a site adds up to the exact effect of restoring the whole site."""
    import vlm_interp as vi

    vlm = vi.load("tiny:llava")
    clean = vlm.prepare(image, QUESTION, answer="yes")
    corrupt = vlm.prepare(other_image, QUESTION, answer="yes")
    components = ["lm.hidden", "lm.attn", "lm.mlp"]
    exact = trace(vlm, clean, corrupt, components=components, tokens="all", progress=False).indirect()
    scale = float(np.abs(exact.values).max())
    whole = integrated_patching(vlm, clean, corrupt, components=components, tokens="all", steps=32, progress=False)
    each = integrated_patching(vlm, clean, corrupt, components=components, tokens="each", steps=32, progress=False)
    assert np.allclose(whole.indirect().values, exact.values, atol=1e-3 * scale)
    assert np.allclose(each.indirect().sum("position").values, exact.isel(position=0).values, atol=1e-3 * scale)
    # the first-order estimate has no such guarantee; IG with many steps is closer to exact than it
    first = attribution_patching(vlm, clean, corrupt, components=components, tokens="all").indirect()
    assert np.abs(whole.indirect() - exact).max() < np.abs(first - exact).max()
    # heads: all heads of a layer together are the attention output (the projection is linear)
    heads = integrated_patching(vlm, clean, corrupt, components=["lm.head"], tokens="all", steps=32, progress=False)
    assert np.allclose(heads.indirect().sum("head").isel(component=0, position=0).values,
                       exact.sel(component="attn").isel(position=0).values, atol=1e-3 * scale)
    # the noising direction and windows of layers (interpolated together) are complete too
    for kw in ({"direction": "noise"}, {"window": 2}):
        exact_kw = trace(vlm, clean, corrupt, components=["lm.mlp"], tokens="all", progress=False, **kw)
        ig_kw = integrated_patching(vlm, clean, corrupt, components=["lm.mlp"], tokens="all", steps=32,
                                    progress=False, **kw)
        gap = np.abs(exact_kw.data.values - (exact_kw.attrs["clean_score"] if kw.get("direction") == "noise"
                                            else exact_kw.attrs["corrupt_score"])).max()
        assert gap > 0 and np.allclose(ig_kw.data.values, exact_kw.data.values, atol=1e-3 * gap), kw


def test_a_window_sums_its_single_site_estimates(image, other_image):
    import vlm_interp as vi

    vlm = vi.load("tiny:llava")
    clean = vlm.prepare(image, QUESTION, answer="yes")
    corrupt = vlm.prepare(other_image, QUESTION, answer="yes")
    single = attribution_patching(vlm, clean, corrupt, components=["lm.attn"], tokens=["image", "last"]).indirect()
    wide = attribution_patching(vlm, clean, corrupt, components=["lm.attn"], tokens=["image", "last"],
                                window=3).indirect()
    both = single.sum("layer").values  # two layers: a window of 3 around either covers both
    assert np.allclose(wide.isel(layer=0).values, both) and np.allclose(wide.isel(layer=1).values, both)


def test_integrated_patching_follows_an_in_model_noise_corruption(image):
    import vlm_interp as vi

    vlm = vi.load("tiny:instructblip")
    clean = vlm.prepare(image, QUESTION, answer="yes")
    bad = noise(vlm, clean, scale="3sd", tokens="image", seed=0)  # an edit attached by hooks, not an input
    exact = trace(vlm, clean, bad, components=["lm.hidden", "lm.mlp"], tokens="all", progress=False).indirect()
    ig = integrated_patching(vlm, clean, bad, components=["lm.hidden", "lm.mlp"], tokens="all", steps=32,
                             progress=False).indirect()
    assert np.allclose(ig.values, exact.values, atol=1e-3 * float(np.abs(exact.values).max()))


def _hand_trace(values: np.ndarray, comps=("hidden", "attn"), corrupt_score: float = 0.0) -> Trace:
    layers, positions = values.shape[1], values.shape[2]
    attrs = {"tower": "lm", "metric": "prob", "answer": "yes", "other": "", "direction": "restore", "window": 1,
             "clean_score": 1.0, "corrupt_score": corrupt_score, "positions": [[p] for p in range(positions)]}
    return Trace(xr.DataArray(values, dims=["component", "layer", "position"],
                              coords={"component": list(comps), "layer": list(range(layers)),
                                      "position": list(range(positions)),
                                      "token": ("position", [f"t{p}" for p in range(positions)]),
                                      "group": ("position", [""] * positions)}, attrs=attrs))


def test_agreement_on_hand_made_arrays():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    exact = rng.normal(size=(2, 3, 4))
    est = exact.copy()
    est[0] = exact[0] ** 3  # monotone: Spearman exactly 1, Pearson below 1
    est[1] = -exact[1]  # reversed: Spearman and Pearson -1
    est[1, 0, 0] = exact[1, 0, 0]
    table = agreement(_hand_trace(est), _hand_trace(exact), top_k=3).set_index("component")
    assert table.loc["hidden", "spearman"] == pytest.approx(1.0)
    assert table.loc["hidden", "pearson"] == pytest.approx(np.corrcoef(est[0].ravel(), exact[0].ravel())[0, 1])
    assert table.loc["hidden", "pearson"] < 1
    assert table.loc["attn", "spearman"] == pytest.approx(scipy_stats.spearmanr(est[1].ravel(), exact[1].ravel())[0])
    pooled = scipy_stats.spearmanr(est.ravel(), exact.ravel())[0]
    assert table.loc["all", "spearman"] == pytest.approx(pooled) and table.loc["all", "cells"] == 24
    # top-k by |effect| (corrupt score 0): same cells for a monotone odd map
    assert table.loc["hidden", "top_k_overlap"] == 1.0
    by_size = lambda a: set(np.argsort(-np.abs(a.ravel()))[:3])  # noqa: E731
    assert table.loc["attn", "top_k_overlap"] == pytest.approx(len(by_size(est[1]) & by_size(exact[1])) / 3)
    # ties share their mean rank
    tied = np.zeros((2, 3, 4))
    tied[:, :, :2] = 1.0
    table = agreement(_hand_trace(tied), _hand_trace(exact)).set_index("component")
    assert table.loc["hidden", "spearman"] == pytest.approx(scipy_stats.spearmanr(tied[0].ravel(), exact[0].ravel())[0])
    # a seeded sample of cells per component: reproducible, of the requested size
    a = agreement(_hand_trace(est), _hand_trace(exact), sample=5, seed=3)
    b = agreement(_hand_trace(est), _hand_trace(exact), sample=5, seed=3)
    assert a.equals(b) and a.set_index("component").loc["hidden", "cells"] == 5
    cells = agreement_cells(_hand_trace(est), _hand_trace(exact), sample=5, seed=3)
    assert cells.equals(agreement_cells(_hand_trace(est), _hand_trace(exact), sample=5, seed=3))
    assert np.allclose(cells["exact"], [exact[["hidden", "attn"].index(r.component), r.layer, r.position]
                                        for r in cells.itertuples()])


def test_agreement_patches_only_the_sampled_cells(image, other_image):
    import vlm_interp as vi

    vlm = vi.load("tiny:llava")
    clean = vlm.prepare(image, QUESTION, answer="yes")
    corrupt = vlm.prepare(other_image, QUESTION, answer="yes")
    components = ["lm.hidden", "lm.mlp"]
    est = attribution_patching(vlm, clean, corrupt, components=components, tokens="each")
    exact = trace(vlm, clean, corrupt, components=components, tokens="each", progress=False)
    budget = agreement(est, vlm=vlm, clean=clean, corrupt=corrupt, sample=6, seed=1)
    full = agreement(est, exact, sample=6, seed=1)
    cells = agreement_cells(est, vlm=vlm, clean=clean, corrupt=corrupt, sample=6, seed=1)
    assert len(cells) == 12 and cells.groupby("component").size().tolist() == [6, 6]
    for row in cells.itertuples():
        assert row.exact == pytest.approx(float(exact.data.sel(component=row.component, layer=row.layer,
                                                               position=row.position)), abs=1e-6)
    assert np.allclose(budget[["spearman", "pearson", "top_k_overlap"]].to_numpy(),
                       full[["spearman", "pearson", "top_k_overlap"]].to_numpy(), equal_nan=True)


def test_bad_requests_are_clear_errors(image, other_image):
    import vlm_interp as vi

    vlm = vi.load("tiny:llava")
    clean = vlm.prepare(image, QUESTION, answer="yes")
    corrupt = vlm.prepare(other_image, QUESTION, answer="yes")
    shifted = vlm.prepare(other_image, QUESTION + " is it ?", answer="yes")
    for estimate in (attribution_patching, integrated_patching):
        with pytest.raises(CorruptionError, match="token layout"):
            estimate(vlm, clean, shifted)
        with pytest.raises(SiteError, match="no component"):
            estimate(vlm, clean, corrupt, components=["lm.xattn"])
        with pytest.raises(SiteError, match="one tower"):
            estimate(vlm, clean, corrupt, components=["lm.attn", "vision.attn"])
        with pytest.raises(SiteError, match="separately"):
            estimate(vlm, clean, corrupt, components=["lm.attn", "lm.head"])
        with pytest.raises(ValueError, match="direction"):
            estimate(vlm, clean, corrupt, direction="sideways")
    with pytest.raises(ValueError, match="steps"):
        integrated_patching(vlm, clean, corrupt, steps=0)
    est = attribution_patching(vlm, clean, corrupt, components=["lm.hidden"])
    other = attribution_patching(vlm, clean, corrupt, components=["lm.hidden"], tokens=["image", "last"])
    with pytest.raises(ValueError, match="different grids"):
        agreement(est, other)
    with pytest.raises(ValueError, match="sample="):
        agreement(est)


def test_captum_blind_spot_is_named(image, other_image):
    """LLaVA reads a vision layer's output from transformers' own record, which captum's hook cannot reach."""
    import vlm_interp as vi

    vlm = vi.load("tiny:llava_next")
    clean = vlm.prepare(image, QUESTION, answer="yes")
    corrupt = vlm.prepare(other_image, QUESTION, answer="yes")
    with pytest.raises(SiteError, match="recorded copy"):
        integrated_patching(vlm, clean, corrupt, components=["vision.hidden"], tokens="all", steps=2,
                            progress=False)
