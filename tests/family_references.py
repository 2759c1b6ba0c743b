"""Plain references for the LLaVA-OneVision, Gemma 3 and PaliGemma family tests: raw torch hooks, one forward per cell.

Nothing here goes through vlm-interp's hook engine or tracing engine: the references read and
patch modules with raw torch hooks, so they can disagree with the library.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlm_interp import compat
from vlm_interp.edits import applied
from vlm_interp.sites import Site

from family_checks import raw_output


def sharp_gemma(family: str):
    """A tiny Gemma-LM family model with its final norm scaled 40x (the LM head is tied to the embeddings), so that
    patches show in the answer logits."""
    import vlm_interp as vi
    from vlm_interp.tiny import tiny

    vlm = vi.wrap(*tiny(family, seed=0))
    with torch.no_grad():
        vlm.model.model.language_model.norm.weight.add_(39.0)  # Gemma's RMSNorm multiplies by (1 + weight)
    return vlm


def raw_value(vlm, ex, site: Site) -> torch.Tensor:
    """The tensor at ``site`` (its module's output or first input) in one plain forward of ``ex`` with its edits."""
    _, kind = vlm.adapter.adapter.towers[site.tower].components[site.component]
    path = vlm.adapter.module_path(site.tower, site.component, site.layer)
    return raw_output(vlm, path, kind, ex.inputs, example=ex)


def plain_patch(vlm, clean, corrupt, site: Site, positions, answer_id: int) -> float:
    """log P(answer) of ``corrupt`` with ``site`` restored from ``clean`` at ``positions``: one forward, one raw hook."""
    _, kind = vlm.adapter.adapter.towers[site.tower].components[site.component]
    module = vlm.model.get_submodule(vlm.adapter.module_path(site.tower, site.component, site.layer))
    src = raw_value(vlm, clean, site)
    cols = slice(None)
    if site.head is not None:
        width = src.shape[-1] // vlm.adapter.n_heads[site.tower]
        cols = slice(site.head * width, (site.head + 1) * width)
    index = list(positions)

    def patch(t):
        t = t.clone()
        t[:, index, cols] = src[:, index, cols]
        return t

    if kind == "input":
        handle = module.register_forward_pre_hook(lambda m, a, kw: ((patch(a[0]), *a[1:]), kw), with_kwargs=True)
    else:
        handle = module.register_forward_hook(  # before transformers' own recorders of selected hidden states
            lambda m, a, o: patch(o) if torch.is_tensor(o) else (patch(o[0]), *o[1:]), prepend=True)
    try:
        with torch.no_grad(), applied(vlm, corrupt):
            logits = vlm.logits(corrupt.inputs)
    finally:
        handle.remove()
    return float(torch.log_softmax(logits[0, vlm.answer_start(corrupt)].float(), -1)[answer_id])


def plain_grid(vlm, clean, corrupt, component: str, positions, answer_id: int, tower: str = "lm") -> np.ndarray:
    """(layers, positions) of :func:`plain_patch` for one whole component."""
    return np.array([[plain_patch(vlm, clean, corrupt, Site(tower, component, layer), pos, answer_id)
                      for pos in positions] for layer in range(vlm.adapter.n_layers[tower])])


def generated(vlm, ex, n: int = 6, **kw) -> torch.Tensor:
    """Greedy new tokens of ``model.generate`` (the prompt cut off)."""
    with torch.no_grad():
        out = vlm.model.generate(**ex.inputs, max_new_tokens=n, do_sample=False, **kw)
    return out[:, ex.inputs["input_ids"].shape[1]:]


def greedy_without_cache(vlm, ex, n: int = 6) -> torch.Tensor:
    """Greedy new tokens by whole forwards of the growing sequence (no cache), each new token fed as the adapter
    feeds an answer (its per-token inputs, such as token types, extended)."""
    inputs, out = dict(ex.inputs), []
    eos = vlm.model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    with torch.no_grad():
        for _ in range(n):
            token = int(vlm.logits(inputs)[0, -1].argmax())
            out.append(token)
            if token in eos:
                break
            inputs = vlm.decoder.with_answer(vlm.model, dict(inputs), torch.tensor([[token]]),
                                             vlm.adapter.adapter.answer_token_inputs)
    return torch.tensor([out])


def check_cache_on_and_off(vlm, ex, make) -> None:
    """Generation under the intervention ``make()`` gives the same tokens with and without the key/value cache (and
    as a plain loop of whole forwards), and the intervention acts (the answer logits move). Where this transformers
    release generates differently without the cache (compat.uncached_generation_problem), VLM.generate says so."""
    with torch.no_grad():
        plain = vlm.logits(ex.inputs)[0, -1]
    with make():
        cached = generated(vlm, ex, use_cache=True)
    with make():
        loop = greedy_without_cache(vlm, ex, cached.shape[1])
        with torch.no_grad():
            moved = vlm.logits(ex.inputs)[0, -1]
    assert torch.equal(cached, loop), (cached, loop)
    if compat.uncached_generation_problem(vlm.model):
        with make(), pytest.warns(compat.KnownIssueWarning, match="without the key/value cache"):
            vlm.generate(ex, max_new_tokens=2, use_cache=False)
    else:
        with make():
            uncached = generated(vlm, ex, use_cache=False)
        assert torch.equal(cached, uncached), (cached, uncached)
    assert not torch.allclose(moved, plain), "the intervention did not change the answer logits"
