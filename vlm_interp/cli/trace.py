"""vlm-interp trace: causal tracing of one example."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import DEFAULT_MODEL, add_load_args, load_image, load_model, positive


def _check_trace_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    others = sorted({c.split(".")[0] for c in args.components.split(",") if "." in c} - {args.tower})
    if others:
        parser.error(f"--components names the tower(s) {others}, but --tower is {args.tower!r}; trace one tower at a "
                     f"time: give --tower {others[0]} or components without a tower prefix")


def _trace(args: argparse.Namespace) -> int:
    import json

    import torch

    from vlm_interp.corruptions import from_spec
    from vlm_interp.files import atomic_write
    from vlm_interp.runs import report_run, save_example, write_manifest
    from vlm_interp.tracing import trace
    from vlm_interp.tracing.engine import FAST_PATHS
    from vlm_interp.tracing.plot import plot_image_effects, plot_trace

    vlm = load_model(args)
    image, mask = load_image(args.image, args.question)
    region = tuple(float(v) for v in args.region.split(",")) if args.region else mask
    ex = vlm.prepare(image, args.question, region=region)
    answer = args.answer
    if answer is None:  # trace the model's own first answer token, as ROME does
        top = int(torch.argmax(vlm.first_token_logits(ex)))
        answer = vlm.tokenizer.decode([top]).strip()
    ex.answer, ex.answer_ids = answer, vlm.encode_answer(ex, answer)
    corrupt = from_spec(vlm, ex, args.corrupt)
    corrupt.meta["corruption"] = args.corrupt
    tokens = args.tokens if args.tokens in ("each", "all") else args.tokens.split(",")
    components = [c if "." in c else f"{args.tower}.{c}" for c in args.components.split(",")]
    tr = trace(vlm, ex, corrupt, components=components, tokens=tokens, window=args.window, metric=args.metric,
               fast_path=FAST_PATHS[args.path])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = [tr.save(out / "trace.json"), plot_trace(tr, out / "trace.png")]
    if tokens == "each" and ex.boxes.get(args.tower) and "hidden" in tr.data.coords["component"].values:
        files.append(plot_image_effects(tr, ex, out / "image_effects.png", tower=args.tower))
    rr = tr.rr()
    best = rr.where(rr == rr.max(), drop=True)
    summary = {"question": args.question, "answer": answer, "corruption": args.corrupt,
               "clean_score": tr.attrs["clean_score"], "corrupt_score": tr.attrs["corrupt_score"],
               "metric": args.metric, "path": args.path, "best_cell": {k: str(v.values[0]) for k, v in best.coords.items()},
               "best_rr": float(rr.max())}
    files += [atomic_write(out / "summary.json", json.dumps(summary, indent=1)), save_example(ex, out)]
    if ex.image is not None:
        files.append(out / "image.png")
    settings = {"tower": args.tower, "components": components, "tokens": args.tokens, "window": args.window,
                "metric": args.metric, "path": args.path}
    write_manifest(out, "trace", vlm=vlm, inputs={"image": args.image, "question": args.question, "answer": answer,
                                                  "region": args.region}, corruption=args.corrupt, settings=settings,
                   results=[{"file": "trace.json", "kind": "trace", "title": f"Causal trace ({args.corrupt})"}],
                   files=files)
    print(f"{args.question} -> {answer!r}: {args.metric} clean {summary['clean_score']:.4f}, corrupted "
          f"{summary['corrupt_score']:.4f} ({args.corrupt})")
    print(f"strongest restoration: rr {summary['best_rr']:.3f} at {summary['best_cell']}")
    print("wrote " + ", ".join(str(f) for f in files))
    print(f"report: {report_run(out)}")
    return 0


def add(sub) -> None:
    """Register this group's commands on the ``vlm-interp`` subparsers."""
    tr = sub.add_parser("trace", help="causal tracing of one example: corrupt, restore each site, plot the effects")
    tr.add_argument("--model", default=DEFAULT_MODEL)
    tr.add_argument("--image", required=True, help="image path, or shapes:SEED for a rendered shapes-world scene")
    tr.add_argument("--question", required=True)
    tr.add_argument("--answer", help="answer to trace (default: the model's own first token)")
    tr.add_argument("--corrupt", default="noise", help="noise[:scale=3sd,tokens=image,place=embeddings,seed=0] | "
                    "pair:PATH | str:circle=square | edit[:fill=blur]")
    tr.add_argument("--region", help="object box x0,y0,x1,y1 in image pixels (shapes:SEED finds the asked object)")
    tr.add_argument("--tower", default="lm")
    tr.add_argument("--components", default="hidden,attn,mlp")
    tr.add_argument("--tokens", default="each", help="each | all | comma-separated token groups")
    tr.add_argument("--window", type=positive, default=1,
                    help="layers restored together around each layer (ROME's window; default 1)")
    tr.add_argument("--metric", default="prob", choices=["prob", "logprob"])
    tr.set_defaults(check=lambda args: _check_trace_args(args, tr))
    tr.add_argument("--path", default="auto", choices=["auto", "fast", "general"],
                    help="auto: start LM cells inside the LM where that applies, else whole-model forwards with a "
                         "warning (same numbers); fast: require the fast path (error if it cannot apply); general: "
                         "whole-model forwards only")
    tr.add_argument("--out", default="vlm-interp-trace")
    add_load_args(tr)
    tr.set_defaults(run=_trace)
