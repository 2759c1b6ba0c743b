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

Attention that is not causal everywhere is adapter data too (``Adapter.attention_blocks``):
blocks of positions whose tokens attend to each other both ways (Gemma 3's image tokens,
PaliGemma's whole prompt). A patch inside a block changes the block's earlier positions, so a
restart after a prefix moves back to the block's first position and a one-layer span runs to
the block's end; where a block holds both position 0 and the answer (a prefix LM), no prefix
is reused at all and every run starts at position 0 (``why_no_kv`` says so). The self-check
perturbs and restarts inside the image tokens, where such blocks are, so an adapter that
declared a bidirectional LM causal fails it instead of giving wrong numbers. The final-logit
soft cap (``Tower.softcap``) follows the tail.

What it may replay is data: the adapter's ``Tower.replay`` table lists the keywords a decoder
layer takes (attention mask, position ids, rotary embeddings...) and where their positions
and batch rows are. The key/value cache is found by its type (:mod:`vlm_interp.compat`) and
replaced by a fresh one, under the keyword the model used. Any other keyword makes it decline.

When it applies: the traced sites are in the ``lm`` tower of a causal-decoder family whose
tower has a ``tail``, no edit sits inside the LM layers or after them, every keyword is
understood, and a self-check passes (:func:`self_check`): two-row replays, one row
unchanged and one carrying a seeded perturbation inside the image tokens (else at an early
position; :func:`probe_position`), from layer 0 and from
a middle layer, from position 0 and (for key/value reuse) from a later position, each
compared with a whole-model forward under the same edit; the recorded state must be
unchanged afterwards. Otherwise :func:`lm_start` returns ``None`` with the reason, and the
engine warns and uses its general path (whole-model forwards), which gives the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import compat

from ..corruptions.base import applied
from ..example import Example
from ..sites import Site
from .replay import LMStart, attach_kv, layer_input, mask_problem, recording_hooks, replay_problem

TOWER = "lm"
# Self-check tolerance on the answer logits, relative to the largest reference logit (at least 1). float32: a replay
# runs the same operations on fewer rows and positions, so only reduction orders differ (benchmarks/bench_trace.py:
# the fast grid is within 2.4e-7 of a plain loop on shapes-llava). Half precision: the logits come out rounded to the
# weights' type, so a replay that reduces in another order differs by whole units in the last place (ulp; 2^-7 of
# the largest logit's size in bf16, 2^-10 in fp16). Measured on CPU with shapes-llava, shapes-instructblip and the
# tiny families (seeded probes from layer 0 and a middle layer, from position 0 and a later one): at most 6.1e-3 in
# bf16 and 7.7e-4 in fp16, under one ulp. The tolerance allows 4 ulps (bf16 4 x 2^-7, fp16 4 x 2^-10) for deeper
# models, whose layers add reorderings; benchmarks/gpu_check.py reports the self-check's margin on a 7B LLaVA.
SELF_CHECK_TOL = {torch.float32: 1e-4, torch.float64: 1e-6, torch.float16: 4 * 2.0 ** -10,
                  torch.bfloat16: 4 * 2.0 ** -7}
# the self-check's perturbation must move the answer logits by this many tolerances, or the check could pass blind
SELF_CHECK_VISIBLE = 10.0
SELF_CHECK_SEED = 0
PROBE_STRENGTHS = (1.0, 16.0, 256.0)  # sizes of the self-check's perturbation, in RMS units of the activation there


def not_applicable(vlm, base: Example) -> str | None:
    """Why LM cells of this model and example cannot start inside the LM (``None`` when they can)."""
    spec = vlm.adapter.adapter
    if not vlm.decoder.continues_prompt:
        return f"the {spec.family} answer tower is not a decoder LM continuing the prompt: it {vlm.decoder.not_a_continuation}"
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


def _add_at(row: int, position: int, delta: torch.Tensor, offset: int):
    """An edit adding ``delta`` at one row and (absolute) position of a tensor that starts at ``offset``."""
    def edit(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[row, position - offset] += delta.to(t.device, t.dtype)
        return t
    return edit


def _fingerprint(state: LMStart) -> list:
    """Shapes and sums of everything recorded, to show that replays leave the recorded state as it was."""
    tensors = [x.hidden for x in state.inputs] + [t for x in state.inputs if x.kv for t in x.kv] + list(
        state.adds.values())
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

    Tries position ``first``, then the answer's own, each at growing strengths (relative to the
    recorded activation's size there; the strongest ones are needed in half precision, whose
    tolerance is wider); ``None`` when none is visible.
    """
    direction = torch.randn(state.width, generator=generator)
    for position in sorted({first, state.answer_at}):
        scale = float(recorded[0, position].float().pow(2).mean().sqrt()) or 1.0
        for strength in PROBE_STRENGTHS:
            delta = direction * scale * strength
            with torch.no_grad(), applied(vlm, base), vlm.attach([vlm.hook(site, _add_at(0, position, delta, 0))]):
                expected = vlm.logits(base.inputs)[0, state.answer_at].float()
            if float((expected - state.reference).abs().max()) > SELF_CHECK_VISIBLE * tol:
                return Probe(site, site.layer if span else 0, span, position, delta, expected)
    return None


def tolerance(state: LMStart) -> float:
    """The self-check's tolerance on answer logits: per dtype, relative to the largest reference logit."""
    return SELF_CHECK_TOL.get(state.dtype, 2e-2) * max(1.0, float(state.reference.abs().max()))


def probe_position(base: Example, state: LMStart) -> int:
    """Where the self-check perturbs and restarts: inside the LM's image group, else at ``answer_at // 2``.

    The middle of the image tokens before the answer, so that image positions precede it: a
    family whose image tokens attend to each other both ways, replayed as if they did not,
    gets those earlier positions wrong there, and the self-check fails.
    """
    image = [p for p in base.groups.get(TOWER, {}).get("image", []) if p < state.answer_at]
    return image[len(image) // 2] if len(image) >= 2 else state.answer_at // 2


def probes(vlm, base: Example, state: LMStart) -> tuple[list[Probe], str]:
    """The self-check's two perturbations (or why none can be found), at or after :func:`probe_position`.

    One perturbs layer 0's input (a replay from layer 0), one the middle layer's output (a
    replay of that layer on a span of positions; at the last layer only the answer position
    reaches the answer). Positions from :func:`probe_position` on serve replays from position
    0 and from that position alike.
    """
    n, early = len(state.layers), probe_position(base, state)
    generator = torch.Generator().manual_seed(SELF_CHECK_SEED)
    middle = (n - 1) // 2
    out = []
    for site, span, first in ((Site(TOWER, "input", 0), False, early),
                              (Site(TOWER, "hidden", middle), True, early if middle < n - 1 else state.answer_at)):
        recorded = state.inputs[site.layer + (site.component == "hidden")].hidden
        found = _probe(vlm, base, state, site, span, first, recorded, generator, tolerance(state))
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
    tol, before = tolerance(state), _fingerprint(state)
    offset = state.start_position(position)
    for probe in checks:
        if probe.position < offset:
            return f"the self-check's perturbation at position {probe.position} precedes the restart at {offset}"
        for err, what in replay_errors(vlm, state, probe, position):
            if not err <= tol:
                return (f"replaying the recorded LM layers from layer {probe.layer}, position {offset} does not "
                        f"reproduce the model's answer logits (row {what}: off by {err:.2e}, tolerance {tol:.2e})")
    if _fingerprint(state) != before:
        return "replaying the recorded LM layers changed the recorded state"
    return ""


def replay_errors(vlm, state: LMStart, probe: Probe, position: int) -> list[tuple[float, str]]:
    """One probe replayed from ``position`` in two rows: the largest answer-logit error of the unchanged row against
    the base run and of the perturbed row against the whole-model forward under the probe, each with its name."""
    offset = state.start_position(position)
    with torch.no_grad(), vlm.attach([vlm.hook(probe.site, _add_at(1, probe.position, probe.delta, offset))]):
        got = state.logits(2, probe.layer, position, probe.position if probe.span else None).float()
    return [(float((got[row] - want).abs().max()), what)
            for row, want, what in ((0, state.reference, "unchanged"), (1, probe.expected, f"perturbed at {probe.site}"))]


def restart_positions(state: LMStart, checks: list[Probe]) -> tuple[int, ...]:
    """The positions the self-check replays from: 0, and the restart key/value reuse would make."""
    return 0, max(1, min(c.position for c in checks))


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
    if n - 1 in tower.added_after:
        return None, (f"the {vlm.adapter.adapter.family} model adds features to the residual stream after the last "
                      "LM layer, outside the layers; a replay cannot finish there")
    store: list[list] = [[] for _ in range(n)]
    hooks = recording_hooks(tower.layers, n, store, tower.added_after)
    answer_at = vlm.answer_start(base)
    full = compat.full_cache_inputs(vlm.model)  # every layer keeps every position (no sliding window)
    with torch.no_grad(), applied(vlm, base), vlm.attach(hooks):  # recorders run after the edits
        reference = vlm.logits({**base.inputs, **full, "use_cache": True})[0, answer_at].float()
    store.append([((hooks[n].value,), {})])
    inputs, keys, caches = [], set(), []
    for j, calls in enumerate(store):
        if len(calls) != 1:
            return None, f"LM layer {j} ran {len(calls)} times in one forward"
        recorded, key, cache, why = layer_input(j, *calls[0])
        if recorded is None:
            return None, why
        inputs.append(recorded)
        if j < n:
            keys.add(key)
            caches.append(cache)
    why = replay_problem(inputs[:n], tower.replay)
    blocks, why = (None, why) if why else _blocks(vlm, base, inputs[0].hidden.shape[1])
    if blocks is None:
        return None, why
    config = vlm.model.config.get_text_config(decoder=True)
    layers = list(vlm.model.get_submodule(tower.layers))
    state = LMStart(layers, vlm.adapter.tail_modules(TOWER), inputs, answer_at, compat.attn_implementation(config),
                    tower.replay, next(iter(keys)) if len(keys) == 1 else None, reference, blocks=blocks,
                    softcap=vlm.adapter.logit_softcap(TOWER))
    for j, hook in zip(tower.added_after, hooks[n + 1:]):  # what entered layer j + 1 beyond layer j's output
        state.adds[j] = inputs[j + 1].hidden - hook.value
    checks, why = probes(vlm, base, state)
    why = why or _guarded_check(vlm, state, checks, 0)
    if why:
        return None, why
    state.why_no_kv = _no_prefix(vlm, state) or attach_kv(inputs, caches, keys) or \
        mask_problem(inputs[:n], state.attn_implementation)
    if not state.why_no_kv:
        state.kv_reuse = True
        why = _guarded_check(vlm, state, checks, restart_positions(state, checks)[1])
        if why:
            state.kv_reuse, state.why_no_kv = False, f"restarting at a later position failed its self-check: {why}"
    return state, ""


def _blocks(vlm, base: Example, seq_len: int) -> tuple[list[tuple[int, int]] | None, str]:
    """The adapter's blocks of positions attending both ways for this example, checked (or ``None`` and why)."""
    rule = vlm.adapter.adapter.attention_blocks
    blocks = sorted(rule(vlm.model.config, base.inputs)) if rule is not None else []
    previous = -1
    for first, last in blocks:
        if not previous < first <= last < seq_len:
            return None, (f"the {vlm.family} adapter's blocks of positions attending both ways {blocks} are not "
                          f"disjoint ranges of the {seq_len} positions")
        previous = last
    return blocks, ""


def _no_prefix(vlm, state: LMStart) -> str:
    """Why no prefix of positions can be reused before a patch ("" when some can)."""
    if state.answer_at == 0:
        return "the answer is predicted at position 0, so no prefix precedes it"
    for first, last in state.blocks:
        if first == 0 and last >= state.answer_at:
            return (f"the {vlm.family} LM attends both ways over positions 0..{last}, which hold the answer position "
                    "(a prefix LM): a patch at any of them changes all the others, so every run starts at position 0")
    return ""
