"""The LM's recorded layer inputs, and their replay from a layer and a position (the fast path's data).

:class:`LMStart` holds what the base run passed to every decoder layer (hidden states, the keywords
the adapter's ``Tower.replay`` table describes, the key/value cache found by type, and what the model
adds to the residual stream between layers outside them where the adapter's ``Tower.added_after`` says
so) and cuts them for a batch of cells that start at layer ``l`` and position ``p``; the functions below record them with
the hook engine and say, in words, what cannot be replayed. :mod:`~vlm_interp.tracing.fast` decides
when replaying applies and checks it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import compat
from ..adapters.base import Replay, soft_cap
from ..hooks import Hook, primary_tensor

UNSET = Replay("constant")  # how a keyword the adapter does not list is replayed: it may only be None

@dataclass
class LayerInput:
    """What the base run fed one decoder layer: hidden states, keywords, and that layer's keys/values."""

    hidden: torch.Tensor  # (1, T, H)
    kwargs: dict[str, Any]  # the replayable keywords (the key/value cache is not among them)
    kv: tuple[torch.Tensor, torch.Tensor] | None = None  # (1, kv_heads, T, head_dim) each


@dataclass
class LMStart:
    """The base run's state at the entry of every LM decoder layer, ready to start patched runs there."""

    layers: list[nn.Module]
    tail: list[nn.Module]
    inputs: list[LayerInput]  # one per layer, then the last layer's output
    answer_at: int
    attn_implementation: str | None
    replay: dict[str, Replay]
    cache_key: str | None = None  # the keyword the layers received their key/value cache under
    reference: torch.Tensor | None = None  # the base run's answer logits (vocab,)
    kv_reuse: bool = False
    why_no_kv: str = ""
    # blocks of positions (first, last) that attend to each other both ways (Adapter.attention_blocks): a patch inside
    # one changes its earlier positions, so restarts and spans never cut through a block
    blocks: list[tuple[int, int]] = field(default_factory=list)
    softcap: float | None = None  # the final-logit soft cap after the tail (Tower.softcap)
    # what the model added to the residual stream after layer j, outside the layers (adapter: Tower.added_after):
    # the recorded input of layer j + 1 minus layer j's output, (1, T, H); replays add it after layer j
    adds: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def seq_len(self) -> int:
        return self.inputs[0].hidden.shape[1]

    @property
    def width(self) -> int:
        return self.inputs[0].hidden.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.inputs[0].hidden.dtype

    def without_effect(self, layer: int, positions: tuple[int, ...], spread: bool = False) -> bool:
        """Whether restoring a cell (earliest ``layer``, ``positions``) provably leaves the answer logits as they are.

        A component's output at position ``p`` of a causal decoder reaches other positions
        only through the attention of later layers, so positions after the answer (and after
        the block of positions attending both ways that holds it) never matter, and at the
        last layer only the answer position does, unless the cell is ``spread`` (sites on
        several layers, or a layer's input, which that layer's attention reads).
        """
        horizon = max([self.answer_at] + [last for first, last in self.blocks if first <= self.answer_at <= last])
        if min(positions) > horizon:
            return True
        return not spread and layer == len(self.layers) - 1 and self.answer_at not in positions

    def cost(self, rows: int, layer: int, position: int, span_end: int | None) -> int:
        """Positions x layers that :meth:`logits` computes for these arguments (the engine batches by it)."""
        start, n = self.start_position(position), len(self.layers)
        if span_end is None:
            return rows * (n - layer) * (self.seq_len - start)
        return rows * ((self.span_stop(layer, span_end) - start) + (n - layer - 1) * (self.seq_len - start))

    def start_position(self, position: int) -> int:
        """First position a run must compute when the earliest patched position is ``position``.

        Without key/value reuse, 0. With it, the patched position (or the answer's, if earlier),
        moved back to the first position of a block attending both ways that holds it: a patch
        inside a block changes the block's earlier positions too.
        """
        if not self.kv_reuse:
            return 0
        start = min(position, self.answer_at)
        for first, last in self.blocks:
            if first < start <= last:
                start = first
        return start

    def span_stop(self, layer: int, span_end: int) -> int:
        """End (exclusive) of the positions a one-layer run at ``layer`` computes for patches up to ``span_end``.

        The span reaches the answer at the last layer, and the end of any block attending both
        ways that it cuts through (the block's earlier positions read its later keys).
        """
        stop = max(span_end, self.answer_at if layer == len(self.layers) - 1 else span_end) + 1
        for first, last in self.blocks:
            if first < stop <= last:
                stop = last + 1
        return stop

    def logits(self, rows: int, layer: int, position: int = 0, span_end: int | None = None) -> torch.Tensor:
        """Answer logits (rows, vocab) of ``rows`` copies of the base run restarted at ``layer``, ``position``.

        Patch hooks attached by the caller fire as the layers run; tensors they see start at
        position ``start_position(position)`` (the engine's writers take the offset). With
        ``span_end`` every patch sits at ``layer`` within positions ``position..span_end``:
        nothing else of that layer can change (its keys and values come from its input), so
        ``layer`` runs on that span only and the base run's output fills in its other positions.
        """
        start = self.start_position(position)
        if span_end is None:
            hidden, first = self.inputs[layer].hidden[:, start:].repeat(rows, 1, 1), layer
        else:
            stop = self.span_stop(layer, span_end)
            span = self._run(layer, self.inputs[layer].hidden[:, start:stop].repeat(rows, 1, 1), rows, start, stop)
            hidden, first = self.inputs[layer + 1].hidden[:, start:].repeat(rows, 1, 1), layer + 1
            hidden[:, :stop - start] = self._added(layer, span, start, stop)
        for j in range(first, len(self.layers)):
            hidden = self._added(j, self._run(j, hidden, rows, start, self.seq_len), start, self.seq_len)
        at = self.answer_at - start
        hidden = hidden[:, at:at + 1]
        for module in self.tail:
            hidden = primary_tensor(module(hidden), type(module).__name__)
        return soft_cap(hidden, self.softcap)[:, 0]

    def _added(self, j: int, hidden: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Layer ``j``'s output (positions ``start..stop-1``) plus what the model adds after it outside the layers."""
        return hidden + self.adds[j][:, start:stop] if j in self.adds else hidden

    def _run(self, j: int, hidden: torch.Tensor, rows: int, start: int, stop: int) -> torch.Tensor:
        """Layer ``j`` on ``hidden`` (positions ``start..stop-1``), earlier keys and values from the base run.

        The layer gets a fresh cache (holding the base run's keys and values before ``start``,
        or nothing) under the keyword the model used, never the base run's own cache.
        """
        kwargs = self._kwargs(j, rows, start, stop)
        if start:
            keys, values = self.inputs[j].kv
            cache = compat.new_cache()
            cache.update(keys[:, :, :start].repeat(rows, 1, 1, 1), values[:, :, :start].repeat(rows, 1, 1, 1), j)
            kwargs[self.cache_key] = cache
        elif self.cache_key is not None:
            kwargs[self.cache_key] = None
        return primary_tensor(self.layers[j](hidden, **kwargs), f"LM layer {j}")

    def _kwargs(self, j: int, rows: int, start: int, stop: int) -> dict[str, Any]:
        """Layer ``j``'s recorded keywords for queries at positions ``start..stop-1``, broadcast over ``rows``."""
        device = self.inputs[j].hidden.device
        return {key: _cut(value, self.replay.get(key, UNSET), rows, start, stop, device)
                for key, value in self.inputs[j].kwargs.items()}


def _rows(t: torch.Tensor, rows: int, axis: int | None) -> torch.Tensor:
    """``t`` broadcast to ``rows`` along its batch ``axis`` when that axis has one row (a view)."""
    if axis is None or rows == 1 or t.dim() == 0:
        return t
    axis %= t.dim()
    if t.shape[axis] != 1:
        return t
    shape = list(t.shape)
    shape[axis] = rows
    return t.expand(*shape)


def _causal_mask(stop: int, start: int, device) -> torch.Tensor:
    """Boolean mask (1, 1, stop - start, stop) letting query ``start + i`` see keys ``0..start + i`` (SDPA format)."""
    full = torch.ones(stop, stop, dtype=torch.bool, device=device).tril()
    return full[start:][None, None]


def _cut(value: Any, spec: Replay, rows: int, start: int, stop: int, device) -> Any:
    """One recorded keyword for queries at positions ``start..stop-1`` (keys ``0..stop-1``), over ``rows`` rows."""
    if spec.kind == "constant" or (value is None and spec.kind != "mask"):
        return value
    if spec.kind == "sequence":
        return _rows(value.narrow(spec.seq_axis % value.dim(), start, stop - start), rows, spec.batch_axis)
    if spec.kind == "pair":
        return type(value)(_cut(t, Replay("sequence", spec.seq_axis, spec.batch_axis), rows, start, stop, device)
                           for t in value)
    if isinstance(value, dict):  # one mask per layer type
        return {k: _cut(v, spec, rows, start, stop, device) for k, v in value.items()}
    if value is None:  # SDPA's causal default: fine for a square run from 0, a real mask after a prefix
        return _causal_mask(stop, start, device) if start else None
    return _rows(value[..., start:stop, :stop], rows, spec.batch_axis)


def recording_hooks(tower_layers: str, n: int, store: list[list], added_after: tuple[int, ...] = ()) -> list[Hook]:
    """Observer hooks recording each layer's call (input and keywords) into ``store[j]``, the last output, and the
    outputs of the layers after which the model adds to the residual stream (``added_after``), in that order."""
    def recorder(j: int):
        def record(args: tuple, kwargs: dict) -> None:
            store[j].append((args, dict(kwargs)))
        return record

    hooks = [Hook(f"{tower_layers}.{j}", fn=recorder(j), kind="call", name=f"fast path: record LM layer {j}")
             for j in range(n)]
    hooks.append(Hook(f"{tower_layers}.{n - 1}", capture=True, name="fast path: last LM layer output"))
    return hooks + [Hook(f"{tower_layers}.{j}", capture=True, name=f"fast path: LM layer {j} output before additions")
                    for j in added_after]


def layer_input(j: int, args: tuple, kwargs: dict) -> tuple[LayerInput | None, str | None, Any, str]:
    """A :class:`LayerInput` from one recorded call (or ``None`` and why), and the (keyword, cache) it was given."""
    if len(args) > 1:
        return None, None, None, f"LM layer {j} was called with {len(args)} positional arguments"
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not torch.is_tensor(hidden) or hidden.dim() != 3 or hidden.shape[0] != 1:
        return None, None, None, f"LM layer {j}'s input is not one (1, positions, width) tensor"
    try:
        key, cache = compat.find_cache(kwargs)
    except compat.CompatibilityError as err:
        return None, None, None, f"LM layer {j}: {err}"
    rest = {k: v for k, v in kwargs.items() if k not in ("hidden_states", key)}
    return LayerInput(hidden.detach().clone(), rest), key, cache, ""


def replay_problem(inputs: list[LayerInput], replay: dict[str, Replay]) -> str:
    """Why the recorded keywords cannot be cut to a run's positions ("" when every one can)."""
    seq_len = inputs[0].hidden.shape[1]

    def positions_ok(t: Any, axis: int) -> bool:
        return torch.is_tensor(t) and t.dim() > 0 and t.shape[axis % t.dim()] == seq_len

    for j, layer_input in enumerate(inputs):
        for key, value in layer_input.kwargs.items():
            spec = replay.get(key)
            if spec is None:
                if value is None:
                    continue  # an unset option carries nothing to replay
                return (f"LM layer {j} gets a keyword {key!r} ({type(value).__name__}) that the fast path does not "
                        f"know how to replay; list it in the adapter's Tower.replay")
            what = f"LM layer {j}'s {key!r}"
            if spec.kind == "constant" and torch.is_tensor(value):
                return f"{what} is a tensor, but the adapter lists it as a constant"
            if spec.kind == "sequence" and value is not None and not positions_ok(value, spec.seq_axis):
                return f"{what} has shape {_shape(value)}, not {seq_len} positions on axis {spec.seq_axis}"
            if spec.kind == "pair" and value is not None and not (
                    isinstance(value, (tuple, list)) and all(positions_ok(t, spec.seq_axis) for t in value)):
                return f"{what} is not a pair of tensors with {seq_len} positions on axis {spec.seq_axis}"
            if spec.kind == "mask":
                for mask in (value.values() if isinstance(value, dict) else [value]):
                    if mask is not None and not (torch.is_tensor(mask) and mask.dim() == 4
                                                 and tuple(mask.shape[-2:]) == (seq_len, seq_len)):
                        return f"{what} has shape {_shape(mask)}, not (batch, heads, {seq_len}, {seq_len})"
    return ""


def _shape(value: Any) -> Any:
    return tuple(value.shape) if torch.is_tensor(value) else type(value).__name__


def attach_kv(inputs: list[LayerInput], caches: list[Any], keys: set) -> str:
    """Copy each layer's keys/values out of the base run's cache; returns why not ("" on success)."""
    if None in caches:
        return "the base run built no key/value cache"
    if len(keys) != 1 or any(c is not caches[0] for c in caches):
        return f"the LM layers received different caches (keywords {sorted(map(str, keys))})"
    try:
        entries = compat.cache_entries(caches[0])
    except compat.CompatibilityError as err:
        return str(err)
    if len(entries) < len(caches):
        return f"the key/value cache holds {len(entries)} layers for {len(caches)} LM layers"
    seq_len = inputs[0].hidden.shape[1]
    for j, (keys_j, values_j) in enumerate(entries[:len(caches)]):
        if not (keys_j.dim() == 4 and keys_j.shape[0] == 1 and keys_j.shape[-2] == seq_len):
            return f"the cached keys of LM layer {j} do not cover the {seq_len} positions"
        inputs[j].kv = (keys_j.detach().clone(), values_j.detach().clone())
    return ""


def mask_problem(inputs: list[LayerInput], attn_implementation: str | None) -> str:
    """Why a run cannot restart after a prefix of positions for want of a mask ("" when it can)."""
    for j, layer_input in enumerate(inputs):
        mask = layer_input.kwargs.get("attention_mask")
        masks = mask.values() if isinstance(mask, dict) else [mask]
        if "attention_mask" in layer_input.kwargs and any(m is None for m in masks) and attn_implementation != "sdpa":
            return (f"LM layer {j} got no attention mask and the {attn_implementation!r} attention needs one to "
                    f"restart after a prefix")
    return ""


# ---- the self-check ----------------------------------------------------------------------
