"""vlm-interp trace-dataset: causal tracing averaged over many pairs, resumable, shared over processes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import DEFAULT_MODEL, add_load_args, load_model, positive


def _pairs(args: argparse.Namespace, vlm) -> list:
    """``(key, make_pair)`` for ``--pairs``: a JSON-lines pairs file, or ``zoo`` (shapes-world minimal pairs)."""
    from vlm_interp.corruptions import from_spec, load_pair, read_pairs

    if args.pairs == "zoo":
        from vlm_interp.zoo.calibration import CALIBRATION_SEED, calibration_pairs

        pairs = calibration_pairs(vlm, args.level, args.n, seed=CALIBRATION_SEED if args.seed is None else args.seed)
    else:
        records = read_pairs(args.pairs)[:args.n]
        unanswered = [r.where for r in records if not r.clean_answer]
        if unanswered:
            raise SystemExit(f"trace-dataset needs each pair's clean_answer (what the model should say on the clean "
                             f"image); missing at {unanswered[:5]}")
        pairs = [(r.id or f"line{r.line}", lambda r=r: load_pair(vlm, r)) for r in records]
    if args.corrupt == "pair":
        return pairs

    def corrupted(make):
        def make_pair():
            clean, _ = make()
            corrupt = from_spec(vlm, clean, args.corrupt)
            corrupt.meta["corruption"] = args.corrupt
            return clean, corrupt
        return make_pair

    return [(key, corrupted(make)) for key, make in pairs]


def _trace_dataset(args: argparse.Namespace) -> int:
    from vlm_interp.files import atomic_write, check_settings
    from vlm_interp.parallel import process_rank, wait
    from vlm_interp.runs import report_run, write_manifest
    from vlm_interp.tracing.dataset import trace_dataset
    from vlm_interp.tracing.engine import FAST_PATHS

    vlm = load_model(args)
    out = Path(args.out)
    components = [c if "." in c else f"{args.tower}.{c}" for c in args.components.split(",")]
    settings = {"model": vlm.name, "dtype": str(vlm.dtype).removeprefix("torch."), "pairs": args.pairs,
                "level": args.level, "seed": args.seed, "corrupt": args.corrupt, "components": components,
                "tokens": args.tokens, "window": args.window, "metric": args.metric}
    rank, _, state = process_rank()
    if rank == 0:
        check_settings(out / "traces", settings, fix="use another --out")
    wait(state)  # no process writes a trace before the folder's settings are checked
    batch = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    result = trace_dataset(vlm, _pairs(args, vlm), out / "traces", components=components,
                           tokens=args.tokens.split(","), window=args.window, metric=args.metric, batch_size=batch,
                           fast_path=FAST_PATHS[args.path])
    if rank != 0:
        return 0
    mean = result.mean_trace()
    files = [mean.save(out / "mean_trace.json"), result.plot(out / "mean_trace.png"),
             atomic_write(out / "skipped.json", json.dumps(result.skipped, indent=1)), out / "traces" / "settings.json"]
    write_manifest(out, "trace-dataset", vlm=vlm, inputs={"pairs": args.pairs, "level": args.level, "n": args.n,
                                                          "seed": args.seed},
                   corruption=args.corrupt, settings=settings,
                   results=[{"file": "mean_trace.json", "kind": "trace",
                             "title": f"Mean recovery rate over {len(result.traces)} examples"}], files=files)
    print(f"{len(result.traces)} examples traced, {len(result.skipped)} skipped (the model answered otherwise)")
    print(mean.data.max("position").to_pandas().round(3).to_string())
    print("wrote " + ", ".join(str(f) for f in files))
    print(f"report: {report_run(out)}")
    return 0


def _batch_size(text: str) -> str | int:
    return text if text == "auto" else positive(text)


def add(sub) -> None:
    """Register this group's commands on the ``vlm-interp`` subparsers."""
    td = sub.add_parser("trace-dataset", help="causal tracing averaged over pairs (shard with `accelerate launch -m "
                        "vlm_interp.cli trace-dataset ...`)")
    td.add_argument("--model", default=DEFAULT_MODEL)
    td.add_argument("--pairs", default="zoo", help="a JSON-lines pairs file (clean_image, corrupt_image, question, "
                    "clean_answer[, corrupt_answer, box|mask, id]) or zoo: shapes-world minimal pairs")
    td.add_argument("--level", default="object", choices=["object", "attribute", "relation"],
                    help="what the zoo's pairs change (default object)")
    td.add_argument("--n", type=positive, default=50, help="pairs to trace (default 50)")
    td.add_argument("--seed", type=int, help="scene seed of the zoo's pairs (default: the calibration seed)")
    td.add_argument("--corrupt", default="pair", help="pair (the pair's corrupt image) or a corruption of the clean "
                    "example: noise[:scale=3sd,...], str:OLD=NEW, edit[:fill=blur]")
    td.add_argument("--tower", default="lm")
    td.add_argument("--components", default="hidden,attn,mlp")
    td.add_argument("--tokens", default="image,question,last", help="comma-separated token groups (the same in "
                    "every example)")
    td.add_argument("--window", type=positive, default=1)
    td.add_argument("--metric", default="prob", choices=["prob", "logprob"])
    td.add_argument("--batch-size", type=_batch_size, default="auto", help="cells per forward, or auto")
    td.add_argument("--path", default="auto", choices=["auto", "fast", "general"])
    td.add_argument("--out", default="vlm-interp-trace-dataset")
    add_load_args(td)
    td.set_defaults(run=_trace_dataset)
