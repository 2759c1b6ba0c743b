"""Patched runs that start inside the language model, skipping what a patch cannot change.

A cell that restores sites of a decoder-only LM at layer ``l`` and positions ``>= p`` cannot
change anything the base run computed before layer ``l``, nor (the LM being causal) the
keys and values of positions ``< p``. So the base run is made once, with forward pre-hooks
on the LM's decoder layers recording each layer's input hidden states, the keyword
arguments the model passed (attention mask, position embeddings, position ids...) and the
key/value cache. A batch of cells then calls the decoder layer modules ``l..N-1`` directly
on the recorded input of layer ``l`` at positions ``p..T-1`` (keyword tensors sliced and
broadcast over the batch, earlier keys and values from a fresh cache filled with the
recorded ones), with the patch hooks active, and finishes with the tower's ``tail``
(final norm, LM head; adapter data) at the answer position only.

The vision tower, projector and everything else upstream thus run once; corruptions that
live inside the model (``Example.edits``) are in the recorded inputs, because the recording
hooks are attached after the edits. Nothing here copies or replaces model code: the layers
are the model's own modules, called as the model calls them.

When it applies: the traced sites are in the ``lm`` tower of a causal-decoder family whose
tower has a ``tail``, no edit sits inside the LM layers or after them, and a self-check
(the recorded state replayed from layer 0 gives the base run's answer logits, with and
without the key/value prefix) passes. Otherwise :func:`lm_start` returns ``None`` with the
reason and the engine uses its general path (whole-model forwards).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..corruptions.base import applied
from ..example import Example
from ..hooks import primary_tensor

TOWER = "lm"
# keyword arguments of a decoder layer that carry the sequence axis, and where: (dim, from the end?)
SEQUENCE_KWARGS = {"position_ids": -1, "cache_position": -1}
ROPE_KWARG = "position_embeddings"  # a (cos, sin) pair, each (batch, seq, dim)
DROPPED_KWARGS = ("hidden_states", "past_key_values", "use_cache")
SELF_CHECK_TOL = {torch.float32: 1e-4, torch.float64: 1e-6}  # other dtypes: 2e-2 (relative to the largest logit)


@dataclass
class LayerInput:
    """What the base run fed one decoder layer: hidden states, keywords, and that layer's keys/values."""

    hidden: torch.Tensor  # (1, T, H)
    kwargs: dict[str, Any]
    kv: tuple[torch.Tensor, torch.Tensor] | None = None  # (1, kv_heads, T, head_dim) each


@dataclass
class LMStart:
    """The base run's state at the entry of every LM decoder layer, ready to start patched runs there."""

    layers: list[nn.Module]
    tail: list[nn.Module]
    inputs: list[LayerInput]
    answer_at: int
    attn_implementation: str | None
    reference: torch.Tensor | None = None  # the base run's answer logits (vocab,)
    kv_reuse: bool = False
    why_no_kv: str = ""

    @property
    def seq_len(self) -> int:
        return self.inputs[0].hidden.shape[1]

    @property
    def width(self) -> int:
        return self.inputs[0].hidden.shape[2]

    def without_effect(self, layer: int, positions: tuple[int, ...], spread: bool = False) -> bool:
        """Whether restoring a cell (earliest ``layer``, ``positions``) provably leaves the answer logits as they are.

        A component's output at position ``p`` of a causal decoder reaches other positions
        only through the attention of later layers, so positions after the answer never
        matter, and at the last layer only the answer position does, unless the cell is
        ``spread`` (sites on several layers, or a layer's input, which that layer's attention reads).
        """
        if min(positions) > self.answer_at:
            return True
        return not spread and layer == len(self.layers) - 1 and self.answer_at not in positions

    def cost(self, rows: int, layer: int, position: int, span_end: int | None) -> int:
        """Positions x layers that :meth:`logits` computes for these arguments (the engine batches by it)."""
        start, n = self.start_position(position), len(self.layers)
        if span_end is None:
            return rows * (n - layer) * (self.seq_len - start)
        stop = max(span_end, self.answer_at if layer == n - 1 else span_end) + 1
        return rows * ((stop - start) + (n - layer - 1) * (self.seq_len - start))

    def start_position(self, position: int) -> int:
        """First position a run must compute when the earliest patched position is ``position``."""
        return min(position, self.answer_at) if self.kv_reuse else 0

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
            stop = max(span_end, self.answer_at if layer == len(self.layers) - 1 else span_end) + 1
            span = self._run(layer, self.inputs[layer].hidden[:, start:stop].repeat(rows, 1, 1), rows, start, stop)
            hidden, first = self.inputs[layer + 1].hidden[:, start:].repeat(rows, 1, 1), layer + 1
            hidden[:, :stop - start] = span
        for j in range(first, len(self.layers)):
            hidden = self._run(j, hidden, rows, start, self.seq_len)
        at = self.answer_at - start
        hidden = hidden[:, at:at + 1]
        for module in self.tail:
            hidden = primary_tensor(module(hidden), type(module).__name__)
        return hidden[:, 0]

    def _run(self, j: int, hidden: torch.Tensor, rows: int, start: int, stop: int) -> torch.Tensor:
        """Layer ``j`` on ``hidden`` (positions ``start..stop-1``), earlier keys and values from the base run."""
        cache = None
        if start:
            from transformers import DynamicCache

            keys, values = self.inputs[j].kv
            cache = DynamicCache()
            cache.update(keys[:, :, :start].repeat(rows, 1, 1, 1), values[:, :, :start].repeat(rows, 1, 1, 1), j)
        kwargs = self._kwargs(j, rows, start, stop)
        return primary_tensor(self.layers[j](hidden, past_key_values=cache, **kwargs), f"LM layer {j}")

    def _kwargs(self, j: int, rows: int, start: int, stop: int) -> dict[str, Any]:
        """Layer ``j``'s recorded keywords for queries at positions ``start..stop-1``, broadcast over ``rows``."""
        out = {}
        for key, value in self.inputs[j].kwargs.items():
            if key == ROPE_KWARG and isinstance(value, (tuple, list)):
                value = type(value)(_rows(t[:, start:stop], rows) for t in value)
            elif key == "attention_mask" and value is None and start:
                value = _causal_mask(stop, start, self.inputs[j].hidden.device)
            elif key == "attention_mask" and torch.is_tensor(value):
                value = value[..., start:stop, :stop]
            elif key in SEQUENCE_KWARGS and torch.is_tensor(value):
                value = value.narrow(SEQUENCE_KWARGS[key] % value.dim(), start, stop - start)
            out[key] = _rows(value, rows) if torch.is_tensor(value) else value
        return out


def _rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` broadcast to ``rows`` along the batch axis when it has a batch axis of one (a view)."""
    return t.expand(rows, *t.shape[1:]) if t.dim() >= 2 and t.shape[0] == 1 and rows > 1 else t


def _causal_mask(stop: int, start: int, device) -> torch.Tensor:
    """Boolean mask (1, 1, stop - start, stop) letting query ``start + i`` see keys ``0..start + i`` (SDPA format)."""
    full = torch.ones(stop, stop, dtype=torch.bool, device=device).tril()
    return full[start:][None, None]


def not_applicable(vlm, base: Example) -> str | None:
    """Why LM cells of this model and example cannot start inside the LM (``None`` when they can)."""
    spec = vlm.adapter.adapter
    if spec.decoder != "causal":
        return f"the {spec.family} answer tower is not a causal decoder LM"
    tower = spec.towers.get(TOWER)
    if tower is None or not tower.tail:
        return f"the {spec.family} adapter gives no tail (final norm, LM head) for its {TOWER} tower"
    first = f"{tower.layers}.0"
    downstream = [tower.layers] + [p.rstrip("?") for p in tower.tail]
    for edit in base.edits:
        if edit.module == first and edit.kind == "input":
            continue  # the recorded input of layer 0 includes it
        if any(edit.module == d or edit.module.startswith(d + ".") for d in downstream):
            return f"the example carries an edit at {edit.module!r}, inside or after the LM layers"
    return None


@contextlib.contextmanager
def _recording(layers: list[nn.Module], store: list) -> Iterator[None]:
    """Pre-hooks recording each layer's input and keywords into ``store[j]``, and the last output; always removed."""
    def recorder(j: int):
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            store[j].append((args, kwargs))
        return record

    def record_output(module: nn.Module, args: tuple, output: Any) -> None:
        store[-1].append(((primary_tensor(output, "the last LM layer"),), {}))

    handles = [layer.register_forward_pre_hook(recorder(j), with_kwargs=True) for j, layer in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(record_output))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _layer_input(j: int, args: tuple, kwargs: dict) -> tuple[LayerInput | None, Any, str]:
    """A :class:`LayerInput` from one recorded call (or ``None`` and why), plus the cache it was given."""
    if len(args) > 1:
        return None, None, f"LM layer {j} was called with {len(args)} positional arguments"
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not torch.is_tensor(hidden) or hidden.dim() != 3 or hidden.shape[0] != 1:
        return None, None, f"LM layer {j}'s input is not one (1, positions, width) tensor"
    rest = {k: v for k, v in kwargs.items() if k not in DROPPED_KWARGS}
    return LayerInput(hidden.detach().clone(), rest), kwargs.get("past_key_values"), ""


def _attach_kv(inputs: list[LayerInput], cache: Any) -> str:
    """Copy each layer's keys/values out of the base run's cache; returns why not ("" on success)."""
    if cache is None:
        return "the base run built no key/value cache"
    try:
        entries = list(cache)
    except TypeError:
        return f"{type(cache).__name__} cannot be iterated for its keys and values"
    if len(entries) < len(inputs) - 1:
        return f"the key/value cache holds {len(entries)} layers for {len(inputs) - 1} LM layers"
    seq_len = inputs[0].hidden.shape[1]
    for j, (entry, layer_input) in enumerate(zip(entries, inputs)):
        keys, values = entry[0], entry[1]
        if not (torch.is_tensor(keys) and keys.dim() == 4 and keys.shape[-2] == seq_len):
            return f"the cached keys of LM layer {j} do not cover the {seq_len} positions"
        layer_input.kv = (keys.detach().clone(), values.detach().clone())
    return ""


def _sequence_kwargs_known(inputs: list[LayerInput], attn_implementation: str | None) -> str:
    """Why the recorded keywords cannot be cut to a suffix of positions ("" when they can)."""
    seq_len = inputs[0].hidden.shape[1]
    for j, layer_input in enumerate(inputs):
        for key, value in layer_input.kwargs.items():
            if key == "attention_mask" and value is None and attn_implementation != "sdpa":
                return f"no attention mask was recorded and the {attn_implementation!r} attention needs one"
            if key == "attention_mask" and torch.is_tensor(value) and (
                    value.dim() != 4 or tuple(value.shape[-2:]) != (seq_len, seq_len)):
                return f"LM layer {j}'s attention mask has shape {tuple(value.shape)}, not (..., T, T)"
            if key in ("position_ids", "cache_position") and torch.is_tensor(value) and value.shape[-1] != seq_len:
                return f"LM layer {j}'s {key} has shape {tuple(value.shape)}, not (..., T)"
            if torch.is_tensor(value) and key not in SEQUENCE_KWARGS and key != "attention_mask":
                return f"LM layer {j} gets a tensor keyword {key!r} whose positions are unknown"
            if key == ROPE_KWARG and not (isinstance(value, (tuple, list)) and all(torch.is_tensor(t) for t in value)):
                return f"LM layer {j}'s {ROPE_KWARG} is not a pair of tensors"
    return ""


def _agrees(state: LMStart, position: int, reference: torch.Tensor) -> bool:
    """Whether replaying the recorded state from layer 0 (and ``position``) gives the reference logits."""
    with torch.no_grad():
        got = state.logits(1, 0, position)[0]
    tol = SELF_CHECK_TOL.get(got.dtype, 2e-2) * max(1.0, float(reference.abs().max()))
    return bool((got.float() - reference).abs().max() <= tol)


def lm_start(vlm, base: Example) -> tuple[LMStart | None, str]:
    """Record the base run at the entry of every LM layer; ``(None, reason)`` when the fast path cannot apply."""
    reason = not_applicable(vlm, base)
    if reason:
        return None, reason
    tower = vlm.adapter.adapter.towers[TOWER]
    layers = list(vlm.model.get_submodule(tower.layers))
    store: list[list] = [[] for _ in range(len(layers) + 1)]
    answer_at = vlm.answer_start(base)
    with torch.no_grad(), applied(vlm, base), _recording(layers, store):  # recorders run after the edits
        reference = vlm.logits({**base.inputs, "use_cache": True})[0, answer_at].float()
    inputs, cache = [], None
    for j, calls in enumerate(store):
        if len(calls) != 1:
            return None, f"LM layer {j} ran {len(calls)} times in one forward"
        layer_input, layer_cache, why = _layer_input(j, *calls[0])
        if layer_input is None:
            return None, why
        inputs.append(layer_input)
        cache = layer_cache if j < len(layers) else cache
    config = vlm.model.config.get_text_config(decoder=True)
    state = LMStart(layers, vlm.adapter.tail_modules(TOWER), inputs, answer_at,
                    getattr(config, "_attn_implementation", None), reference)
    if not _agrees(state, 0, reference):
        warnings.warn("replaying the recorded LM layers does not reproduce the model's logits; tracing uses "
                      "whole-model forwards for this model (slower, same results)", stacklevel=3)
        return None, "replaying the recorded LM layers does not reproduce the model's logits"
    state.why_no_kv = _attach_kv(inputs, cache) or _sequence_kwargs_known(inputs, state.attn_implementation)
    if not state.why_no_kv and answer_at > 0:
        state.kv_reuse = True
        if not _agrees(state, max(1, answer_at // 2), reference):
            state.kv_reuse, state.why_no_kv = False, "restarting at a later position does not reproduce the logits"
            warnings.warn(f"{state.why_no_kv}; patched runs recompute every position (slower, same results)",
                          stacklevel=3)
    return state, ""
