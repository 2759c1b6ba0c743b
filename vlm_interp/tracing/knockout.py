"""Attention knockout: cut the attention edges from source positions to target positions over a window of layers.

Geva et al.'s knockout, as applied to LLaVA by Neo et al. and Zhang et al.: in the chosen layers,
the target positions (queries) may no longer attend to the source positions (keys); everything
else runs as usual, and the answer is measured. A causal intervention, unlike attention weights.

The edit goes through vlm-interp's attention dispatcher (:func:`vlm_interp.compat.attention_edits`),
registered in transformers' ``AttentionInterface``: no copied forward, no monkeypatch. It stacks with
the tracing engine's hooks and with other attention edits. A sweep is batched like the tracing
engine: each batch row carries its own cut (:class:`Cut`), so many knockout cells share a forward.

A query whose every visible key is cut reads nothing: its attention output is zero (for example
a Q-Former query cut off from every patch). Sources index the keys' tower (``Attention.keys``: the
vision tower for Q-Former cross-attention), targets the tower itself.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from .. import compat
from ..corruptions.base import applied
from ..errors import SiteError
from ..example import Example
from .grid import layer_window
from .engine import auto_batch_size, repeat_inputs, score_runs
from .metrics import make_metric
from .results import Labelled

# Zhang et al.'s edges: image -> question, image -> last, question -> last, and object -> last where a region is known
DEFAULT_EDGES = (("image", "question"), ("image", "last"), ("question", "last"), ("object", "last"))


class KnockoutError(SiteError):
    """A knockout cannot apply as requested: no such attention, attention edits cannot reach it, or it cuts nothing."""


@dataclass(frozen=True)
class Cut:
    """What one batch row cuts: edges from ``sources`` (key positions) to ``targets`` (query positions) at ``layers``,
    for ``heads`` (``None``: every head)."""

    layers: frozenset[int]
    sources: tuple[int, ...]
    targets: tuple[int, ...]
    heads: tuple[int, ...] | None = None


class EdgeKnockout(compat.AttentionEdit):
    """The attention edit: batch row ``r`` (or block ``r`` of equal rows) cuts ``cuts[r]`` in ``tower``'s
    ``component`` attention."""

    def __init__(self, vlm, cuts: Sequence[Cut], tower: str = "lm", component: str = "attn"):
        spec = attention_spec(vlm, tower, component)
        have = vlm.adapter.layers_with(tower, component)
        used = sorted({layer for cut in cuts for layer in cut.layers})
        if set(used) - set(have):
            raise KnockoutError(f"{tower}.{component} exists on layers {have}, not {sorted(set(used) - set(have))}")
        heads = vlm.adapter.n_heads[tower]
        bad = sorted({h for cut in cuts for h in (cut.heads or ()) if not 0 <= h < heads})
        if bad:
            raise KnockoutError(f"heads {bad} out of range: the {tower} tower has heads 0..{heads - 1}")
        self.cuts, self.cross, self.n_heads = list(cuts), spec.keys is not None, heads
        modules = {layer: vlm.model.get_submodule(vlm.adapter.attention_path(tower, component, layer)) for layer in used}
        self.layer_of = {id(m): layer for layer, m in modules.items()}
        super().__init__(list(modules.values()))

    def block(self, call: compat.AttentionCall) -> torch.Tensor:
        rows = len(self.cuts)
        if call.batch % rows:
            raise KnockoutError(f"a knockout of {rows} rows met a batch of {call.batch}; batch whole examples")
        layer = self.layer_of[id(call.module)]
        queries = torch.arange(call.q_len) if self.cross else call.self_positions()
        keys = torch.arange(call.k_len)
        heads = call.heads if any(cut.heads is not None for cut in self.cuts) else 1  # one mask for all heads
        out = torch.zeros(rows, heads, call.q_len, call.k_len, dtype=torch.bool)
        for r, cut in enumerate(self.cuts):
            if layer in cut.layers:
                edge = torch.isin(queries, torch.tensor(cut.targets))[:, None] & \
                       torch.isin(keys, torch.tensor(cut.sources))[None, :]
                which = list(cut.heads) if cut.heads is not None else slice(None)
                out[r, which] |= edge
        return out.repeat_interleave(call.batch // rows, dim=0)


def attention_spec(vlm, tower: str, component: str):
    """The adapter's attention spec, with an error where attention edits cannot reach it."""
    try:
        spec = vlm.adapter.attention(tower, component)
    except SiteError as err:
        raise KnockoutError(str(err)) from None
    if not spec.interface:
        raise KnockoutError(f"{vlm.family}: {tower}.{component}: {spec.why}")
    return spec


def positions(vlm, example: Example, group, tower: str) -> tuple[str, tuple[int, ...]]:
    """(label, positions) of a token group name, or of ``(label, positions)`` / a list of positions."""
    if isinstance(group, str):
        if group not in example.groups.get(tower, {}):
            have = sorted(example.groups.get(tower, {}))
            raise KnockoutError(f"no token group {group!r} in the {tower} tower of this example (groups: {have})"
                                + ("; give prepare(..., region=...) for 'object'" if group == "object" else ""))
        found = tuple(example.groups[tower][group])
        label = group
    elif isinstance(group, tuple) and len(group) == 2 and isinstance(group[0], str):
        label, found = group[0], tuple(int(p) for p in group[1])
    else:
        found = tuple(int(p) for p in group)
        label = ",".join(map(str, found)) if len(found) <= 4 else f"{len(found)} positions"
    if not found:
        raise KnockoutError(f"token group {label!r} of the {tower} tower is empty: it would cut nothing")
    return label, found


def make_cut(vlm, example: Example, source, target, layers=None, heads=None, tower: str = "lm",
             component: str = "attn") -> tuple[str, Cut]:
    """(edge label, :class:`Cut`) from group names or positions; ``layers=None`` cuts at every layer."""
    spec = attention_spec(vlm, tower, component)
    src_label, sources = positions(vlm, example, source, spec.keys or tower)
    tgt_label, targets = positions(vlm, example, target, tower)
    have = vlm.adapter.layers_with(tower, component)
    chosen = frozenset(have if layers is None else (vlm.adapter.n_layers[tower] + l if l < 0 else l for l in layers))
    head_set = None if heads is None else tuple(int(h) for h in ([heads] if isinstance(heads, int) else heads))
    return f"{src_label}->{tgt_label}", Cut(chosen, sources, targets, head_set)


@contextlib.contextmanager
def knocked_out(vlm, example: Example, source, target, layers=None, heads=None, tower: str = "lm",
                component: str = "attn") -> Iterator[EdgeKnockout]:
    """Cut ``source`` -> ``target`` attention edges while the body runs (every forward, every batch row).

    ``source`` and ``target`` are token-group names or position lists; ``layers`` (default all) and
    ``heads`` (default all) choose where. Composes with hooks and other attention edits.
    """
    _, cut = make_cut(vlm, example, source, target, layers, heads, tower, component)
    edit = EdgeKnockout(vlm, [cut], tower, component)
    with compat.attention_edits(vlm.model, [edit]):
        yield edit


def run_cuts(vlm, example: Example, cuts: Sequence[Cut], metric, tower: str = "lm", component: str = "attn",
             batch_size: "int | str" = "auto", progress: bool = True) -> torch.Tensor:
    """``metric`` of ``example`` with each cut applied in its own batch row; shape (len(cuts),)."""
    if batch_size == "auto":
        batch_size = auto_batch_size(vlm, example, len(cuts))
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
    out = torch.empty(len(cuts))
    answer_at = vlm.answer_start(example)
    with tqdm(total=len(cuts), desc=f"knockout {tower}.{component}", disable=not progress, leave=False) as bar:
        for lo in range(0, len(cuts), batch_size):
            chunk = list(cuts[lo:lo + batch_size])
            edit = EdgeKnockout(vlm, chunk, tower, component)
            with torch.no_grad(), applied(vlm, example), compat.attention_edits(vlm.model, [edit]):
                logits = vlm.logits(repeat_inputs(example.inputs, len(chunk)))
            out[lo:lo + len(chunk)] = metric(logits[:, answer_at])
            bar.update(len(chunk))
    return out


def knockout(vlm, example: Example, edges: Sequence = DEFAULT_EDGES, tower: str = "lm", component: str = "attn",
             window: int = 1, layers: Sequence[int] | None = None, heads=None, metric: str = "prob",
             answer: str | None = None, other: str | None = None, batch_size: "int | str" = "auto",
             progress: bool = True) -> "Knockout":
    """The answer's ``metric`` with each edge cut in a window of ``window`` layers centred on each layer.

    ``edges`` are ``(source, target)`` pairs of token-group names or position lists (the default
    list leaves its ``object`` edge out when the example has no object group). ``heads``: ``None`` (all heads together),
    ``"each"`` (one cell per head: a head axis), or a list of heads cut together. Component
    ``xattn`` cuts cross-attention (Q-Former queries -> image patches). Same metrics as
    :func:`~vlm_interp.tracing.trace`; ``clean_score`` is the uncut run.
    """
    spec = attention_spec(vlm, tower, component)
    m = make_metric(vlm, example, metric, answer, other)
    clean_score = score_runs(vlm, [example], m)[0]
    if edges is DEFAULT_EDGES:  # the object edge needs a region; the other defaults apply to any example
        edges = [e for e in edges if e[0] != "object" or "object" in example.groups.get(spec.keys or tower, {})]
    have = vlm.adapter.layers_with(tower, component)
    centres = list(have if layers is None else layers)
    per_head = isinstance(heads, str) and heads == "each"
    if isinstance(heads, str) and not per_head:
        raise ValueError(f"heads must be None, 'each' or a list of head indices, got {heads!r}")
    head_axis = list(range(vlm.adapter.n_heads[tower])) if per_head else [None]
    labels, cuts, coords = [], [], []
    for e, (source, target) in enumerate(edges):
        label, base = make_cut(vlm, example, source, target, None, None if per_head else heads, tower, component)
        labels.append(label)
        for i, layer in enumerate(centres):
            for h, head in enumerate(head_axis):
                span = frozenset(layer_window(layer, window, have))
                cuts.append(Cut(span, base.sources, base.targets, (head,) if per_head else base.heads))
                coords.append((i, e, h))
    values = run_cuts(vlm, example, cuts, m, tower, component, batch_size, progress).numpy()
    grid = np.full((len(centres), len(edges), len(head_axis)), np.nan)
    for (i, e, h), v in zip(coords, values):
        grid[i, e, h] = v
    dims, coords_out = ["layer", "edge"], {"layer": centres, "edge": labels}
    if per_head:
        dims.append("head")
        coords_out["head"] = head_axis
    else:
        grid = grid[..., 0]
    attrs = {"model": vlm.name, "tower": tower, "component": component, "metric": metric,
             "answer": answer or example.answer, "other": other or "", "window": window,
             "heads": "each" if per_head else (list(heads) if heads is not None else "all"),
             "clean_score": clean_score, "question": example.question, "method": "attention knockout",
             "causal": "a causal intervention: the answer with these attention edges cut"}
    return Knockout(xr.DataArray(grid, dims=dims, coords=coords_out, attrs=attrs, name="knockout"))


@dataclass
class Knockout(Labelled):
    """The answer's metric with each edge cut in each layer window (dims ``layer``, ``edge`` [, ``head``]).

    ``effect()`` is the change from the uncut run (``attrs['clean_score']``), ``relative()`` that change
    over the uncut score (Zhang et al.'s relative change); ``mean`` averages over examples with intervals.
    """

    def effect(self) -> xr.DataArray:
        return self.data - self.attrs["clean_score"]

    def relative(self) -> xr.DataArray:
        clean = self.attrs["clean_score"]
        if clean == 0:
            raise ValueError("the uncut run scores 0: a relative change is undefined; use effect()")
        return (self.data - clean) / abs(clean)

    @classmethod
    def mean(cls, results: Sequence["Knockout"], kind: str = "relative", dim: str = "example") -> xr.Dataset:
        """Mean, standard error and 95% interval over ``results`` of ``relative()`` or ``effect()``."""
        if kind not in ("relative", "effect"):
            raise ValueError(f"kind must be 'relative' or 'effect', got {kind!r}")
        stacked = xr.concat([getattr(r, kind)() for r in results], dim=dim)
        n = stacked.sizes[dim]
        mean = stacked.mean(dim)
        sem = stacked.std(dim, ddof=1) / np.sqrt(n) if n > 1 else xr.zeros_like(mean)
        return xr.Dataset({"mean": mean, "sem": sem, "lo": mean - 1.96 * sem, "hi": mean + 1.96 * sem},
                          attrs={"n": n, "kind": kind})

    def plot(self, path, kind: str = "relative"):
        """Lines over the layers, one per edge (Zhang et al.'s figure); a head axis is averaged."""
        from .methods_plot import plot_knockout

        return plot_knockout(self, path, kind)
