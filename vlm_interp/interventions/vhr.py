"""Vision-aware heads: divergence with and without the image (VHD) and their reinforcement (VHR).

VHD of a head is the distance between its output at the current last token when the LM sees
the image tokens and when they are removed from its input. VHR picks, once per sequence at
the first generation step, the heads that react most to the image, and amplifies them by
``alpha`` for the rest of generation.

Selection rule (our reading of VHR, made explicit): over the chosen layers, heads whose VHD
lies above the Tukey fence (Q3 + 1.5 IQR) are outliers and are left alone; in each layer,
the remaining heads above that layer's median VHD are kept.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
import xarray as xr

from ..edits import applied
from ..example import Example
from ..hooks import Hook, resolve_module
from ..sites import Site
from .steps import InterventionError, StepTracker, lm_base_path, require_decoder_lm


def _last_head_outputs(vlm, base, embeds: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Every LM head's output at the last position of one ``(1, T, D)`` run of the LM base model."""
    layers = range(vlm.adapter.n_layers["lm"])
    hooks = []
    for layer in layers:
        path, kind = vlm.adapter.hook_point("lm", "head", layer)
        hooks.append(Hook(path, kind=kind, capture=True, name=f"VHD head capture {layer}"))
    with torch.no_grad(), vlm.attach(hooks):
        base(inputs_embeds=embeds, position_ids=position_ids, use_cache=False)
    n = vlm.adapter.n_heads["lm"]
    return torch.stack([h.value[0, -1].view(n, -1) for h in hooks])  # (layers, heads, head_dim)


def divergence_from_embeds(vlm, embeds: torch.Tensor, image: torch.Tensor,
                           position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """VHD (layers, heads) of one sequence given its LM input embeddings and its image-token mask.

    ``position_ids`` are those the model gave the LM for this sequence (M-RoPE families compute
    them from the image layout; positions on the last axis, one batch row); the run without the
    image tokens takes the LM's default positions for its shorter text.
    """
    if not image.any():
        raise InterventionError("this sequence has no image tokens; VHD compares runs with and without them")
    if image[-1]:
        raise InterventionError("the last token is an image token; VHD is measured at a text position")
    base = resolve_module(vlm.model, lm_base_path(vlm))
    with_image = _last_head_outputs(vlm, base, embeds, position_ids)
    without = _last_head_outputs(vlm, base, embeds[:, ~image])
    return (with_image - without).float().norm(dim=-1)


def _as_array(vlm, values: torch.Tensor) -> xr.DataArray:
    return xr.DataArray(values.cpu().numpy(), dims=("layer", "head"),
                        coords={"layer": list(range(values.shape[0])), "head": list(range(values.shape[1]))},
                        attrs={"model": vlm.name, "metric": "L2 distance of head outputs with and without image"})


def _require_causal_lm(vlm, what: str) -> None:
    """VHD reruns the LM on its input embeddings alone, which holds only for an LM that is causal everywhere."""
    require_decoder_lm(vlm, what)
    if vlm.adapter.adapter.attention_blocks is not None:
        raise InterventionError(
            f"{what} reruns the LM on its input embeddings alone, with its default causal mask and positions; "
            f"{vlm.family} models attend both ways over part of their input (adapter: attention_blocks), which such "
            "a rerun would drop, so it would not measure the model's own heads. Use IRI (inject) or head "
            "modulation (modulate_heads) instead"
        )


def head_divergence(vlm, example: Example) -> xr.DataArray:
    """VHD of every LM head at the example's last prompt token, as a (layer, head) array."""
    _require_causal_lm(vlm, "VHD")
    grab: dict[str, torch.Tensor] = {}

    def keep(args: tuple, kwargs: dict) -> None:
        grab.setdefault("embeds", kwargs.get("inputs_embeds"))
        grab.setdefault("position_ids", kwargs.get("position_ids"))

    with torch.no_grad(), applied(vlm, example), vlm.attach([Hook(lm_base_path(vlm), fn=keep, kind="call")]):
        vlm.logits(example.inputs)
    if grab.get("embeds") is None:
        raise InterventionError(f"{lm_base_path(vlm)} was not called with inputs_embeds; cannot separate the image")
    image = example.inputs["input_ids"][0] == vlm.image_token_id
    return _as_array(vlm, divergence_from_embeds(vlm, grab["embeds"], image, grab["position_ids"]))


def _row_positions(position_ids: torch.Tensor | None, row: int, keep: torch.Tensor) -> torch.Tensor | None:
    """One batch row's position ids at the kept positions (batch on the second-to-last axis, positions last)."""
    if not torch.is_tensor(position_ids):
        return None
    rows = position_ids.narrow(-2, row, 1) if position_ids.shape[-2] > 1 else position_ids
    return rows[..., keep]


def select_vision_heads(vhd: xr.DataArray, layers: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """(layer, head) pairs chosen by the rule in the module docstring."""
    values = vhd.transpose("layer", "head").values
    chosen_layers = list(range(values.shape[0])) if layers is None else list(layers)
    bad = [l for l in chosen_layers if not 0 <= l < values.shape[0]]
    if bad:
        raise InterventionError(f"VHR layers {bad} do not exist; the LM has layers 0..{values.shape[0] - 1}")
    pool = values[chosen_layers]
    q1, q3 = np.percentile(pool, [25, 75])
    fence = q3 + 1.5 * (q3 - q1)
    out = []
    for layer in chosen_layers:
        row = values[layer]
        normal = row <= fence
        if not normal.any():
            continue
        median = np.median(row[normal])
        out += [(layer, int(h)) for h in np.flatnonzero(normal & (row > median))]
    return out


@dataclass
class VHRState:
    """What VHR chose: per sequence (one entry per batch row and new prompt), its VHD and heads."""

    alpha: float
    layers: list[int] | None
    divergence: list[xr.DataArray] = field(default_factory=list)
    heads: list[list[str]] = field(default_factory=list)
    factors: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (batch, channels)


@contextlib.contextmanager
def vhr(vlm, alpha: float = 2.0, layers: Sequence[int] | None = None) -> Iterator[VHRState]:
    """Amplify vision-aware heads by ``alpha`` during generate (chosen at each new sequence's first step)."""
    _require_causal_lm(vlm, "VHR")
    if vlm.image_token_id is None:
        raise InterventionError(f"{vlm.family} models have no image token id; VHR cannot find the image tokens")
    state = VHRState(float(alpha), None if layers is None else list(layers))
    tracker = StepTracker(vlm)
    n, n_layers = vlm.adapter.n_heads["lm"], vlm.adapter.n_layers["lm"]

    def choose(args: tuple, kwargs: dict) -> None:
        if tracker.paused or not tracker.new_sequence:
            return
        embeds, mask = kwargs.get("inputs_embeds"), kwargs.get("attention_mask")
        if embeds is None or tracker.prompt_ids is None:
            raise InterventionError("VHR needs the prompt's input ids and embeddings at the first step")
        tracker.paused = True
        try:
            rows = []
            for r in range(embeds.shape[0]):
                keep = mask[r].bool() if torch.is_tensor(mask) and mask.dim() == 2 else torch.ones_like(
                    tracker.prompt_ids[r], dtype=torch.bool)
                image = tracker.prompt_ids[r][keep] == vlm.image_token_id
                positions = _row_positions(kwargs.get("position_ids"), r, keep)
                vhd = _as_array(vlm, divergence_from_embeds(vlm, embeds[r:r + 1, keep], image, positions))
                picks = select_vision_heads(vhd, state.layers)
                state.divergence.append(vhd)
                state.heads.append([Site("lm", "head", l, h).name for l, h in picks])
                rows.append(picks)
        finally:
            tracker.paused = False
        state.factors = {}
        for layer in range(n_layers):
            d = vlm.adapter.head_dim(Site("lm", "head", layer, 0))
            f = torch.ones(len(rows), n * d)
            for r, picks in enumerate(rows):
                for l, h in picks:
                    if l == layer:
                        f[r, h * d:(h + 1) * d] = state.alpha
            state.factors[layer] = f

    def amplify(layer: int):
        def run(t: torch.Tensor) -> torch.Tensor:
            if tracker.paused:
                return t
            f = state.factors[layer]
            if f.shape[0] != t.shape[0]:
                raise InterventionError(f"VHR chose heads for {f.shape[0]} sequences but the LM now runs "
                                        f"{t.shape[0]}; beam search and changing batches are not supported")
            return t * f.to(t.device, t.dtype)[:, None, :]
        return run

    hooks = tracker.hooks() + [Hook(tracker.path, fn=choose, kind="call", name="VHR head choice")]
    for layer in range(n_layers):
        path, kind = vlm.adapter.hook_point("lm", "head", layer)
        hooks.append(Hook(path, fn=amplify(layer), kind=kind, name=f"VHR amplify lm.head.{layer}"))
    with vlm.attach(hooks):
        yield state
