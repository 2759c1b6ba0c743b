"""Interventions named by a short text, for the command line: ``heads:SCORES.nc,lambda=1``,
``vhr:alpha=2,layers=1-3``, ``iri:PLAN.json``, ``scale:lm.head.2.1=1.5+lm.head.3.0=0``.

Each spec becomes a function from a VLM to a context manager, the form that
:func:`vlm_interp.hallucination.compare` takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, ContextManager

from .iri import InjectionPlan, inject
from .modulate import modulate_heads, v_seam_scales
from .scoring import HeadScores
from .steps import InterventionError
from .vhr import vhr

KINDS = ("heads", "vhr", "iri", "scale")


def _options(text: str, spec: str, allowed: set[str]) -> dict[str, str]:
    out = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key not in allowed:
            raise InterventionError(f"intervention {spec!r}: option {part!r} is not one of "
                                    f"{sorted(allowed)} written as key=value")
        out[key] = value
    return out


def _layers(text: str) -> list[int]:
    """``1-3`` or ``0+2+5`` to a list of layers."""
    if "-" in text:
        lo, hi = text.split("-", 1)
        return list(range(int(lo), int(hi) + 1))
    return [int(x) for x in text.split("+")]


def _number(value: str, what: str, spec: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise InterventionError(f"intervention {spec!r}: {what} must be a number, got {value!r}") from None


def from_spec(spec: str) -> Callable[[object], ContextManager]:
    """The intervention named by ``spec`` (see the module docstring), ready for compare().

    The function carries ``spec`` as its attribute ``spec``, which compare() records with every answer.
    """
    make = _build(spec)
    make.spec = spec
    return make


def _build(spec: str) -> Callable[[object], ContextManager]:
    kind, _, rest = spec.partition(":")
    if kind not in KINDS:
        raise InterventionError(f"unknown intervention {spec!r}; kinds are {KINDS} (e.g. vhr:alpha=2)")
    if kind == "vhr":
        opts = _options(rest, spec, {"alpha", "layers"})
        alpha = _number(opts.get("alpha", "2"), "alpha", spec)
        layers = _layers(opts["layers"]) if "layers" in opts else None
        return lambda vlm: vhr(vlm, alpha=alpha, layers=layers)
    if kind == "iri":
        path = Path(rest)
        if not path.is_file():
            raise InterventionError(f"intervention {spec!r}: IRI plan file {path} not found "
                                    "(make one with `vlm-interp iri plan`)")
        plan = InjectionPlan.load(path)
        return lambda vlm: inject(vlm, plan)
    if kind == "scale":
        scales = {}
        for part in filter(None, rest.split("+")):
            site, sep, value = part.partition("=")
            if not sep:
                raise InterventionError(f"intervention {spec!r}: write scales as SITE=FACTOR joined by '+'")
            scales[site] = _number(value, f"scale of {site}", spec)
        return lambda vlm: modulate_heads(vlm, scales)
    path, _, rest = rest.partition(",")
    if not Path(path).is_file():
        raise InterventionError(f"intervention {spec!r}: head scores {path!r} not found "
                                "(make them with `vlm-interp heads score`)")
    opts = _options(rest, spec, {"lambda", "kind"})
    lam = _number(opts.get("lambda", "1"), "lambda", spec)
    kind_of_score = opts.get("kind", "signed")
    if kind_of_score not in ("signed", "positive", "negative"):
        raise InterventionError(f"intervention {spec!r}: kind must be signed, positive or negative")
    scores = HeadScores.load(path)
    scales = v_seam_scales(getattr(scores, kind_of_score)(), lam, tower=scores.attrs["tower"],
                           component=scores.attrs["component"])
    return lambda vlm: modulate_heads(vlm, scales)
