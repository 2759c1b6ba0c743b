"""Gradient estimates of a tracing grid: attribution patching and its integrated-gradients refinement.

Exact tracing (:func:`~vlm_interp.tracing.trace`) runs one patched forward per cell.
Attribution patching (Nanda; Syed et al.) estimates every cell at once from a first-order
expansion around the base run: restoring a cell changes the metric by about
``sum over the cell's positions and channels of (a_source - a_base) * d metric / d a_base``.
It needs one forward of the source run (captures), one forward of the base run that keeps
the graph, and one backward. Captum has no single-pass form of this: its layer attribution
methods replace every listed layer's output with a leaf tensor, which cuts the gradient
paths between dependent sites (an early layer reaches the answer only through later ones),
so :func:`attribution_patching` takes the gradients directly with ``torch.autograd.grad``.

:func:`integrated_patching` refines the estimate with integrated gradients along the
straight path from the base to the source activations of one site (all positions at
once), computed by captum's ``LayerIntegratedGradients`` with the source activations as
baseline. Its attributions over all positions of a site add up to the exact effect of
restoring the whole site (completeness); per position they estimate the single-position
cells. :func:`~vlm_interp.tracing.agreement.agreement` reports how well an estimate ranks cells
like exact patching.

Both estimates fill the grid of ``trace`` (one :class:`~vlm_interp.tracing.grid.GridPlan`):
a :class:`Trace` with the same dims, coordinates and attributes (plus ``method``), holding
estimated *patched metric values* (base score + estimated effect), so ``rr()``,
``indirect()`` and plots work unchanged.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import compat
from ..edits import applied
from ..errors import SiteError
from ..example import Example
from ..hooks import Hook
from ..sites import HEAD_COMPONENTS, Site
from .engine import repeat_inputs
from .grid import GridPlan, Key, plan_grid
from .results import Trace

_ATTN_OF_HEAD = {attn: head for head, attn in HEAD_COMPONENTS.items()}  # attn -> head, xattn -> xattn_head


def _site_slots(vlm, plan: GridPlan) -> dict[tuple[str, int], tuple[str, str]]:
    """The hook point (module path, kind) of every (component, layer) site of the grid."""
    return {(comp, layer): vlm.adapter.hook_point(plan.tower, comp, layer)
            for comp in plan.comps for layer in plan.layers[comp]}


def _estimate(plan: GridPlan, row_effects: Callable[[Key], np.ndarray]) -> Trace:
    """The plan's trace: base score plus each cell's summed per-position effects of its row."""
    def values() -> Iterator[float]:
        for key in plan.rows():  # the order of plan.cells(): rows outermost
            per_position = row_effects(key)
            for pos in plan.positions:
                if not pos or max(pos) >= per_position.shape[0]:
                    raise SiteError(f"{plan.tower}.{key[0]}.{key[1]}: positions {pos[:8]} do not fit the sequence "
                                    f"of length {per_position.shape[0]} there")
                yield plan.base_score + float(per_position[pos].sum())

    return plan.trace(values())


# ---- attribution patching (direct: one forward with graph, one backward) ------------------

@contextlib.contextmanager
def _params_require_grad(model: torch.nn.Module) -> Iterator[None]:
    """Let activations carry a graph even for a frozen model; restores every flag on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _base_gradients(vlm, plan: GridPlan, slots: Sequence[tuple[str, str]]) -> tuple[dict, dict]:
    """Base-run activations at ``slots`` and the metric's gradient there (None: the answer ignores it)."""
    fold, packed = vlm.adapter.folds(plan.tower), vlm.adapter.packed(plan.tower)  # sequences as the sites show them
    hooks = {slot: Hook(slot[0], kind=slot[1], capture=True, grad=True, name=f"{slot[0]}:{slot[1]}", fold=fold,
                        packed=packed, input_keywords=compat.LAYER_INPUT_KEYWORDS) for slot in slots}
    with torch.enable_grad(), _params_require_grad(vlm.model), applied(vlm, plan.base), vlm.attach(hooks.values()):
        logits = vlm.logits(plan.base.inputs)
        value = plan.metric(logits[:, vlm.answer_start(plan.base)]).sum()
        acts = [hooks[s].value for s in slots]
        grads = torch.autograd.grad(value, acts, allow_unused=True)
    return ({s: a.detach() for s, a in zip(slots, acts)}, dict(zip(slots, grads)))


def _source_values(vlm, plan: GridPlan, slots: Sequence[tuple[str, str]]) -> dict:
    """Source-run activations at ``slots`` (whole tensors, also for head components); one forward."""
    fold, packed = vlm.adapter.folds(plan.tower), vlm.adapter.packed(plan.tower)
    hooks = {slot: Hook(slot[0], kind=slot[1], capture=True, name=f"{slot[0]}:{slot[1]}", fold=fold,
                        packed=packed, input_keywords=compat.LAYER_INPUT_KEYWORDS) for slot in slots}
    with torch.no_grad(), applied(vlm, plan.source), vlm.attach(hooks.values()):
        vlm.logits(plan.source.inputs)
    return {s: hooks[s].value for s in slots}


def _per_position(product: torch.Tensor, n_heads: int | None) -> torch.Tensor:
    """Sum a (rows, seq, channels) product over rows and channels: (seq,), or (seq, heads) per head."""
    summed = product.float().sum(0)
    if n_heads is None:
        return summed.sum(-1)
    if summed.shape[-1] % n_heads:
        raise SiteError(f"width {summed.shape[-1]} is not divisible by {n_heads} heads")
    return summed.reshape(summed.shape[0], n_heads, -1).sum(-1)


def _site_effects(plan: GridPlan, slots: dict, base: dict, grads: dict, source: dict) -> dict:
    """First-order effect per position of restoring each single site: (source - base) . gradient."""
    out = {}
    for (comp, layer), slot in slots.items():
        n_heads = plan.n_heads if comp in HEAD_COMPONENTS else None
        if source[slot].shape != base[slot].shape:
            raise SiteError(f"{slot[0]}: source activations {tuple(source[slot].shape)} and base activations "
                            f"{tuple(base[slot].shape)} differ in shape; both runs need the same layout")
        if grads[slot] is None:  # the answer does not depend on this site: restoring it changes nothing
            out[(comp, layer)] = _per_position(torch.zeros_like(base[slot]), n_heads)
        else:
            out[(comp, layer)] = _per_position((source[slot] - base[slot]) * grads[slot], n_heads)
    return out


def _window_sum(per_site: dict, plan: GridPlan, key: Key) -> np.ndarray:
    """A grid row's effect per position: the sum of its window's single-site effects."""
    comp, layer, head = key
    total = sum(per_site[(comp, at)] for at in plan.span(comp, layer))
    return (total if head is None else total[:, head]).numpy()


def attribution_patching(vlm, clean: Example, corrupt: Example,
                         components: Sequence[str] = ("lm.hidden", "lm.attn", "lm.mlp"), tokens="each",
                         window: int = 1, metric: str = "prob", answer: str | None = None, other: str | None = None,
                         direction: str = "restore") -> Trace:
    """First-order (gradient) estimate of ``trace``'s whole grid from two forwards and one backward.

    Arguments and output layout are those of :func:`~vlm_interp.tracing.trace`; each cell
    holds ``base score + sum over its positions and channels of (a_source - a_base) * grad``,
    the gradient taken on the base run (the corrupted run when restoring). With
    ``window > 1`` a cell sums its window's single-site estimates (which ignores that
    restoring an earlier site of the window also changes the later ones).
    """
    plan = plan_grid(vlm, clean, corrupt, components, tokens, window, metric, answer, other, direction,
                     method="attribution_patching")
    slots = _site_slots(vlm, plan)
    unique = list(dict.fromkeys(slots.values()))
    base, grads = _base_gradients(vlm, plan, unique)
    per_site = _site_effects(plan, slots, base, grads, _source_values(vlm, plan, unique))
    return _estimate(plan, lambda key: _window_sum(per_site, plan, key))


# ---- integrated patching (captum LayerIntegratedGradients per site) -----------------------

BASE, SOURCE = 1.0, 0.0  # values of the run-selecting handle captum passes to the forward function


def _forward_func(vlm, plan: GridPlan) -> Callable[[torch.Tensor], torch.Tensor]:
    """Captum's forward function: the handle's value picks the base or the source run, repeated per row.

    Captum evaluates it on ``inputs`` (the base handle) and ``baselines`` (the source handle)
    to read the layer's activations at both ends of the path, then on the base handle for
    every step with the layer's output replaced by the interpolation.
    """
    runs = {BASE: plan.base, SOURCE: plan.source}
    answer_at = vlm.answer_start(plan.base)

    def forward(handle: torch.Tensor) -> torch.Tensor:
        codes = {float(v) for v in handle.reshape(-1).tolist()}
        if len(codes) != 1 or not codes <= set(runs):
            raise ValueError(f"integrated patching: run handle must be all {BASE} or all {SOURCE}, got {sorted(codes)}")
        example = runs[codes.pop()]
        with applied(vlm, example):
            logits = vlm.logits(repeat_inputs(example.inputs, handle.shape[0]))
        return plan.metric(logits[:, answer_at])

    return forward


def _captum_layer(vlm, tower: str, comp: str, layer: int) -> tuple[torch.nn.Module, bool]:
    """The module captum interpolates for a site and whether at its input (head components).

    Captum needs a module whose output is one tensor. Attention modules return a tuple
    (output, weights), so for ``attn``/``xattn`` the attention's output projection is used:
    its output is the same tensor (checked by :func:`_check_projection`).
    """
    if comp in _ATTN_OF_HEAD and _ATTN_OF_HEAD[comp] in vlm.adapter.components(tower):
        path, kind = vlm.adapter.hook_point(tower, _ATTN_OF_HEAD[comp], layer)
        return vlm.model.get_submodule(path), False
    path, kind = vlm.adapter.hook_point(tower, comp, layer)
    return vlm.model.get_submodule(path), kind == "input"


def _check_projection(vlm, plan: GridPlan, comp: str) -> None:
    """Refuse to interpolate an attention output at its projection unless both are the same tensor."""
    if comp not in _ATTN_OF_HEAD or _ATTN_OF_HEAD[comp] not in vlm.adapter.components(plan.tower):
        return
    layer = plan.layers[comp][0]
    site = vlm.adapter.hook(Site(plan.tower, comp, layer), capture=True)
    path = vlm.adapter.hook_point(plan.tower, _ATTN_OF_HEAD[comp], layer)[0]
    proj = Hook(path, capture=True, name="projection output")
    with torch.no_grad(), applied(vlm, plan.base), vlm.attach([site, proj]):
        vlm.logits(plan.base.inputs)
    if site.value.shape != proj.value.shape or not torch.equal(site.value, proj.value):
        raise SiteError(f"{plan.tower}.{comp}: the attention output is not its output projection's output in "
                        f"{type(vlm.model).__name__}, so captum cannot interpolate it there; use attribution_patching")


def _connected(vlm, plan: GridPlan) -> set[tuple[str, int]]:
    """Sites the answer depends on at all (a backward with unused inputs allowed); the rest have no effect."""
    slots = _site_slots(vlm, plan)
    _, grads = _base_gradients(vlm, plan, list(dict.fromkeys(slots.values())))
    return {key for key, slot in slots.items() if grads[slot] is not None}


def _ig_effects(vlm, plan: GridPlan, lig_class, comp: str, span: list[int], steps: int, method: str,
                batch_size: int | None) -> torch.Tensor:
    """Per-position (or per position and head) restoring effect of interpolating the ``span`` sites together."""
    targets = [_captum_layer(vlm, plan.tower, comp, layer) for layer in span]
    to_input = {flag for _, flag in targets}
    with warnings.catch_warnings():  # a window's layers depend on each other on purpose: they move together
        warnings.filterwarnings("ignore", message="Multiple layers provided")
        lig = lig_class(_forward_func(vlm, plan), [m for m, _ in targets])
    handle = torch.full((1, 1), BASE)
    try:
        with _params_require_grad(vlm.model):
            attributions = lig.attribute(handle, baselines=torch.full((1, 1), SOURCE), n_steps=steps, method=method,
                                         internal_batch_size=batch_size, attribute_to_layer_input=to_input.pop())
    except RuntimeError as err:
        if "not have been used in the graph" not in str(err):
            raise
        raise SiteError(
            f"{plan.tower}.{comp} at layers {span}: the answer depends on this activation, but not on captum's "
            "replacement of it. Transformers also records this layer's output for hidden_states (read, for "
            "example, by LLaVA's vision_feature_layer) with a forward hook that runs before captum's; the recorded "
            "copy keeps the unpatched value. Use attribution_patching for this site."
        ) from err
    n_heads = plan.n_heads if comp in HEAD_COMPONENTS else None
    # captum's attributions add up to f(base) - f(base with the sites set to the source): negate to restore
    return -sum(_per_position(a if torch.is_tensor(a) else a[0], n_heads) for a in attributions)


def integrated_patching(vlm, clean: Example, corrupt: Example,
                        components: Sequence[str] = ("lm.hidden", "lm.attn", "lm.mlp"), tokens="each",
                        window: int = 1, metric: str = "prob", answer: str | None = None, other: str | None = None,
                        direction: str = "restore", steps: int = 8, method: str = "gausslegendre",
                        batch_size: int | None = None, progress: bool = True) -> Trace:
    """Integrated-gradients estimate of ``trace``'s grid, by captum's ``LayerIntegratedGradients``.

    For each site (or window of sites) the activations move in ``steps`` steps along the
    straight path from the base run's (corrupted, when restoring) to the source run's, at
    all positions together, and the gradients along the path are integrated (``method``:
    captum's quadrature). A site's attributions over all positions add up to the exact
    effect of restoring the whole site; a cell sums them over its positions. Costs about
    ``steps`` forwards and backwards per site (``batch_size`` bounds rows per pass).
    """
    try:
        from captum.attr import LayerIntegratedGradients
    except ImportError:
        raise ImportError("integrated_patching needs captum: pip install 'vlm-interp[attr]'") from None
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    plan = plan_grid(vlm, clean, corrupt, components, tokens, window, metric, answer, other, direction,
                     method="integrated_patching")
    if vlm.adapter.packed(plan.tower):
        raise SiteError(f"the {plan.tower} tower of {vlm.family} packs the positions of a batch's rows on one axis "
                        "(no batch axis), and captum's layer attribution treats the first axis as the batch; use "
                        "attribution_patching or trace for this tower")
    plan.attrs.update(steps=steps, ig_method=method)
    for comp in plan.comps:
        _check_projection(vlm, plan, comp)
    live = _connected(vlm, plan)
    per_row: dict[tuple[str, int], np.ndarray] = {}
    for comp, layer in tqdm(list(_site_slots(vlm, plan)), desc=f"integrated patching {plan.tower}", disable=not progress, leave=False):
        span = [at for at in plan.span(comp, layer) if (comp, at) in live]
        if span:
            per_row[(comp, layer)] = _ig_effects(vlm, plan, LayerIntegratedGradients, comp, span, steps, method,
                                                 batch_size).detach().numpy()
        else:  # the answer depends on none of these sites: restoring them changes nothing
            width = plan.n_heads if comp in HEAD_COMPONENTS else None
            n = _seq_len(vlm, plan, comp, layer)
            per_row[(comp, layer)] = np.zeros((n, width) if width else n)
    return _estimate(plan, lambda key: per_row[key[:2]] if key[2] is None else per_row[key[:2]][:, key[2]])


def _seq_len(vlm, plan: GridPlan, comp: str, layer: int) -> int:
    """Length of the token axis at a site the answer ignores (for its all-zero effect row)."""
    hook = vlm.adapter.hook(Site(plan.tower, comp, layer, 0 if comp in HEAD_COMPONENTS else None), capture=True)
    with torch.no_grad(), applied(vlm, plan.base), vlm.attach([hook]):
        vlm.logits(plan.base.inputs)
    return int(hook.value.shape[1])
