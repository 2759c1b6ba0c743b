"""Attention maps over the image, per layer and head, averaged over heads, and attention rollout.

The weights come from vlm-interp's attention dispatcher (:mod:`vlm_interp.compat`), which runs eager
attention for the captured modules whatever implementation the model was loaded with (the tests
check them against transformers' own eager attention). Rollout (Abnar & Zuidema 2020) composes the
head-averaged self-attention of every layer, each mixed half and half with the identity for the
residual stream, and reads the query's row.

Attention weights are correlational: where a query looks is not what the answer depends on. The
maps say so (``attrs['causal']``), and their plots show knockout effects next to them when given
(:mod:`vlm_interp.tracing.knockout` measures what cutting those edges does to the answer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import xarray as xr

from .. import compat
from ..corruptions.base import applied
from ..example import Example
from .knockout import KnockoutError, attention_spec, positions
from .results import Labelled

NOT_CAUSAL = ("attention weights are correlational, not a causal effect: where a query looks is not what the answer "
              "depends on (see attention knockout)")


class WeightCapture(compat.AttentionEdit):
    """Records the attention weights (heads, queries, keys) of the first batch row of every call of ``modules``."""

    eager = True

    def __init__(self, modules: Sequence, layers: Sequence[int]):
        super().__init__(modules)
        self.layer_of = {id(m): layer for m, layer in zip(modules, layers)}
        self.weights: dict[int, torch.Tensor] = {}
        self.queries: dict[int, torch.Tensor] = {}
        self.cross = False

    def observe(self, call: compat.AttentionCall, weights: torch.Tensor) -> None:
        layer = self.layer_of[id(call.module)]
        if layer in self.weights:
            raise KnockoutError(f"attention layer {layer} ran twice in one capture; capture one forward at a time")
        self.weights[layer] = weights[0].detach().float().cpu()
        self.queries[layer] = torch.arange(call.q_len) if self.cross else call.self_positions()


def rollout(mean_weights: Sequence[torch.Tensor], residual: float = 0.5) -> list[torch.Tensor]:
    """Cumulative attention rollout: after layer ``l``, ``(A_l ... A_0)`` with ``A = (1 - r) W + r I``, rows
    normalised."""
    out, total = [], None
    for w in mean_weights:
        a = (1 - residual) * w + residual * torch.eye(w.shape[-1])
        a = a / a.sum(-1, keepdim=True)
        total = a if total is None else a @ total
        out.append(total)
    return out


def attention_maps(vlm, example: Example, tower: str = "lm", component: str = "attn", query="last",
                   layers: Sequence[int] | None = None, with_rollout: bool | None = None) -> "AttentionMaps":
    """Attention weights from the ``query`` positions (averaged over them) to every key, per layer and head.

    ``query`` is a token-group name or positions of ``tower``; keys are ``tower``'s own positions, or
    for cross-attention (``component="xattn"``) the positions of the tower it reads (the vision
    tower's patches for a Q-Former). ``with_rollout`` (default: for self-attention over all layers)
    adds the cumulative rollout, which needs every layer.
    """
    spec = attention_spec(vlm, tower, component)
    cross = spec.keys is not None
    have = vlm.adapter.layers_with(tower, component)
    chosen = list(have if layers is None else [vlm.adapter.n_layers[tower] + l if l < 0 else l for l in layers])
    if set(chosen) - set(have):
        raise KnockoutError(f"{tower}.{component} exists on layers {have}, not {sorted(set(chosen) - set(have))}")
    if with_rollout is None:
        with_rollout = not cross and layers is None
    if with_rollout and cross:
        raise KnockoutError("rollout composes a tower's self-attention across layers; cross-attention has none")
    run_layers = sorted(set(chosen) | (set(have) if with_rollout else set()))
    label, query_pos = positions(vlm, example, query, tower)
    modules = [vlm.model.get_submodule(vlm.adapter.attention_path(tower, component, l)) for l in run_layers]
    grab = WeightCapture(modules, run_layers)
    grab.cross = cross
    with torch.no_grad(), applied(vlm, example), compat.attention_edits(vlm.model, [grab]):
        vlm.logits(example.inputs)
    n_keys = grab.weights[run_layers[0]].shape[-1]
    rows = {l: torch.isin(grab.queries[l], torch.tensor(query_pos)) for l in run_layers}
    if not rows[run_layers[0]].any():
        raise KnockoutError(f"query {label!r} holds none of the positions this attention computes")
    heads = grab.weights[run_layers[0]].shape[0]
    grid = np.stack([grab.weights[l][:, rows[l]].mean(1).numpy() for l in chosen])  # (layer, head, key)
    keys_tower = spec.keys or tower
    member: dict[int, str] = {}
    for name in ("text", "question", "image", "cls", "object", "last"):
        for p in example.groups.get(keys_tower, {}).get(name, []):
            member[p] = name
    tokens = example.tokens if keys_tower == "lm" and len(example.tokens) == n_keys else [str(p) for p in range(n_keys)]
    attrs = {"model": vlm.name, "tower": tower, "component": component, "keys_tower": keys_tower, "query": label,
             "query_positions": list(query_pos), "question": example.question, "method": "attention weights",
             "causal": NOT_CAUSAL}
    if with_rollout:
        mean = [grab.weights[l].mean(0) for l in run_layers]
        cumulative = rollout(mean)
        attrs["rollout"] = [r[rows[run_layers[-1]]].mean(0).tolist() for r in cumulative]
    coords = {"layer": chosen, "head": list(range(heads)), "position": list(range(n_keys)),
              "token": ("position", tokens), "group": ("position", [member.get(p, "") for p in range(n_keys)])}
    return AttentionMaps(xr.DataArray(grid, dims=["layer", "head", "position"], coords=coords, attrs=attrs,
                                      name="attention"))


@dataclass
class AttentionMaps(Labelled):
    """Attention weights (layer, head, key position) from one query group; ``attrs['causal']`` says what they are not.
    """

    def mean_heads(self) -> xr.DataArray:
        return self.data.mean("head")

    def rollout(self) -> xr.DataArray:
        """Cumulative rollout after each layer (layer, key position)."""
        if "rollout" not in self.attrs:
            raise KnockoutError("these maps were taken without rollout (it needs every layer of a self-attention)")
        values = np.array(self.attrs["rollout"])
        return xr.DataArray(values, dims=["layer", "position"],
                            coords={"layer": list(range(values.shape[0])), "position": self.data.coords["position"]})

    def on_image(self, values, example: Example) -> np.ndarray:
        """A per-key-position array drawn as a (height, width) map over ``example``'s image (0 off the patches)."""
        boxes = example.boxes.get(self.attrs["keys_tower"], {})
        if not boxes:
            raise KnockoutError(f"the {self.attrs['keys_tower']} tower's positions cover no image region (Q-Former "
                                "queries, for example); take maps of the Q-Former's cross-attention instead")
        heat = np.zeros(example.image_hw)
        values = np.asarray(getattr(values, "values", values), float)
        for pos, box in boxes.items():
            y0, x0, y1, x1 = (int(round(v)) for v in box)
            heat[max(0, y0):y1, max(0, x0):x1] = values[pos]
        return heat

    def plot(self, example: Example, path, layer: int | None = None, knockout=None):
        """Head-averaged map and rollout over the image, per-head maps of one layer, and knockout effects if given."""
        from .methods_plot import plot_attention

        return plot_attention(self, example, path, layer, knockout)
