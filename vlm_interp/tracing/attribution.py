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
cells. :func:`agreement` reports how well an estimate ranks cells like exact patching,
optionally on a seeded sample of cells for which only those cells are patched exactly.

Both estimates return a :class:`Trace` with the same dims, coordinates and attributes as
``trace`` (plus ``method``), holding estimated *patched metric values*
(base score + estimated effect), so ``rr()``, ``indirect()`` and plots work unchanged.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
import xarray as xr
from tqdm.auto import tqdm

from ..edits import applied
from ..errors import SiteError
from ..example import Example
from ..hooks import Hook
from ..sites import HEAD_COMPONENTS, Site
from .causal import DIRECTIONS, _positions, _window
from .engine import Cell, capture, repeat_inputs, run_cells, same_layout, score_runs
from .metrics import Metric, make_metric
from .results import Trace

Key = tuple[str, int, "int | None"]  # (component, layer, head) of one row of the grid
LAYOUT_ATTRS = ("tower", "metric", "answer", "other", "direction", "window", "positions")
_ATTN_OF_HEAD = {attn: head for head, attn in HEAD_COMPONENTS.items()}  # attn -> head, xattn -> xattn_head


@dataclass
class _Plan:
    """Everything both estimates share: the checked request, the grid's rows, base and source runs."""

    tower: str
    comps: list[str]
    heads: bool
    layers: dict[str, list[int]]
    positions: list[list[int]]
    labels: list[str]
    group_of: list[str]
    metric: Metric
    clean_score: float
    corrupt_score: float
    base: Example
    source: Example
    attrs: dict
    n_heads: int

    @property
    def base_score(self) -> float:
        """The score of the run that is patched (corrupted when restoring, clean when noising)."""
        return self.corrupt_score if self.attrs["direction"] == "restore" else self.clean_score

    def keys(self) -> Iterator[Key]:
        """Every (component, layer, head) row of the grid, in trace's order."""
        for comp in self.comps:
            n_heads = self.heads_of(comp)
            for layer in self.layers[comp]:
                for head in (range(n_heads) if n_heads else [None]):
                    yield comp, layer, head

    def heads_of(self, comp: str) -> int:
        """Heads per layer for a head component, 0 for a whole component."""
        return self.n_heads if comp in HEAD_COMPONENTS else 0


def _plan(vlm, clean: Example, corrupt: Example, components: Sequence[str], tokens, window: int, metric: str,
          answer: str | None, other: str | None, direction: str, method: str) -> _Plan:
    """Check a request the way ``trace`` does and fix the grid's layout, scores and runs."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive integer, got {window!r}")
    same_layout(clean, corrupt)
    specs = [c.split(".") for c in components]
    if not specs or any(len(s) != 2 for s in specs):
        raise SiteError(f"components are 'tower.component' names such as 'lm.attn', got {list(components)}")
    towers = {t for t, _ in specs}
    if len(towers) != 1:
        raise SiteError(f"trace one tower at a time; got {sorted(towers)}")
    tower = towers.pop()
    comps = [c for _, c in specs]
    heads = [c for c in comps if c in HEAD_COMPONENTS]
    if heads and len(heads) != len(comps):
        raise SiteError("trace head components separately from whole components (their grids differ)")
    layers = {comp: vlm.adapter.layers_with(tower, comp) for comp in comps}  # unknown component -> SiteError
    base, source = (corrupt, clean) if direction == "restore" else (clean, corrupt)
    m = make_metric(vlm, clean, metric, answer, other)
    clean_score, corrupt_score = score_runs(vlm, [clean, corrupt], m)
    positions, labels, group_of = _positions(clean, tower, tokens)
    attrs = {"model": vlm.name, "tower": tower, "metric": metric, "answer": answer or clean.answer,
             "other": other or "", "direction": direction, "window": window,
             "clean_score": clean_score, "corrupt_score": corrupt_score,
             "corruption": corrupt.meta.get("corruption", ""), "question": clean.question,
             "positions": [list(p) for p in positions], "method": method}
    return _Plan(tower, comps, bool(heads), layers, positions, labels, group_of, m, clean_score, corrupt_score,
                 base, source, attrs, vlm.adapter.n_heads[tower])


def _grid(vlm, plan: _Plan, effects: dict[Key, np.ndarray]) -> Trace:
    """A Trace laid out exactly like ``trace``'s: base score plus each cell's summed position effects."""
    n_layers = vlm.adapter.n_layers[plan.tower]
    n_heads = plan.n_heads
    shape = [len(plan.comps), n_layers] + ([n_heads] if plan.heads else []) + [len(plan.positions)]
    grid = np.full(shape, np.nan)
    for (comp, layer, head), per_position in effects.items():
        for k, pos in enumerate(plan.positions):
            top = max(pos, default=-1)
            if not pos or top >= per_position.shape[0]:
                raise SiteError(f"{plan.tower}.{comp}.{layer}: positions {pos[:8]} do not fit the sequence of "
                                f"length {per_position.shape[0]} there")
            index = (plan.comps.index(comp), layer) + ((head,) if plan.heads else ()) + (k,)
            grid[index] = plan.base_score + float(per_position[pos].sum())
    dims = ["component", "layer"] + (["head"] if plan.heads else []) + ["position"]
    coords = {"component": plan.comps, "layer": list(range(n_layers)), "position": list(range(len(plan.positions))),
              "token": ("position", plan.labels), "group": ("position", plan.group_of)}
    if plan.heads:
        coords["head"] = list(range(n_heads))
    return Trace(xr.DataArray(grid, dims=dims, coords=coords, attrs=dict(plan.attrs), name="effect"))


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


def _base_gradients(vlm, plan: _Plan, slots: Sequence[tuple[str, str]]) -> tuple[dict, dict]:
    """Base-run activations at ``slots`` and the metric's gradient there (None: the answer ignores it)."""
    packed = vlm.adapter.packed(plan.tower)
    hooks = {slot: Hook(slot[0], kind=slot[1], capture=True, grad=True, name=f"{slot[0]}:{slot[1]}", packed=packed)
             for slot in slots}
    with torch.enable_grad(), _params_require_grad(vlm.model), applied(vlm, plan.base), vlm.hooks(hooks.values()):
        logits = vlm.logits(plan.base.inputs)
        value = plan.metric(logits[:, vlm.answer_start(plan.base)]).sum()
        acts = [hooks[s].value for s in slots]
        grads = torch.autograd.grad(value, acts, allow_unused=True)
    return ({s: a.detach() for s, a in zip(slots, acts)}, dict(zip(slots, grads)))


def _source_values(vlm, plan: _Plan, slots: Sequence[tuple[str, str]]) -> dict:
    """Source-run activations at ``slots`` (whole tensors, also for head components); one forward."""
    packed = vlm.adapter.packed(plan.tower)
    hooks = {slot: Hook(slot[0], kind=slot[1], capture=True, name=f"{slot[0]}:{slot[1]}", packed=packed)
             for slot in slots}
    with torch.no_grad(), applied(vlm, plan.source), vlm.hooks(hooks.values()):
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


def _site_effects(plan: _Plan, slots: dict, base: dict, grads: dict, source: dict) -> dict:
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


def _window_sum(plan: _Plan, per_site: dict) -> dict[Key, np.ndarray]:
    """Each grid row's effect per position: the sum of its window's single-site effects."""
    effects = {}
    for comp, layer, head in plan.keys():
        span = _window(layer, plan.attrs["window"], plan.layers[comp])
        total = sum(per_site[(comp, at)] for at in span)
        effects[(comp, layer, head)] = (total if head is None else total[:, head]).numpy()
    return effects


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
    plan = _plan(vlm, clean, corrupt, components, tokens, window, metric, answer, other, direction,
                 "attribution_patching")
    slots = {(comp, layer): vlm.adapter.hook_point(plan.tower, comp, layer)
             for comp in plan.comps for layer in plan.layers[comp]}
    unique = list(dict.fromkeys(slots.values()))
    base, grads = _base_gradients(vlm, plan, unique)
    source = _source_values(vlm, plan, unique)
    return _grid(vlm, plan, _window_sum(plan, _site_effects(plan, slots, base, grads, source)))


# ---- integrated patching (captum LayerIntegratedGradients per site) -----------------------

BASE, SOURCE = 1.0, 0.0  # values of the run-selecting handle captum passes to the forward function


def _forward_func(vlm, plan: _Plan) -> Callable[[torch.Tensor], torch.Tensor]:
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


def _check_projection(vlm, plan: _Plan, comp: str) -> None:
    """Refuse to interpolate an attention output at its projection unless both are the same tensor."""
    if comp not in _ATTN_OF_HEAD or _ATTN_OF_HEAD[comp] not in vlm.adapter.components(plan.tower):
        return
    layer = plan.layers[comp][0]
    site = vlm.adapter.hook(Site(plan.tower, comp, layer), capture=True)
    path = vlm.adapter.hook_point(plan.tower, _ATTN_OF_HEAD[comp], layer)[0]
    proj = Hook(path, capture=True, name="projection output")
    with torch.no_grad(), applied(vlm, plan.base), vlm.hooks([site, proj]):
        vlm.logits(plan.base.inputs)
    if site.value.shape != proj.value.shape or not torch.equal(site.value, proj.value):
        raise SiteError(f"{plan.tower}.{comp}: the attention output is not its output projection's output in "
                        f"{type(vlm.model).__name__}, so captum cannot interpolate it there; use attribution_patching")


def _connected(vlm, plan: _Plan) -> set[tuple[str, int]]:
    """Sites the answer depends on at all (a backward with unused inputs allowed); the rest have no effect."""
    slots = {(comp, layer): vlm.adapter.hook_point(plan.tower, comp, layer)
             for comp in plan.comps for layer in plan.layers[comp]}
    _, grads = _base_gradients(vlm, plan, list(dict.fromkeys(slots.values())))
    return {key for key, slot in slots.items() if grads[slot] is not None}


def _ig_effects(vlm, plan: _Plan, lig_class, comp: str, span: list[int], steps: int, method: str,
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
    plan = _plan(vlm, clean, corrupt, components, tokens, window, metric, answer, other, direction,
                 "integrated_patching")
    if vlm.adapter.packed(plan.tower):
        raise SiteError(f"the {plan.tower} tower of {vlm.family} packs the positions of a batch's rows on one axis "
                        "(no batch axis), and captum's layer attribution treats the first axis as the batch; use "
                        "attribution_patching or trace for this tower")
    plan.attrs.update(steps=steps, ig_method=method)
    for comp in plan.comps:
        _check_projection(vlm, plan, comp)
    live = _connected(vlm, plan)
    rows = [(comp, layer) for comp in plan.comps for layer in plan.layers[comp]]
    per_row: dict[tuple[str, int], np.ndarray] = {}
    for comp, layer in tqdm(rows, desc=f"integrated patching {plan.tower}", disable=not progress, leave=False):
        span = [at for at in _window(layer, window, plan.layers[comp]) if (comp, at) in live]
        if span:
            per_row[(comp, layer)] = _ig_effects(vlm, plan, LayerIntegratedGradients, comp, span, steps, method,
                                                 batch_size).detach().numpy()
        else:  # the answer depends on none of these sites: restoring them changes nothing
            width = plan.n_heads if comp in HEAD_COMPONENTS else None
            n = _seq_len(vlm, plan, comp, layer)
            per_row[(comp, layer)] = np.zeros((n, width) if width else n)
    effects = {(c, at, h): per_row[(c, at)] if h is None else per_row[(c, at)][:, h] for c, at, h in plan.keys()}
    return _grid(vlm, plan, effects)


def _seq_len(vlm, plan: _Plan, comp: str, layer: int) -> int:
    """Length of the token axis at a site the answer ignores (for its all-zero effect row)."""
    hook = vlm.adapter.hook(Site(plan.tower, comp, layer, 0 if comp in HEAD_COMPONENTS else None), capture=True)
    with torch.no_grad(), applied(vlm, plan.base), vlm.hooks([hook]):
        vlm.logits(plan.base.inputs)
    return int(hook.value.shape[1])


# ---- agreement with exact patching --------------------------------------------------------

def _cells_frame(tr: Trace) -> pd.DataFrame:
    """One row per non-NaN cell of a trace: component, layer, head, position, value."""
    data = tr.data
    dims = [d for d in ("component", "layer", "head", "position") if d in data.dims]
    frame = data.transpose(*dims).to_dataframe(name="value").reset_index()[dims + ["value"]]
    return frame.dropna(subset=["value"]).reset_index(drop=True)


def _check_comparable(estimate: Trace, exact: Trace) -> None:
    """Both traces must describe the same grid (dims, labels, positions, metric, direction)."""
    problems = []
    if tuple(estimate.data.dims) != tuple(exact.data.dims):
        problems.append(f"dims {tuple(estimate.data.dims)} vs {tuple(exact.data.dims)}")
    else:
        for dim in estimate.data.dims:
            a, b = estimate.data.coords[dim].values, exact.data.coords[dim].values
            if len(a) != len(b) or not np.array_equal(a, b):
                problems.append(f"{dim} labels {list(a)[:6]} vs {list(b)[:6]}")
    for key in LAYOUT_ATTRS:
        if estimate.attrs.get(key) != exact.attrs.get(key):
            problems.append(f"{key} {estimate.attrs.get(key)!r:.60} vs {exact.attrs.get(key)!r:.60}")
    if problems:
        raise ValueError("the estimate and the exact trace describe different grids: " + "; ".join(problems)
                         + ". Compare traces made with the same components, tokens, window, metric and direction.")


def _spearman(a: pd.Series, b: pd.Series) -> float:
    """Spearman's rank correlation: Pearson correlation of the ranks (ties share their mean rank)."""
    return float(a.rank().corr(b.rank()))


def _top_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Share of the ``k`` largest entries of ``a`` that are also among the ``k`` largest of ``b``."""
    if k < 1:
        return float("nan")
    top_a = set(np.argsort(-a, kind="stable")[:k].tolist())
    top_b = set(np.argsort(-b, kind="stable")[:k].tolist())
    return len(top_a & top_b) / k


def _sample(frame: pd.DataFrame, sample: int | None, seed: int) -> pd.DataFrame:
    """At most ``sample`` cells per component, drawn with a seeded generator (all when None)."""
    if sample is None:
        return frame
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 2:
        raise ValueError(f"sample must be an integer of at least 2 cells per component, got {sample!r}")
    rng = np.random.default_rng(seed)
    parts = []
    for _, part in frame.groupby("component", sort=False):
        pick = rng.choice(len(part), size=min(sample, len(part)), replace=False)
        parts.append(part.iloc[np.sort(pick)])
    return pd.concat(parts).reset_index(drop=True)


def _exact_on(vlm, clean: Example, corrupt: Example, estimate: Trace, cells: pd.DataFrame,
              batch_size: int, progress: bool) -> np.ndarray:
    """Exact patched metric values of the chosen cells only (the same engine as ``trace``)."""
    same_layout(clean, corrupt)
    attrs = estimate.attrs
    tower, window = attrs["tower"], attrs["window"]
    base, source = (corrupt, clean) if attrs["direction"] == "restore" else (clean, corrupt)
    m = make_metric(vlm, clean, attrs["metric"], attrs["answer"], attrs["other"] or None)
    todo = []
    for row in cells.itertuples(index=False):
        comp, layer, k = str(row.component), int(row.layer), int(row.position)
        head = int(row.head) if "head" in cells.columns else None
        span = _window(layer, window, vlm.adapter.layers_with(tower, comp))
        todo.append(Cell(tuple(Site(tower, comp, at, head) for at in span), tuple(attrs["positions"][k])))
    source_values = capture(vlm, source, {s for c in todo for s in c.sites})
    return run_cells(vlm, base, source_values, todo, m, batch_size=batch_size, progress=progress,
                     desc="exact patching (sample)").numpy()


def agreement_cells(estimate: Trace, exact: Trace | None = None, *, sample: int | None = None, seed: int = 0,
                    vlm=None, clean: Example | None = None, corrupt: Example | None = None, batch_size: int = 32,
                    progress: bool = False) -> pd.DataFrame:
    """The compared cells of :func:`agreement`: component, layer, [head,] position, estimate, exact.

    With ``exact`` (a ``trace`` of the same grid) all cells, or a seeded ``sample`` of cells
    per component. Without it, pass ``vlm``, ``clean``, ``corrupt`` and ``sample``: only the
    sampled cells are patched exactly (the engine of ``trace``), a check on a budget.
    """
    frame = _cells_frame(estimate)
    if exact is not None:
        _check_comparable(estimate, exact)
        cells = _sample(frame, sample, seed)
        keys = [c for c in cells.columns if c != "value"]
        truth = cells[keys].merge(_cells_frame(exact), how="left", on=keys)
        if truth["value"].isna().any():
            raise ValueError("the exact trace has no value at some cells the estimate has; "
                             "they describe different grids")
        cells = cells.assign(exact=truth["value"].to_numpy())
    else:
        if vlm is None or clean is None or corrupt is None or sample is None:
            raise ValueError("without an exact trace, pass vlm=, clean=, corrupt= and sample= (cells per component) "
                             "so that the sampled cells can be patched exactly")
        cells = _sample(frame, sample, seed)
        cells = cells.assign(exact=_exact_on(vlm, clean, corrupt, estimate, cells, batch_size, progress))
    return cells.rename(columns={"value": "estimate"})


def agreement(estimate: Trace, exact: Trace | None = None, *, top_k: int = 10, sample: int | None = None,
              seed: int = 0, vlm=None, clean: Example | None = None, corrupt: Example | None = None,
              batch_size: int = 32, progress: bool = False) -> pd.DataFrame:
    """Per component: Spearman and Pearson correlation and top-k overlap of an estimate with exact patching.

    Cells are chosen as in :func:`agreement_cells` (all, or a seeded ``sample`` per component,
    patched exactly on their own when no ``exact`` trace is given). Top-k overlap ranks cells
    by the size of their effect (|value - base score|). The last row, ``all``, pools every
    component.
    """
    cells = agreement_cells(estimate, exact, sample=sample, seed=seed, vlm=vlm, clean=clean, corrupt=corrupt,
                            batch_size=batch_size, progress=progress)
    attrs = estimate.attrs
    base = attrs["corrupt_score"] if attrs["direction"] == "restore" else attrs["clean_score"]
    rows = [_agreement_row(str(comp), part, base, top_k) for comp, part in cells.groupby("component", sort=False)]
    rows.append(_agreement_row("all", cells, base, top_k))
    return pd.DataFrame(rows)


def _agreement_row(name: str, cells: pd.DataFrame, base: float, top_k: int) -> dict:
    """One row of :func:`agreement`: correlations and top-k overlap of one set of cells."""
    est, ex = cells["estimate"].astype(float), cells["exact"].astype(float)
    k = min(top_k, len(cells))
    return {"component": name, "cells": len(cells), "spearman": _spearman(est, ex), "pearson": float(est.corr(ex)),
            "top_k": k, "top_k_overlap": _top_overlap(np.abs(est.to_numpy() - base), np.abs(ex.to_numpy() - base), k)}
