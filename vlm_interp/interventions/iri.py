"""Intermediate representation injection (IRI, from FCCT): strengthen the last token's mid-layer
representations at later layers.

At every generation step, the attention (or MLP) output of the newest token at each target
layer gets ``coefficient * sum_s w_s * out_s`` added, where ``out_s`` are the same token's
outputs of that component at earlier source layers, and is then rescaled to its original
norm. Sources, targets and weights come from dataset-level tracing: the layers whose
restoration recovers most of the answer (recovery rate at the last token).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import xarray as xr

from ..files import atomic_write
from ..hooks import Hook
from .steps import InterventionError, StepTracker, require_decoder_lm

IRI_COMPONENTS = ("attn", "mlp")


@dataclass
class InjectionPlan:
    """``targets[component][target_layer] = {source_layer: weight}`` and a coefficient per component."""

    targets: dict[str, dict[int, dict[int, float]]]
    coefficients: dict[str, float]
    notes: dict = field(default_factory=dict)

    def check(self, n_layers: int) -> None:
        """Components known, layers in range, every source before its target, coefficients given."""
        for component, targets in self.targets.items():
            if component not in IRI_COMPONENTS:
                raise InterventionError(f"IRI injects into {IRI_COMPONENTS}, not {component!r}")
            if component not in self.coefficients:
                raise InterventionError(f"the plan has targets for {component!r} but no coefficient for it")
            for target, sources in targets.items():
                if not 0 <= target < n_layers:
                    raise InterventionError(f"IRI target layer {target} outside 0..{n_layers - 1}")
                if not sources:
                    raise InterventionError(f"IRI target {component} layer {target} has no source layers")
                late = [s for s in sources if not 0 <= s < target]
                if late:
                    raise InterventionError(f"IRI sources {late} of {component} layer {target} must be earlier "
                                            "layers (a source must run before its target in the same forward)")

    def to_dict(self) -> dict:
        return {"targets": {c: {str(t): {str(s): w for s, w in src.items()} for t, src in tg.items()}
                            for c, tg in self.targets.items()},
                "coefficients": self.coefficients, "notes": self.notes}

    @classmethod
    def from_dict(cls, d: dict) -> "InjectionPlan":
        try:
            targets = {c: {int(t): {int(s): float(w) for s, w in src.items()} for t, src in tg.items()}
                       for c, tg in d["targets"].items()}
            return cls(targets, {c: float(v) for c, v in d["coefficients"].items()}, d.get("notes", {}))
        except (KeyError, AttributeError, ValueError) as err:
            raise InterventionError(f"not an IRI plan ({type(err).__name__}: {err}); expected "
                                    '{"targets": {component: {target: {source: weight}}}, "coefficients": {...}}') from None

    def save(self, path: "str | Path") -> Path:
        return atomic_write(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: "str | Path") -> "InjectionPlan":
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise InterventionError(f"{path}: not JSON ({err})") from None


def plan_from_recovery(rr: xr.DataArray, k: int = 2, coefficients: dict[str, float] | None = None,
                       targets: Sequence[int] | None = None) -> InjectionPlan:
    """An IRI plan from mean recovery rates at the last token, dims (component, layer).

    Per component, the sources are the ``k`` layers with the highest positive RR among those that
    have a later layer to inject into, weighted by their RR normalised to sum to 1; the targets are
    ``targets`` or every layer after the last source. Components without a positive RR are left out.
    """
    if set(rr.dims) != {"component", "layer"}:
        raise InterventionError(f"plan_from_recovery wants recovery rates with dims (component, layer), got {rr.dims}")
    coefficients = coefficients or {"attn": 0.5, "mlp": 0.5}
    plan: dict[str, dict[int, dict[int, float]]] = {}
    for component in rr.coords["component"].values:
        component = str(component)
        if component not in coefficients:
            continue
        values = rr.sel(component=component)
        layers = [int(l) for l in values.coords["layer"].values]
        last_target = max(targets) if targets is not None else max(layers)
        order = [layers[i] for i in np.argsort(-np.nan_to_num(values.values, nan=-np.inf)) if layers[i] < last_target]
        sources = [l for l in order[:k] if float(values.sel(layer=l)) > 0]
        if not sources:
            continue
        total = sum(float(values.sel(layer=l)) for l in sources)
        weights = {l: float(values.sel(layer=l)) / total for l in sources}
        chosen = [t for t in (targets if targets is not None else layers) if t > max(sources)]
        if chosen:
            plan[component] = {t: dict(weights) for t in chosen}
    if not plan:
        raise InterventionError("no component has a positive recovery rate before a later layer: nothing to inject")
    return InjectionPlan(plan, {c: coefficients[c] for c in plan}, {"k": k, "rule": "top-k RR at the last token"})


@contextlib.contextmanager
def inject(vlm, plan: InjectionPlan) -> Iterator[InjectionPlan]:
    """Apply an IRI plan during generate or a forward; only each step's newest token is touched."""
    require_decoder_lm(vlm, "IRI")
    plan.check(vlm.adapter.n_layers["lm"])
    tracker = StepTracker(vlm)
    hooks = tracker.hooks()
    for component, targets in plan.targets.items():
        sources = sorted({s for src in targets.values() for s in src})
        seen: dict[int, torch.Tensor] = {}
        for layer in sorted(set(sources) | set(targets)):
            path, kind = vlm.adapter.hook_point("lm", component, layer)
            fn = _injector(tracker, seen, layer, layer in sources, targets.get(layer), plan.coefficients[component])
            hooks.append(Hook(path, fn=fn, kind=kind, name=f"IRI lm.{component}.{layer}"))
    with vlm.attach(hooks):
        yield plan


def _injector(tracker: StepTracker, seen: dict[int, torch.Tensor], layer: int, is_source: bool,
              sources: dict[int, float] | None, coefficient: float):
    """Edit for one layer: remember its output (a source) and/or inject into it (a target)."""
    alphas = {s: coefficient * w for s, w in (sources or {}).items()}

    def run(t: torch.Tensor) -> torch.Tensor:
        where = tracker.step_positions()
        if is_source:
            seen[layer] = t[:, where]
        if not alphas:
            return t
        original = t[:, where]
        added = original
        for s, alpha in alphas.items():
            added = torch.add(added, seen[s], alpha=alpha)
        norm = torch.linalg.vector_norm(original, dim=-1, keepdim=True)
        new_norm = torch.linalg.vector_norm(added, dim=-1, keepdim=True).clamp_min_(torch.finfo(t.dtype).tiny)
        rescaled = added * (norm / new_norm)
        if where.start == 0:  # the whole call is new positions (each cached step): no copy needed
            return rescaled
        out = t.clone()
        out[:, where] = rescaled
        return out

    return run
