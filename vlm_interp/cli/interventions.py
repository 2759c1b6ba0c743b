"""vlm-interp heads and iri: head scores and injection plans for interventions."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import DEFAULT_MODEL, add_load_args, load_model, positive


def _heads_score(args: argparse.Namespace) -> int:
    from vlm_interp.interventions import plot_head_scores, score_heads
    from vlm_interp.parallel import process_rank
    from vlm_interp.zoo.calibration import calibration_examples

    vlm = load_model(args)
    out = Path(args.out)
    examples = calibration_examples(vlm, args.level, args.n, seed=args.seed)
    scores = score_heads(vlm, examples, tower=args.tower, component=args.component, ablation=args.ablation,
                         folder=out.with_suffix(".parts"), level=args.level)
    if process_rank()[0] != 0:  # under accelerate launch every process holds all scores; the main one writes them
        return 0
    scores.save(out)
    plot_head_scores({args.level: scores}, out.with_suffix(".png"))
    right = int(scores.data.coords["correct"].values.sum())
    print(f"{scores.data.sizes['example']} {args.level} examples ({right} answered right), ablation {args.ablation}")
    print(scores.top(args.top).to_string(index=False))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def _iri_plan(args: argparse.Namespace) -> int:
    from vlm_interp.corruptions import noise
    from vlm_interp.files import check_settings
    from vlm_interp.interventions import plan_from_recovery
    from vlm_interp.tracing.dataset import trace_dataset
    from vlm_interp.zoo.calibration import calibration_examples

    vlm = load_model(args)
    out = Path(args.out)
    parts = out.with_suffix(".parts")  # one trace per question, kept for resuming (its key names --seed)
    check_settings(parts, {"model": vlm.name, "noise": args.noise}, fix="use another --out")
    examples = calibration_examples(vlm, "object", args.n, seed=args.seed, positive_only=True)
    pairs = [(key, lambda ex=ex: (ex, noise(vlm, ex, scale=args.noise, tokens="image", seed=0)))
             for key, ex in examples]
    result = trace_dataset(vlm, pairs, parts, components=("lm.attn", "lm.mlp"), tokens=("last",))
    summary = result.summary()
    rr = summary["mean"].isel(position=0, drop=True)
    plan = plan_from_recovery(rr, k=args.k, coefficients={"attn": args.attn, "mlp": args.mlp})
    plan.notes.update({"model": vlm.name, "examples": len(result.traces), "skipped": len(result.skipped),
                       "noise": args.noise, "recovery": {c: [float(v) for v in rr.sel(component=c).values]
                                                          for c in rr.coords["component"].values}})
    plan.save(out)
    print(rr.to_pandas().round(3).to_string())
    print(f"plan: {plan.targets} coefficients {plan.coefficients}; wrote {out}")
    return 0


def add(sub) -> None:
    """Register this group's commands on the ``vlm-interp`` subparsers."""
    heads = sub.add_parser("heads", help="attention-head scores for interventions")
    heads_sub = heads.add_subparsers(dest="heads_command", required=True)
    hs = heads_sub.add_parser("score", help="ablate each head on calibration questions and score it (V-SEAM); shard "
                              "with `accelerate launch -m vlm_interp.cli heads score ...`")
    hs.add_argument("--model", default=DEFAULT_MODEL)
    hs.add_argument("--level", default="object", choices=["object", "attribute", "relation"],
                    help="shapes-world calibration questions: existence, colour or relation")
    hs.add_argument("--n", type=positive, default=100, help="calibration questions")
    hs.add_argument("--seed", type=int, default=20_011, help="calibration seed (disjoint from training and evaluation)")
    hs.add_argument("--tower", default="lm")
    hs.add_argument("--component", default="head", choices=["head", "xattn_head"])
    hs.add_argument("--ablation", default="mean", choices=["mean", "zero", "dataset_mean"])
    hs.add_argument("--top", type=positive, default=8, help="heads to print")
    hs.add_argument("--out", default="head-scores.nc", help=".nc or .json; per-example parts go next to it")
    add_load_args(hs)
    hs.set_defaults(run=_heads_score)
    iri = sub.add_parser("iri", help="intermediate representation injection plans")
    iri_sub = iri.add_subparsers(dest="iri_command", required=True)
    ip = iri_sub.add_parser("plan", help="trace calibration questions (noise on the image) and plan IRI from the "
                            "layers whose last-token attention/MLP recover most")
    ip.add_argument("--model", default=DEFAULT_MODEL)
    ip.add_argument("--n", type=positive, default=60, help="calibration questions (positives; wrong answers skipped)")
    ip.add_argument("--seed", type=int, default=20_011)
    ip.add_argument("--noise", default="3sd")
    ip.add_argument("--k", type=positive, default=2, help="source layers per component")
    ip.add_argument("--attn", type=float, default=0.5, help="coefficient of attention injection")
    ip.add_argument("--mlp", type=float, default=0.5, help="coefficient of MLP injection")
    ip.add_argument("--out", default="iri-plan.json")
    add_load_args(ip)
    ip.set_defaults(run=_iri_plan)
