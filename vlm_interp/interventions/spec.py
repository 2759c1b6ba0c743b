"""Interventions named by a short text, for the command line: ``heads:SCORES.nc,lambda=1``,
``vhr:alpha=2,layers=1-3``, ``iri:PLAN.json``, ``scale:lm.head.2.1=1.5+lm.head.3.0=0``, ``vcd:alpha=1[,beta=0.1,noise=500,seed=0]``,
``pai:alpha=0.2[,gamma=0.1,start=2,end=N,beta=0.1]``.

Each spec becomes a function from a VLM to a context manager, the form that
:func:`vlm_interp.hallucination.compare` takes. The strings are parsed by
:class:`vlm_interp.options.SpecParser`, like the corruption specs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, ContextManager

from ..options import SpecParser
from .iri import InjectionPlan, inject
from .modulate import modulate_heads, v_seam_scales
from .pai import pai
from .scoring import HeadScores
from .steps import InterventionError
from .vcd import vcd
from .vhr import vhr

KINDS = ("heads", "vhr", "iri", "scale", "vcd", "pai")
SPEC_HELP = ("heads:SCORES.nc[,lambda=1,kind=signed|positive|negative] (V-SEAM head modulation); "
             "vhr[:alpha=2,layers=1-3]; iri:PLAN.json; scale:SITE=FACTOR[+SITE=FACTOR...] "
             "(for example scale:lm.head.2.1=1.5+lm.head.3.0=0); "
             "vcd[:alpha=1,beta=0.1,noise=500,seed=0] (visual contrastive decoding); "
             "pai[:alpha=0.2,gamma=0.1,start=2,end=N,beta=0.1] (PAI: attention scores to image tokens + alpha |score| in "
             "LM layers start..end-1, text-only contrast; gamma is the paper's gamma minus 1)")
SPEC = SpecParser("intervention", SPEC_HELP, InterventionError)
SCORE_KINDS = ("signed", "positive", "negative")


def from_spec(spec: str) -> Callable[[object], ContextManager]:
    """The intervention named by ``spec`` (see the module docstring), ready for compare().

    The function carries ``spec`` as its attribute ``spec``, which compare() records with every answer.
    """
    make = _build(spec)
    make.spec = spec
    return make


def _build(spec: str) -> Callable[[object], ContextManager]:
    kind, rest = SPEC.split(spec, KINDS)
    if kind == "vhr":
        opts = SPEC.options("vhr", rest, ("alpha", "layers"))
        alpha = SPEC.number("vhr", "alpha", opts.get("alpha", "2"))
        layers = SPEC.integers("vhr", "layers", opts["layers"]) if "layers" in opts else None
        return lambda vlm: vhr(vlm, alpha=alpha, layers=layers)
    if kind == "vcd":
        opts = SPEC.options("vcd", rest, ("alpha", "beta", "noise", "seed"))
        alpha, beta = SPEC.number("vcd", "alpha", opts.get("alpha", "1")), SPEC.number("vcd", "beta", opts.get("beta", "0.1"))
        noise, seed = SPEC.integer("vcd", "noise", opts.get("noise", "500")), SPEC.integer("vcd", "seed", opts.get("seed", "0"))
        return lambda vlm: vcd(vlm, alpha=alpha, beta=beta, noise_step=noise, seed=seed)
    if kind == "pai":
        opts = SPEC.options("pai", rest, ("alpha", "gamma", "start", "end", "beta"))
        alpha = SPEC.number("pai", "alpha", opts.get("alpha", "0.2"))
        gamma = SPEC.number("pai", "gamma", opts.get("gamma", "0.1"))
        start = SPEC.integer("pai", "start", opts.get("start", "2"))
        beta = SPEC.number("pai", "beta", opts.get("beta", "0.1"))
        end = SPEC.integer("pai", "end", opts["end"]) if "end" in opts else None
        return lambda vlm: pai(vlm, alpha=alpha, gamma=gamma, start=start, end=end, beta=beta)
    if kind == "iri":
        path = Path(rest)
        if not path.is_file():
            raise InterventionError(f"intervention {spec!r}: IRI plan file {path} not found "
                                    "(make one with `vlm-interp iri plan`)")
        plan = InjectionPlan.load(path)
        return lambda vlm: inject(vlm, plan)
    if kind == "scale":
        pairs = SPEC.pairs(rest, "scale", "SITE=FACTOR, several joined by '+' (for example "
                           "scale:lm.head.2.1=1.5+lm.head.3.0=0)", sep="+")
        scales = {site: SPEC.number("scale", site, value) for site, value in pairs}
        return lambda vlm: modulate_heads(vlm, scales)
    path, _, rest = rest.partition(",")
    if not Path(path).is_file():
        raise InterventionError(f"intervention {spec!r}: head scores {path!r} not found "
                                "(make them with `vlm-interp heads score`)")
    opts = SPEC.options("heads", rest, ("lambda", "kind"))
    lam = SPEC.number("heads", "lambda", opts.get("lambda", "1"))
    kind_of_score = opts.get("kind", "signed")
    if kind_of_score not in SCORE_KINDS:
        raise InterventionError(f"intervention {spec!r}: kind must be one of {SCORE_KINDS}, got {kind_of_score!r}")
    scores = HeadScores.load(path)
    scales = v_seam_scales(getattr(scores, kind_of_score)(), lam, tower=scores.attrs["tower"],
                           component=scores.attrs["component"])
    return lambda vlm: modulate_heads(vlm, scales)
