"""Checks every family's test module runs on its tiny model, each against an independent computation.

They take a wrapped tiny model and images; the family modules (tests/test_family_*.py) call them and
add what only their family has (its geometry by hand).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers.utils import ModelOutput

import vlm_interp as vi
from vlm_interp.corruptions import CorruptionError, applied, noise
from vlm_interp.interventions import InjectionPlan, inject, modulate_heads, vhr
from vlm_interp.tracing import engine, fast, trace

QUESTION = "Is there a red circle ?"


def raw_output(vlm, path: str, kind: str, inputs: dict, example=None) -> torch.Tensor:
    """A module's output (or first input) in one plain forward, by a plain torch hook; with ``example``, the forward
    runs under its edits (attached after the hook)."""
    store = []
    module = vlm.model.get_submodule(path)
    if kind == "input":
        handle = module.register_forward_pre_hook(
            lambda m, a, kw: store.append((a[0] if a else kw["hidden_states"]).detach().clone()), with_kwargs=True)
    else:
        handle = module.register_forward_hook(
            lambda m, a, o: store.append((o if torch.is_tensor(o) else o[0]).detach().clone()))
    try:
        with torch.no_grad(), applied(vlm, example) if example is not None else contextlib.nullcontext():
            vlm.logits(inputs)
    finally:
        handle.remove()
    return store[0]


def check_sites_command(family: str, capsys) -> str:
    """``vlm-interp sites`` lists every tower and component with its site count."""
    from vlm_interp.cli import main

    assert main(["sites", "--model", f"tiny:{family}"]) == 0
    out = capsys.readouterr().out
    vlm = vi.load(f"tiny:{family}")
    for tower in vlm.adapter.towers():
        for component in vlm.adapter.components(tower):
            assert f"{tower}.{component}: {len(vlm.adapter.sites(tower, component))} sites" in out
    return out


def check_residual_sums(vlm, image, lm_from: int = 0) -> None:
    """In every tower and layer: residual in + scale x attn + scale x mlp = residual out (the adapter's scales;
    cross-attention layers add ``xattn`` where others add ``attn``). LM positions from ``lm_from`` on."""
    ex = vlm.prepare(image, QUESTION)
    a = vlm.adapter
    for tower in a.towers():
        for layer in range(a.n_layers[tower]):
            adds = [c for c in ("attn", "xattn", "mlp")
                    if c in a.components(tower) and layer in a.layers_with(tower, c)]
            hooks = {c: vlm.hook(f"{tower}.{c}.{layer}", capture=True) for c in ("input", "hidden", *adds)}
            with torch.no_grad(), vlm.attach(hooks.values()):
                vlm.logits(ex.inputs)
            layer_module = vlm.model.get_submodule(a.module_path(tower, "hidden", layer))
            total = hooks["input"].value.clone()
            for c in adds:
                spec = a.adapter.towers[tower].residual_scale.get(c)
                scale = 1.0
                if spec is not None and spec[0] in dict(layer_module.named_parameters()):
                    param = layer_module.get_parameter(spec[0]).detach()
                    scale = param.tanh() if spec[1] == "tanh" else param
                total = total + scale * hooks[c].value
            start = lm_from if tower == "lm" else 0
            torch.testing.assert_close(total[:, start:], hooks["hidden"].value[:, start:], rtol=1e-5, atol=1e-5,
                                       msg=f"{tower} layer {layer}")


def check_lm_boxes_follow_the_connector(vlm, image, vision_out: str) -> None:
    """Each LM image token comes from the vision patches whose boxes it covers: perturb the vision tower's
    output at one patch and see which LM image tokens change (the connector alone decides it)."""
    ex = vlm.prepare(image, QUESTION)
    layout = vlm.image_layout(ex)
    lm_image = ex.groups["lm"]["image"]
    first = vlm.adapter.module_path("lm", "input", 0)
    base = raw_output(vlm, first, "input", ex.inputs)
    checked = 0
    for position in ex.groups["vision"]["image"][::7]:
        def bump(m, a, o, position=position):
            t = o if torch.is_tensor(o) else o[0]
            flat = t.reshape(1, -1, t.shape[-1]).clone()
            flat[0, position] += 10.0
            flat = flat.reshape(t.shape)
            if isinstance(o, ModelOutput):
                o[next(iter(o.keys()))] = flat
                return o
            return flat if torch.is_tensor(o) else (flat, *o[1:])

        handle = vlm.model.get_submodule(vision_out).register_forward_hook(bump)
        try:
            moved = raw_output(vlm, first, "input", ex.inputs)
        finally:
            handle.remove()
        changed = [k for k, p in enumerate(lm_image) if not torch.equal(moved[0, p], base[0, p])]
        y0, x0, y1, x1 = layout.vision[position]
        centre = ((y0 + y1) / 2, (x0 + x1) / 2)
        inside = [k for k, (b0, a0, b1, a1) in enumerate(layout.lm) if b0 <= centre[0] < b1 and a0 <= centre[1] < a1
                  and _same_tile(layout, position, k)]
        assert changed == inside, (position, changed, inside)
        checked += 1
    assert checked >= 3


def _same_tile(layout, position: int, token: int) -> bool:
    """Whether LM image token ``token`` belongs to the tile of vision ``position`` (tiles hold equal counts)."""
    tiles = 1 + max(t for t, _, _ in layout.pixels.values())
    return token // (len(layout.lm) // tiles) == layout.pixels[position][0]


def check_fast_path_equals_plain_loop(vlm, image, lm_head: str, components=("input", "attn", "mlp", "head")) -> None:
    """LM cells (noise edits honoured) on the fast path, against one raw-hooked forward per cell; the fast path
    must apply without a warning."""
    from test_trace_fast import plain_value

    with torch.no_grad():
        vlm.model.get_submodule(lm_head).weight.mul_(40.0)  # restoring one cell moves the answer visibly
    try:
        clean = vlm.prepare(image, QUESTION, answer="yes")
        corrupt = noise(vlm, clean, scale=3.0, tokens="image", seed=0)
        state, why = fast.lm_start(vlm, corrupt)
        assert state is not None and state.kv_reuse, why or state.why_no_kv
        answer_id = vlm.encode_answer(clean, "yes")[0]
        groups = {"image": clean.groups["lm"]["image"], "question": clean.groups["lm"]["question"],
                  "last": clean.groups["lm"]["last"]}
        for comp in components:
            with warnings.catch_warnings():
                warnings.simplefilter("error", engine.FastPathWarning)
                tr = trace(vlm, clean, corrupt, components=[f"lm.{comp}"], metric="logprob", progress=False,
                           tokens=groups if comp != "head" else {"last": groups["last"]}, batch_size=3)
            data = tr.data.sel(component=comp)
            heads = data.coords["head"].values if "head" in data.dims else [None]
            values = []
            for layer in range(vlm.adapter.n_layers["lm"]):
                for head in heads:
                    for k, pos in enumerate(tr.attrs["positions"]):
                        site = vi.sites.Site("lm", comp, layer, None if head is None else int(head))
                        expected = plain_value(vlm, clean, corrupt, site, pos, answer_id)
                        got = float(data.sel(layer=layer, position=k, **({} if head is None else {"head": head})))
                        assert got == pytest.approx(expected, abs=1e-4), (comp, layer, head, k)
                        values.append(expected)
            assert float(np.std(values)) > 1e-3  # the comparison is not trivially passed
    finally:
        with torch.no_grad():
            vlm.model.get_submodule(lm_head).weight.div_(40.0)


def _tokens(vlm, ex, n=6, **kw) -> torch.Tensor:
    with torch.no_grad(), applied(vlm, ex):
        out = vlm.model.generate(**ex.inputs, max_new_tokens=n, do_sample=False, **kw)
    return out[:, ex.inputs["input_ids"].shape[1]:]


def check_interventions_during_generate(vlm, image, vision_heads: bool = True, heads: dict | None = None) -> None:
    """Head modulation, IRI and (``vision_heads``) VHR during generate: the same tokens with the key/value cache
    on and off, and
    each changes the logits (so it acted). The example is prepared outside the strict warning filters: at
    transformers 5.13 InternVL's processor hands a tensor to numpy.cumsum, which numpy deprecates."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ex = vlm.prepare(image, QUESTION)
    layers = vlm.adapter.n_layers["lm"]
    plan = InjectionPlan({"attn": {layers - 1: {0: 1.0}}}, {"attn": 0.5})
    heads = heads or {"lm.head.0.1": 3.0, f"lm.head.{layers - 1}.0": 0.0}
    with torch.no_grad():
        plain = vlm.logits(ex.inputs)
    makers = [lambda: modulate_heads(vlm, heads), lambda: inject(vlm, plan)]
    for make in makers + ([lambda: vhr(vlm, alpha=3.0)] if vision_heads else []):
        with make():
            cached = _tokens(vlm, ex, use_cache=True)
        with make():
            uncached = _tokens(vlm, ex, use_cache=False)
        assert torch.equal(cached, uncached)
        with make(), torch.no_grad():
            assert not torch.equal(vlm.logits(ex.inputs), plain)
    with torch.no_grad():
        assert torch.equal(vlm.logits(ex.inputs), plain)  # everything was removed


def check_pope_on_two_images(family: str, tmp_path: Path) -> pd.DataFrame:
    """POPE on the built-in shapes set of two images, through ``compare`` (answers from text and from logits)."""
    from vlm_interp.hallucination.compare import compare
    from vlm_interp.zoo.organisms import ORGANISM_WORLD
    from vlm_interp.zoo.pope_set import write_pope
    from vlm_interp.zoo.shapes import World

    folder = tmp_path / "pope"
    write_pope(World(ORGANISM_WORLD), folder, n_images=2, seed=5, per_image=2)
    result = compare([f"tiny:{family}"], questions=folder, out=tmp_path / "out", splits=["random"], n_boot=20,
                     max_new_tokens=2, progress=False)
    rows = result.table
    assert set(rows["system"]) == {f"tiny:{family}"} and len(rows) == 2  # one split x answer sources
    assert rows["accuracy"].between(0, 1).all()
    return rows


def check_different_image_sizes_are_refused(vlm, image) -> None:
    """A clean/corrupted pair whose images have different sizes (so different tiles and token layouts) is refused
    with an error that says to use the same image size."""
    clean = vlm.prepare(image, QUESTION, answer="yes")
    wide = image.resize((image.width * 2, image.height))
    other = vlm.prepare(wide, QUESTION, answer="yes")
    with pytest.raises(CorruptionError, match="same image size"):
        trace(vlm, clean, other, components=["lm.hidden"], tokens=["last"], progress=False)
