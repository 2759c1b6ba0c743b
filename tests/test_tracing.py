"""The batched tracing engine against a plain loop: one forward per cell with one raw torch hook."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlm_interp.errors import SiteError
from vlm_interp.tracing import Trace, trace

from conftest import QUESTION

# (tower, component, tokens) per family: every component kind of every tower the family has
CASES = {
    "llava": [("lm", "input", "each"), ("lm", "hidden", "each"), ("lm", "attn", "each"), ("lm", "mlp", "each"),
              ("lm", "head", ["image", "last"]), ("vision", "mlp", "each")],
    "llava_next": [("lm", "hidden", ["image", "question", "last"]), ("lm", "head", ["last"]), ("vision", "attn", "each")],
    "blip": [("text", "xattn", "each"), ("text", "xattn_head", ["question"]), ("lm", "mlp", "each"),
             ("lm", "xattn", "each"), ("vision", "hidden", "each"), ("text", "input", ["question"])],
    "blip2": [("qformer", "xattn", "each"), ("qformer", "xattn_head", ["image"]), ("lm", "attn", "each"),
              ("qformer", "mlp", "each")],
    "instructblip": [("qformer", "attn", "each"), ("qformer", "xattn_head", ["image"]), ("lm", "head", ["image"]),
                     ("lm", "mlp", "each"), ("qformer", "input", ["image"])],
    # tiled vision towers: positions run over every tile (the tiles in turn); few cells, each kind on each tower
    "idefics3": [("lm", "input", ["image"]), ("lm", "hidden", {"tile 0": [5, 8]}), ("lm", "attn", ["image", "last"]),
                 ("lm", "mlp", ["last"]), ("lm", "head", ["last"]), ("vision", "input", {"tile 1": [16, 17]}),
                 ("vision", "hidden", {"patches": [10, 15, 69]}), ("vision", "attn", {"global": [69]}),
                 ("vision", "mlp", {"tile 3": [63]}), ("vision", "head", {"global": [69]})],
    "smolvlm": [("lm", "hidden", ["image"]), ("vision", "mlp", {"tile 0": [10, 15], "global": [69]})],
    # 5 tiles of a CLS token and 16 patches
    "internvl": [("lm", "input", ["image"]), ("lm", "hidden", {"tile 0": [4, 7]}), ("lm", "attn", ["image", "last"]),
                 ("lm", "mlp", ["last"]), ("lm", "head", ["last"]), ("vision", "input", {"tile 1": [18, 19]}),
                 ("vision", "hidden", {"cls": [0, 68]}), ("vision", "attn", {"tile 0": [11, 16], "thumbnail": [74]}),
                 ("vision", "mlp", {"tile 3": [67]}), ("vision", "head", {"thumbnail": [74]})],
    # the LM reads the image through its cross-attention layer (layer 1); both vision encoders run 4 tiles of 24
    "mllama": [("lm", "xattn", ["question", "last"]), ("lm", "xattn_head", ["last"]), ("lm", "attn", ["last"]),
               ("lm", "mlp", ["last"]), ("lm", "head", ["last"]), ("lm", "input", ["question"]),
               ("vision", "hidden", {"tile 0": [11, 16], "cls": [0, 24]}), ("vision", "head", {"tile 1": [30]}),
               ("vision_global", "attn", {"tile 0": [11]}), ("vision_global", "head", {"tile 2": [50]})],
    "llava_onevision": [("lm", "input", ["image", "question", "last"]), ("lm", "hidden", ["question", "last"]),
                        ("lm", "attn", ["image", "last"]), ("lm", "mlp", ["last"]), ("lm", "head", ["last"]),
                        ("vision", "input", ["image"]), ("vision", "hidden", ["image"]), ("vision", "attn", ["image"]),
                        ("vision", "mlp", "each"), ("vision", "head", ["image"])],
    "gemma3": [("lm", "input", ["image", "last"]), ("lm", "hidden", ["last"]), ("lm", "attn", ["image"]),
               ("lm", "mlp", ["last"]), ("lm", "head", ["last"]),
               ("vision", "hidden", ["image"]), ("vision", "attn", ["image"]), ("vision", "input", ["image"]),
               ("vision", "mlp", ["image"]), ("vision", "head", ["image"])],
    "paligemma": [("lm", "input", ["image", "question", "last"]), ("lm", "hidden", ["image", "last"]),
                  ("lm", "attn", ["image", "last"]), ("lm", "mlp", ["question", "last"]), ("lm", "head", ["last"]),
                  ("vision", "input", ["image"]), ("vision", "hidden", ["image"]), ("vision", "attn", ["image"]),
                  ("vision", "mlp", "each"), ("vision", "head", ["image"])],
    # Qwen2.5-VL: every component kind of both towers (the packed vision tower patched one patch at a time too)
    "qwen2_5_vl": [("lm", c, ["image", "question", "last"]) for c in ("input", "hidden", "attn", "mlp")]
                  + [("lm", "head", ["image", "last"]), ("vision", "mlp", {f"patch {p}": [p] for p in (0, 13, 37, 63)})]
                  + [("vision", c, ["image"]) for c in ("input", "hidden", "attn", "head")],
    "qwen2_vl": [("lm", "hidden", ["image", "last"]), ("lm", "head", ["last"]), ("vision", "attn", ["image"]),
                 ("vision", "head", ["image"])],
    "qwen3_vl": [("lm", "input", ["image", "question", "last"]), ("lm", "hidden", ["image", "question", "last"]),
                 ("lm", "head", ["last"]), ("vision", "hidden", ["image"]), ("vision", "mlp", ["image"])],
}


def raw_value(vlm, path: str, kind: str, inputs: dict) -> torch.Tensor:
    """A module's output or first input from one plain forward, with a plain torch hook."""
    store = []
    module = vlm.model.get_submodule(path)
    if kind == "input":
        handle = module.register_forward_pre_hook(
            lambda m, a, kw: store.append((a[0] if a else kw["hidden_states"]).detach().clone()), with_kwargs=True)
    else:
        handle = module.register_forward_hook(
            lambda m, a, o: store.append((o if torch.is_tensor(o) else o[0]).detach().clone()))
    try:
        with torch.no_grad():
            vlm.logits(inputs)
    finally:
        handle.remove()
    return store[0]


def plain_loop(vlm, clean, corrupt, tower, component, layer, head, positions, answer_id) -> float:
    """Probability of the answer with one site restored, by a single raw hook and one forward.

    A tiled tower's positions run over the tiles in turn (the adapter's batch layout): the raw
    (tiles, positions, width) tensor is viewed as one sequence.
    """
    rel, kind = vlm.adapter.adapter.towers[tower].components[component]
    path = vlm.adapter.module_path(tower, component, layer)
    src = raw_value(vlm, path, kind, clean.inputs)
    fold = vlm.adapter.adapter.towers[tower].batch_layout == "tiles"
    if fold:
        src = src.reshape(1, -1, src.shape[-1])
    width = src.shape[-1] // vlm.adapter.n_heads[tower]
    cols = slice(None) if head is None else slice(head * width, (head + 1) * width)

    def patch(t):
        shape = t.shape
        t = t.clone()
        if t.dim() == 2:  # a packed tower (Qwen's vision tower): (positions, width), no batch axis
            t[positions, cols] = src[positions, cols]
            return t
        t = t.reshape(1, -1, shape[-1]) if fold else t
        t[:, positions, cols] = src[:, positions, cols]
        return t.reshape(shape)

    module = vlm.model.get_submodule(path)
    if kind == "input":
        handle = module.register_forward_pre_hook(
            lambda m, a, kw: ((patch(a[0]), *a[1:]), kw) if a else (a, {**kw, "hidden_states": patch(kw["hidden_states"])}),
            with_kwargs=True)
    else:  # first in line: transformers' own hooks record the hidden states a model selects (LLaVA-OneVision's image
        # features are the last vision layer's recorded output), and they must record the patched value
        handle = module.register_forward_hook(
            lambda m, a, o: patch(o) if torch.is_tensor(o) else (patch(o[0]), *o[1:]), prepend=True)
    try:
        with torch.no_grad():
            logits = vlm.logits(corrupt.inputs)
    finally:
        handle.remove()
    return float(torch.softmax(logits[0, vlm.answer_start(corrupt)].float(), -1)[answer_id])


def test_batched_trace_equals_plain_loop(vlm, image, other_image):
    clean = vlm.prepare(image, QUESTION, answer="yes")
    corrupt = vlm.prepare(other_image, QUESTION, answer="yes")
    answer_id = vlm.encode_answer(clean, "yes")[0]
    for tower, component, tokens in CASES[vlm.family]:
        tr = trace(vlm, clean, corrupt, components=[f"{tower}.{component}"], tokens=tokens, batch_size=7,
                   progress=False)
        data = tr.data.sel(component=component)
        positions = tr.attrs["positions"]
        heads = data.coords["head"].values if "head" in data.dims else [None]
        layers = vlm.adapter.layers_with(tower, component)
        checked = 0
        for layer in layers:
            for head in heads:
                for k in range(len(positions)):
                    cell = data.sel(layer=layer, position=k, **({} if head is None else {"head": head}))
                    expected = plain_loop(vlm, clean, corrupt, tower, component, layer, head, positions[k], answer_id)
                    assert float(cell) == pytest.approx(expected, abs=1e-5), (tower, component, layer, head, k)
                    checked += 1
        assert checked == len(layers) * len(heads) * len(positions)
        # layers without the component (Q-Former cross-attention) stay NaN, nothing else does
        per_layer = int(np.prod(data.shape[1:]))
        assert int(np.isnan(data.values).sum()) == (vlm.adapter.n_layers[tower] - len(layers)) * per_layer


def test_restoring_everything_recovers_the_clean_score(vlm, image, other_image):
    """Restoring the last LM layer's output at every position gives exactly the clean run."""
    clean = vlm.prepare(image, QUESTION, answer="yes")
    corrupt = vlm.prepare(other_image, QUESTION, answer="yes")
    tr = trace(vlm, clean, corrupt, components=["lm.hidden"], tokens="all", progress=False)
    last = tr.data.sel(component="hidden", layer=vlm.adapter.n_layers["lm"] - 1, position=0)
    assert float(last) == pytest.approx(tr.attrs["clean_score"], abs=1e-6)
    assert float(tr.rr().sel(component="hidden", layer=vlm.adapter.n_layers["lm"] - 1, position=0)) == \
        pytest.approx(1.0, abs=1e-3)


def test_a_layers_input_is_the_previous_layers_output_and_input_zero_the_embeddings(vlm, image, other_image):
    """Restoring ``lm.input.L`` equals restoring ``lm.hidden.L-1`` cell for cell; where the image enters the LM as
    tokens, restoring ``lm.input.0`` at every position gives exactly the clean run."""
    clean = vlm.prepare(image, QUESTION, answer="yes")
    corrupt = vlm.prepare(other_image, QUESTION, answer="yes")
    tr = trace(vlm, clean, corrupt, components=["lm.input", "lm.hidden"], tokens="each", progress=False)
    n = vlm.adapter.n_layers["lm"]
    entering = tr.data.sel(component="input", layer=list(range(1, n))).values
    leaving = tr.data.sel(component="hidden", layer=list(range(n - 1))).values
    added = vlm.adapter.adapter.towers["lm"].added_after  # Qwen3-VL's DeepStack: features enter between layers
    image = [k for k, p in enumerate(tr.attrs["positions"]) if p[0] in set(clean.groups["lm"].get("image", []))]
    for layer in added:  # there restoring the next layer's input also restores the clean run's added features
        assert np.abs(entering[layer, image] - leaving[layer, image]).max() > 1e-6
        entering[layer, image] = leaving[layer, image]
    np.testing.assert_allclose(entering, leaving, atol=1e-6)
    if vlm.adapter.adapter.image_in_lm:
        with torch.no_grad():
            corrupt_logits = vlm.logits(corrupt.inputs)
        # the image is in the LM's input, and (DeepStack) in what enters after each of the added_after layers
        last = max(added, default=-1) + 1
        for layer in sorted({0, last}):
            grab = vlm.hook(f"lm.input.{layer}", capture=True)
            with torch.no_grad(), vlm.attach([grab]):
                clean_logits = vlm.logits(clean.inputs)
            with torch.no_grad(), vlm.attach([vlm.hook(f"lm.input.{layer}", lambda t: grab.value)]):
                restored = vlm.logits(corrupt.inputs)
            assert float((corrupt_logits - clean_logits).abs().max()) > 1e-3
            if layer == last:
                torch.testing.assert_close(restored, clean_logits, atol=1e-6, rtol=0)
            else:  # the corrupted image's features enter again after layer 0
                assert float((restored - clean_logits).abs().max()) > 1e-3


def test_windows_and_noising_direction(image, other_image):
    import vlm_interp as vi

    vlm = vi.load("tiny:llava")
    clean = vlm.prepare(image, QUESTION, answer="yes")
    corrupt = vlm.prepare(other_image, QUESTION, answer="yes")
    wide = trace(vlm, clean, corrupt, components=["lm.mlp"], tokens=["image"], window=2, progress=False)
    both = trace(vlm, clean, corrupt, components=["lm.mlp"], tokens=["image"], window=3, progress=False)
    # with two layers, a window of 3 around either layer covers both layers: same value for each
    assert float(both.data[0, 0, 0]) == pytest.approx(float(both.data[0, 1, 0]), abs=1e-6)
    assert not np.isnan(wide.data.values).any()
    noised = trace(vlm, clean, corrupt, components=["lm.hidden"], tokens="all", direction="noise", progress=False)
    assert float(noised.data.sel(layer=1, position=0)[0]) == pytest.approx(noised.attrs["corrupt_score"], abs=1e-6)


def test_the_grid_plan_lays_cells_out_by_their_coordinates(image, other_image):
    import vlm_interp as vi
    from vlm_interp.sites import Site
    from vlm_interp.tracing import plan_grid

    vlm = vi.load("tiny:blip2")  # Q-Former cross-attention exists on some layers only
    clean = vlm.prepare(image, QUESTION, answer="yes")
    corrupt = vlm.prepare(other_image, QUESTION, answer="yes")
    plan = plan_grid(vlm, clean, corrupt, ["qformer.xattn_head"], tokens=["image"], window=3, direction="noise")
    assert (plan.base, plan.source) == (clean, corrupt) and plan.base_score == plan.attrs["clean_score"]
    have = vlm.adapter.layers_with("qformer", "xattn")
    n_heads = vlm.adapter.n_heads["qformer"]
    cells = list(plan.cells())
    assert len(cells) == len(have) * n_heads and cells[0] == (("xattn_head", have[0], 0), 0)
    tr = plan.trace(range(len(cells)))  # each cell holds its own index: where did it land?
    for i, ((comp, layer, head), k) in enumerate(cells):
        assert float(tr.data.sel(component=comp, layer=layer, head=head, position=k)) == i
    missing = [l for l in range(vlm.adapter.n_layers["qformer"]) if l not in have]
    assert missing and np.isnan(tr.data.sel(layer=missing).values).all()
    # a cell restores its row's window of sites (clipped to the layers that have the component)
    layer = have[0]
    cell = plan.cell(("xattn_head", layer, 1), 0)
    assert cell.sites == tuple(Site("qformer", "xattn_head", l, 1) for l in have if abs(l - layer) <= 1)
    assert cell.positions == tuple(clean.positions("image", "qformer"))
    with pytest.raises(ValueError):  # one value per cell, no more and no fewer
        plan.trace(range(len(cells) - 1))


def test_trace_saves_and_loads_losslessly(tmp_path, image, other_image):
    import vlm_interp as vi

    vlm = vi.load("tiny:llava")
    clean = vlm.prepare(image, QUESTION, answer="yes")
    corrupt = vlm.prepare(other_image, QUESTION, answer="yes")
    tr = trace(vlm, clean, corrupt, components=["lm.hidden", "lm.attn"], progress=False)
    for name in ("t.json", "t.nc"):
        back = Trace.load(tr.save(tmp_path / name))
        assert back.data.identical(tr.data) or (np.array_equal(back.data.values, tr.data.values, equal_nan=True)
                                                and back.attrs == tr.attrs)
        assert list(back.data.coords["token"].values) == list(tr.data.coords["token"].values)
    avg = Trace.mean([tr, tr])
    assert avg["mean"].dims == tr.data.dims and avg.attrs["n"] == 2


def test_bad_trace_requests_are_clear_errors(image, other_image):
    import vlm_interp as vi

    vlm = vi.load("tiny:llava")
    clean = vlm.prepare(image, QUESTION, answer="yes")
    shifted = vlm.prepare(other_image, QUESTION + " is it ?", answer="yes")
    with pytest.raises(Exception, match="token layout"):
        trace(vlm, clean, shifted, progress=False)
    corrupt = vlm.prepare(other_image, QUESTION, answer="yes")
    with pytest.raises(SiteError, match="one tower"):
        trace(vlm, clean, corrupt, components=["lm.attn", "vision.attn"], progress=False)
    with pytest.raises(SiteError, match="no component"):
        trace(vlm, clean, corrupt, components=["lm.xattn"], progress=False)
    with pytest.raises(Exception, match="cannot encode"):
        trace(vlm, clean, corrupt, answer="zebra", progress=False)
    # exact tracing checks a request like the gradient estimates do: one grid plan for all of them
    for window in (0, 1.5, True):
        with pytest.raises(ValueError, match="window must be a positive integer"):
            trace(vlm, clean, corrupt, window=window, progress=False)
    with pytest.raises(SiteError, match="'tower.component' names"):
        trace(vlm, clean, corrupt, components=[], progress=False)
    with pytest.raises(SiteError, match="separately"):
        trace(vlm, clean, corrupt, components=["lm.attn", "lm.head"], progress=False)


def test_dataset_trace_skips_wrong_answers_and_resumes(tmp_path, image, other_image):
    import vlm_interp as vi
    from vlm_interp.tracing.dataset import model_is_right, trace_dataset

    vlm = vi.load("tiny:llava")
    calls = []

    def make(answer):
        def build():
            calls.append(answer)
            return (vlm.prepare(image, QUESTION, answer=answer), vlm.prepare(other_image, QUESTION, answer=answer))
        return build

    clean = vlm.prepare(image, QUESTION, answer="yes")
    top = vlm.tokenizer.decode([int(torch.argmax(vlm.first_token_logits(clean)))]).strip()
    wrong = "no" if top != "no" else "yes"
    assert model_is_right(vlm, vlm.prepare(image, QUESTION, answer=top))
    pairs = [("a", make(top)), ("b", make(wrong)), ("c", make(top))]
    first = trace_dataset(vlm, pairs, tmp_path, components=["lm.hidden"], progress=False)
    assert len(first.traces) == 2 and [s["key"] for s in first.skipped] == ["b"]
    summary = first.summary()
    assert summary.attrs["n"] == 2 and summary.attrs["skipped"] == 1
    assert float(summary["mean"].sel(component="hidden", layer=1, position=2)) == pytest.approx(
        float(np.mean([t.rr().sel(component="hidden", layer=1, position=2) for t in first.traces])))
    calls.clear()
    again = trace_dataset(vlm, pairs, tmp_path, components=["lm.hidden"], progress=False)
    assert calls == []  # nothing rebuilt or recomputed
    assert all(np.array_equal(a.data.values, b.data.values) for a, b in zip(first.traces, again.traces))


def test_important_heads_by_mean_plus_two_std():
    import xarray as xr

    from vlm_interp.tracing.heads import important_heads

    values = np.zeros((1, 3, 4, 1))
    values[0, 2, 1, 0] = 10.0  # one outstanding head
    values[0, 0, 3, 0] = 1.0
    data = xr.DataArray(values, dims=["component", "layer", "head", "position"],
                        coords={"component": ["head"], "layer": [0, 1, 2], "head": [0, 1, 2, 3], "position": [0],
                                "token": ("position", ["last"]), "group": ("position", ["last"])},
                        attrs={"clean_score": 1.0, "corrupt_score": 0.0, "tower": "lm"})
    heads = important_heads(Trace(data))
    flat = values.ravel()
    assert flat.mean() + 2 * flat.std() < 10 and flat.mean() + 2 * flat.std() > 1
    assert heads["site"].tolist() == ["lm.head.2.1"]


def test_auroc_against_a_hand_count():
    from vlm_interp.tracing.groundtruth import auroc

    # positives 3, 1; negatives 2, 0, 1: pairs won 3>2,3>0,3>1,1>0 = 4, ties 1=1 = 0.5 -> 4.5 / 6
    assert auroc([3, 2, 1, 0, 1], [True, False, True, False, False]) == pytest.approx(4.5 / 6)
    assert auroc([1, 2], [True, True]) != auroc([1, 2], [True, True])  # NaN without negatives
