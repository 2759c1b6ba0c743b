"""The logit lens: read the residual stream at any layer and position through the LM's own final norm and unembedding.

For LLaVA-style models the interesting positions are the image tokens (Neo et al. 2024): what
does each patch "say" at each layer? The lens applies the answer tower's ``tail`` (adapter data:
final norm, unembedding, in the model's own modules) to the residual stream entering a layer
(``lm.input.L``) or leaving it (``lm.hidden.L``), so ``lm.hidden.<last>`` gives the model's own logits.
It reads, it does not intervene: like attention maps, it shows what is decodable, not what is used.

Only the residual stream is read: a component's output (``attn``, ``mlp``) is not in the space the
final norm expects, and towers without an unembedding (vision encoders, Q-Formers, BLIP's question
encoder) have nothing to read it with; both are errors that say so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import xarray as xr

from ..corruptions.base import applied
from ..errors import AnswerEncodingError, SiteError
from ..example import Example
from ..sites import Site
from .results import Labelled

RESIDUAL = ("input", "hidden")  # components that are the residual stream
QUANTITIES = ("prob", "logprob", "rank")


class LensError(SiteError):
    """The logit lens cannot read this site: not the residual stream, or a tower without an unembedding."""


def _components(vlm, sites: Sequence[str]) -> tuple[str, list[str]]:
    specs = [s.split(".") for s in ([sites] if isinstance(sites, str) else sites)]
    if any(len(s) != 2 for s in specs):
        raise LensError(f"lens sites are 'tower.component' names such as 'lm.hidden', got {list(sites)}")
    towers = {t for t, _ in specs}
    if len(towers) != 1:
        raise LensError(f"read one tower at a time; got {sorted(towers)}")
    tower = towers.pop()
    for _, comp in specs:
        if comp not in RESIDUAL:
            raise LensError(f"{tower}.{comp} is a component's output before the residual add, not the residual "
                            f"stream; the logit lens reads {[f'{tower}.{c}' for c in RESIDUAL]}")
    if tower not in vlm.adapter.towers():
        raise LensError(f"{vlm.family} models have no {tower!r} tower; towers: {vlm.adapter.towers()}")
    if not vlm.adapter.adapter.towers[tower].tail:
        has = [t for t in vlm.adapter.towers() if vlm.adapter.adapter.towers[t].tail]
        raise LensError(f"the {tower} tower of {vlm.family} has no unembedding the lens can read it with (it "
                        "produces no answer logits of its own); "
                        + (f"towers with one: {has}" if has else f"no tower of {vlm.family} exposes one (its answer "
                                                                 "decoder's head is not adapter data)"))
    return tower, [c for _, c in specs]


def _positions(example: Example, tower: str, tokens) -> list[int]:
    n = example.n_tokens
    if isinstance(tokens, str) and tokens == "each":
        return list(range(n))
    names = [tokens] if isinstance(tokens, str) else list(tokens)
    out: list[int] = []
    for name in names:
        found = example.positions(name, tower) if isinstance(name, str) else [int(name)]
        out += [p for p in found if p not in out]
    return sorted(out)


def logit_lens(vlm, example: Example, sites: Sequence[str] = ("lm.hidden",), tokens="each",
               answer: str | None = None, k: int = 5) -> "Lens":
    """The answer's probability, log-probability and rank, and the top-``k`` tokens, at every layer and position.

    ``sites`` are ``tower.component`` names of the residual stream (``lm.hidden``, ``lm.input``);
    ``tokens`` is ``"each"``, token-group names or positions. ``answer`` defaults to the example's;
    its first token is read (the lens can run without one: then only the top tokens are filled).
    """
    tower, comps = _components(vlm, sites)
    positions = _positions(example, tower, tokens)
    if not positions:
        raise LensError("no position to read: the token selection is empty")
    answer = answer if answer is not None else example.answer
    target = vlm.encode_answer(example, answer)[0] if answer is not None else None
    n_layers = vlm.adapter.n_layers[tower]
    hooks = {(c, l): vlm.hook(Site(tower, c, l), capture=True) for c in comps for l in range(n_layers)}
    with torch.no_grad(), applied(vlm, example), vlm.attach(hooks.values()):
        vlm.logits(example.inputs)
    tail = vlm.adapter.tail_modules(tower)
    grid = np.full((len(comps), len(QUANTITIES), n_layers, len(positions)), np.nan)
    top_tokens = {c: [] for c in comps}
    top_ids = {c: [] for c in comps}
    with torch.no_grad():
        for i, comp in enumerate(comps):
            for layer in range(n_layers):
                h = hooks[(comp, layer)].value[:1, positions]
                for module in tail:
                    h = module(h)
                logits = h[0].float()  # (positions, vocab)
                logp = torch.log_softmax(logits, dim=-1)
                if target is not None:
                    grid[i, 0, layer] = logp[:, target].exp().numpy()
                    grid[i, 1, layer] = logp[:, target].numpy()
                    grid[i, 2, layer] = (logits > logits[:, target:target + 1]).sum(-1).numpy()
                ids = torch.topk(logits, k, dim=-1).indices.tolist()
                top_ids[comp].append(ids)
                top_tokens[comp].append([[vlm.tokenizer.decode([t]) for t in row] for row in ids])
    groups = {}
    for name, members in example.groups.get(tower, {}).items():
        for p in members:
            groups.setdefault(p, name)
    labels = [example.tokens[p] if p < len(example.tokens) else str(p) for p in positions]
    coords = {"component": comps, "quantity": list(QUANTITIES), "layer": list(range(n_layers)), "position": positions,
              "token": ("position", labels), "group": ("position", [groups.get(p, "") for p in positions])}
    attrs = {"model": vlm.name, "tower": tower, "answer": answer or "", "answer_id": -1 if target is None else target,
             "question": example.question, "k": k, "top_tokens": top_tokens, "top_ids": top_ids,
             "method": "logit lens",
             "causal": "not causal: what the unembedding decodes from the residual stream, not what the model uses"}
    return Lens(xr.DataArray(grid, dims=["component", "quantity", "layer", "position"], coords=coords, attrs=attrs,
                             name="lens"))


@dataclass
class Lens(Labelled):
    """Logit-lens readings: ``data`` (component, quantity, layer, position) with quantities prob, logprob, rank.

    ``attrs['top_tokens'][component][layer][k]`` lists the top tokens at the ``k``-th position read.
    """

    def top(self, component: str = "hidden", layer: int = -1, rank: int = 0) -> list[str]:
        """The ``rank``-th top token at every position read, at one layer."""
        tops = self.attrs["top_tokens"][component]
        return [row[rank] for row in tops[layer]]

    def hits(self, words: Sequence[str], component: str = "hidden", top: int = 1) -> xr.DataArray:
        """Whether one of ``words`` is among the top-``top`` tokens (stripped, case-folded), per layer and position."""
        wanted = {w.strip().lower() for w in words}
        tops = self.attrs["top_tokens"][component]
        values = [[any(t.strip().lower() in wanted for t in row[:top]) for row in layer] for layer in tops]
        data = self.data.sel(component=component, quantity="prob")
        return xr.DataArray(np.array(values, dtype=bool), dims=["layer", "position"],
                            coords={"layer": data.coords["layer"], "position": data.coords["position"]})

    def answer_quantity(self, quantity: str = "prob", component: str = "hidden") -> xr.DataArray:
        if self.attrs.get("answer_id", -1) < 0:
            raise AnswerEncodingError("this lens was read without an answer; pass answer= to logit_lens")
        return self.data.sel(component=component, quantity=quantity)

    def plot(self, path, component: str = "hidden", quantity: str = "prob"):
        """Heatmap of layers x positions, with the top token written in each cell."""
        from .methods_plot import plot_lens

        return plot_lens(self, path, component, quantity)

    def plot_image(self, example: Example, path, component: str = "hidden", layer: int | None = None,
                   show: str = "top"):
        """The image tokens' readings on the patch grid: the top token per patch (``show="top"``) or the answer's
        probability (``show="prob"``)."""
        from .methods_plot import plot_lens_image

        return plot_lens_image(self, example, path, component, layer, show)
