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

What it may replay is data: the adapter's ``Tower.replay`` table lists the keywords a decoder
layer takes (attention mask, position ids, rotary embeddings...) and where their positions
and batch rows are. The key/value cache is found by its type (:mod:`vlm_interp.compat`) and
replaced by a fresh one, under the keyword the model used. Any other keyword makes it decline.

When it applies: the traced sites are in the ``lm`` tower of a causal-decoder family whose
tower has a ``tail``, no edit sits inside the LM layers or after them, every keyword is
understood, and a self-check passes (:func:`self_check`): two-row replays, one row
unchanged and one carrying a seeded perturbation at an early position, from layer 0 and from
a middle layer, from position 0 and (for key/value reuse) from a later position, each
compared with a whole-model forward under the same edit; the recorded state must be
unchanged afterwards. Otherwise :func:`lm_start` returns ``None`` with the reason, and the
engine warns and uses its general path (whole-model forwards), which gives the same numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import compat
from ..adapters.base import Replay
from ..corruptions.base import applied
from ..example import Example
from ..hooks import Hook, primary_tensor
from ..sites import Site

TOWER = "lm"
# Self-check tolerance on the answer logits, relative to the largest reference logit (at least 1). float32: a replay
# runs the same operations on fewer rows and positions, so only reduction orders differ (benchmarks/bench_trace.py:
# the fast grid is within 2.4e-7 of a plain loop on shapes-llava). Half precision: set from the rounding of one
# value, 2^-8 for bf16 and 2^-11 for fp16, with room for its accumulation over the layers; not yet measured.
SELF_CHECK_TOL = {torch.float32: 1e-4, torch.float64: 1e-6, torch.float16: 1e-2, torch.bfloat16: 3e-2}
# the self-check's perturbation must move the answer logits by this many tolerances, or the check could pass blind
SELF_CHECK_VISIBLE = 10.0
SELF_CHECK_SEED = 0
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


def _recording_hooks(tower_layers: str, n: int, store: list[list]) -> list[Hook]:
    """Observer hooks recording each layer's call (input and keywords) into ``store[j]``, and the last output."""
    def recorder(j: int):
        def record(args: tuple, kwargs: dict) -> None:
            store[j].append((args, dict(kwargs)))
        return record

    hooks = [Hook(f"{tower_layers}.{j}", fn=recorder(j), kind="call", name=f"fast path: record LM layer {j}")
             for j in range(n)]
    return hooks + [Hook(f"{tower_layers}.{n - 1}", capture=True, name="fast path: last LM layer output")]


def _layer_input(j: int, args: tuple, kwargs: dict) -> tuple[LayerInput | None, str | None, Any, str]:
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


def _replay_problem(inputs: list[LayerInput], replay: dict[str, Replay]) -> str:
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


def _attach_kv(inputs: list[LayerInput], caches: list[Any], keys: set) -> str:
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


def _mask_problem(inputs: list[LayerInput], attn_implementation: str | None) -> str:
    """Why a run cannot restart after a prefix of positions for want of a mask ("" when it can)."""
    for j, layer_input in enumerate(inputs):
        mask = layer_input.kwargs.get("attention_mask")
        masks = mask.values() if isinstance(mask, dict) else [mask]
        if "attention_mask" in layer_input.kwargs and any(m is None for m in masks) and attn_implementation != "sdpa":
            return (f"LM layer {j} got no attention mask and the {attn_implementation!r} attention needs one to "
                    f"restart after a prefix")
    return ""


# ---- the self-check ----------------------------------------------------------------------
def _add_at(row: int, position: int, delta: torch.Tensor, offset: int):
    """An edit adding ``delta`` at one row and (absolute) position of a tensor that starts at ``offset``."""
    def edit(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[row, position - offset] += delta.to(t.device, t.dtype)
        return t
    return edit


def _fingerprint(state: LMStart) -> list:
    """Shapes and sums of everything recorded, to show that replays leave the recorded state as it was."""
    tensors = [x.hidden for x in state.inputs] + [t for x in state.inputs if x.kv for t in x.kv]
    return [(tuple(t.shape), float(t.double().sum())) for t in tensors]


@dataclass(frozen=True)
class Probe:
    """A seeded perturbation the self-check replays: ``delta`` added at ``site``, ``position``, and its effect."""

    site: Site
    layer: int  # where the replay starts
    span: bool  # run ``layer`` on a span of positions, as the engine runs one-layer cells
    position: int
    delta: torch.Tensor
    expected: torch.Tensor  # the answer logits of a whole-model forward under the perturbation


def _probe(vlm, base: Example, state: LMStart, site: Site, span: bool, first: int, recorded: torch.Tensor,
           generator: torch.Generator, tol: float) -> Probe | None:
    """A seeded perturbation at ``site`` that moves the answer logits by ``SELF_CHECK_VISIBLE`` tolerances.

    Tries position ``first``, then the answer's own, each at two strengths (relative to the
    recorded activation's size there); ``None`` when none is visible.
    """
    direction = torch.randn(state.width, generator=generator)
    for position in sorted({first, state.answer_at}):
        scale = float(recorded[0, position].float().pow(2).mean().sqrt()) or 1.0
        for strength in (1.0, 16.0):
            delta = direction * scale * strength
            with torch.no_grad(), applied(vlm, base), vlm.hooks([vlm.hook(site, _add_at(0, position, delta, 0))]):
                expected = vlm.logits(base.inputs)[0, state.answer_at].float()
            if float((expected - state.reference).abs().max()) > SELF_CHECK_VISIBLE * tol:
                return Probe(site, site.layer if span else 0, span, position, delta, expected)
    return None


def _tolerance(state: LMStart) -> float:
    return SELF_CHECK_TOL.get(state.dtype, 2e-2) * max(1.0, float(state.reference.abs().max()))


def probes(vlm, base: Example, state: LMStart) -> tuple[list[Probe], str]:
    """The self-check's two perturbations (or why none can be found), at or after position ``answer_at // 2``.

    One perturbs layer 0's input (a replay from layer 0), one the middle layer's output (a
    replay of that layer on a span of positions; at the last layer only the answer position
    reaches the answer). Positions from ``answer_at // 2`` on serve replays from position 0
    and from ``answer_at // 2`` alike.
    """
    n, early = len(state.layers), state.answer_at // 2
    generator = torch.Generator().manual_seed(SELF_CHECK_SEED)
    middle = (n - 1) // 2
    out = []
    for site, span, first in ((Site(TOWER, "input", 0), False, early),
                              (Site(TOWER, "hidden", middle), True, early if middle < n - 1 else state.answer_at)):
        recorded = state.inputs[site.layer + (site.component == "hidden")].hidden
        found = _probe(vlm, base, state, site, span, first, recorded, generator, _tolerance(state))
        if found is None:
            return [], (f"no perturbation of {site.name} at position {first} or {state.answer_at} moves the answer "
                        "logits, so the self-check cannot tell a right replay from a wrong one")
        out.append(found)
    return out, ""


def self_check(vlm, state: LMStart, checks: list[Probe], position: int) -> str:
    """Why replaying the recorded state from ``position`` is not exact ("" when it is).

    For each probe, a replay of two rows: row 0 unchanged must give the base run's answer
    logits, row 1 carrying the probe's perturbation those of the whole-model forward under it,
    which moves the logits by at least ``SELF_CHECK_VISIBLE`` tolerances, so a replay that
    ignored the patch (or replayed stale state) cannot pass. The recorded state must be
    unchanged afterwards.
    """
    tol, before = _tolerance(state), _fingerprint(state)
    offset = state.start_position(position)
    for probe in checks:
        if probe.position < offset:
            return f"the self-check's perturbation at position {probe.position} precedes the restart at {offset}"
        with torch.no_grad(), vlm.hooks([vlm.hook(probe.site, _add_at(1, probe.position, probe.delta, offset))]):
            got = state.logits(2, probe.layer, position, probe.position if probe.span else None).float()
        for row, want, what in ((0, state.reference, "unchanged"), (1, probe.expected, f"perturbed at {probe.site}")):
            err = float((got[row] - want).abs().max())
            if not err <= tol:
                return (f"replaying the recorded LM layers from layer {probe.layer}, position {offset} does not "
                        f"reproduce the model's answer logits (row {what}: off by {err:.2e}, tolerance {tol:.2e})")
    if _fingerprint(state) != before:
        return "replaying the recorded LM layers changed the recorded state"
    return ""


def _guarded_check(vlm, state: LMStart, checks: list[Probe], position: int) -> str:
    """:func:`self_check`, with any error other than running out of memory turned into its reason."""
    try:
        return self_check(vlm, state, checks, position)
    except (torch.OutOfMemoryError, MemoryError):
        raise
    except Exception as err:  # noqa: BLE001 - a replay that raises is a replay that does not apply
        return f"replaying the recorded LM layers from position {position} raised {type(err).__name__}: {err}"


def lm_start(vlm, base: Example) -> tuple[LMStart | None, str]:
    """Record the base run at the entry of every LM layer; ``(None, reason)`` when the fast path cannot apply.

    Key/value reuse (restarting after a prefix of positions) is switched on only when its own
    self-check passes; otherwise ``state.why_no_kv`` says why, and runs recompute every position.
    """
    reason = not_applicable(vlm, base)
    if reason:
        return None, reason
    tower = vlm.adapter.adapter.towers[TOWER]
    n = vlm.adapter.n_layers[TOWER]
    store: list[list] = [[] for _ in range(n)]
    hooks = _recording_hooks(tower.layers, n, store)
    answer_at = vlm.answer_start(base)
    with torch.no_grad(), applied(vlm, base), vlm.hooks(hooks):  # recorders run after the edits
        reference = vlm.logits({**base.inputs, "use_cache": True})[0, answer_at].float()
    store.append([((hooks[-1].value,), {})])
    inputs, keys, caches = [], set(), []
    for j, calls in enumerate(store):
        if len(calls) != 1:
            return None, f"LM layer {j} ran {len(calls)} times in one forward"
        layer_input, key, cache, why = _layer_input(j, *calls[0])
        if layer_input is None:
            return None, why
        inputs.append(layer_input)
        if j < n:
            keys.add(key)
            caches.append(cache)
    why = _replay_problem(inputs[:n], tower.replay)
    if why:
        return None, why
    config = vlm.model.config.get_text_config(decoder=True)
    layers = list(vlm.model.get_submodule(tower.layers))
    state = LMStart(layers, vlm.adapter.tail_modules(TOWER), inputs, answer_at, compat.attn_implementation(config),
                    tower.replay, next(iter(keys)) if len(keys) == 1 else None, reference)
    checks, why = probes(vlm, base, state)
    why = why or _guarded_check(vlm, state, checks, 0)
    if why:
        return None, why
    if answer_at == 0:
        state.why_no_kv = "the answer is predicted at position 0, so no prefix precedes it"
        return state, ""
    state.why_no_kv = _attach_kv(inputs, caches, keys) or _mask_problem(inputs[:n], state.attn_implementation)
    if not state.why_no_kv:
        state.kv_reuse = True
        why = _guarded_check(vlm, state, checks, max(1, answer_at // 2))
        if why:
            state.kv_reuse, state.why_no_kv = False, f"restarting at a later position failed its self-check: {why}"
    return state, ""
