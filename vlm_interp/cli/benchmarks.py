"""vlm-interp pope, chair and compare: hallucination benchmarks on one or several models."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import (DEFAULT_MODEL, INTERVENTION_HELP, add_load_args, intervention_context, load_model, load_options,
                     named_interventions, positive)


def _own_questions(args: argparse.Namespace) -> str | None:
    """The --questions folder, or None for the built-in set (no --questions, or --questions zoo)."""
    return None if args.questions in (None, "zoo") else args.questions


def _check_benchmark_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.images is not None and _own_questions(args) is not None:
        parser.error(f"--images {args.images} sizes the built-in question set, but --questions {args.questions} "
                     "gives the questions; drop --images (or --questions, to use the built-in set)")


def _questions_folder(args: argparse.Namespace) -> Path:
    from vlm_interp.hallucination.sets import question_folder

    return question_folder(_own_questions(args), args.out, args.images)


def _pope(args: argparse.Namespace) -> int:
    from vlm_interp.files import atomic_write
    from vlm_interp.hallucination.compare import markdown_table, read_pope_folder
    from vlm_interp.hallucination.pope import pope_table, process_rank, run_pope_sharded

    folder = _questions_folder(args)
    items = read_pope_folder(folder, args.splits)
    vlm = load_model(args)
    with intervention_context(args, vlm):
        frame = run_pope_sharded(vlm, items, folder / "images", Path(args.out), suffix=args.suffix,
                                 max_new_tokens=args.max_new_tokens, intervention=args.intervention or "none",
                                 batch_size=args.batch_size)
    if process_rank()[0] == 0:
        table = pope_table(frame)
        atomic_write(Path(args.out) / "table.csv", table.to_csv(index=False))
        text = markdown_table(table[["split", "source", "accuracy", "accuracy_lo", "accuracy_hi", "precision",
                                     "recall", "f1", "yes_ratio", "not_explicit", "n"]])
        atomic_write(Path(args.out) / "table.md", text)
        print(text)
    return 0


def _chair(args: argparse.Namespace) -> int:
    import json

    from vlm_interp.hallucination.chair import run_chair
    from vlm_interp.files import atomic_write

    folder = _questions_folder(args)
    vlm = load_model(args)
    with intervention_context(args, vlm):
        scores, metrics = run_chair(vlm, folder / "captions.jsonl", folder / "images", vocab=args.vocab,
                                    prompt=args.prompt, max_new_tokens=args.max_new_tokens, limit=args.limit,
                                    batch_size=args.batch_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "chair_captions.csv", scores.to_csv(index=False))
    atomic_write(out / "chair.json", json.dumps(metrics, indent=1))
    print(json.dumps(metrics, indent=1))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from vlm_interp.hallucination.compare import compare, markdown_table

    if args.benchmark != ["pope"]:
        return _compare_benchmarks(args)
    result = compare(args.models, benchmark="pope", questions=_own_questions(args), out=args.out,
                     splits=args.splits, suffix=args.suffix, max_new_tokens=args.max_new_tokens,
                     interventions=named_interventions(args.intervention), n_images=args.images,
                     batch_size=args.batch_size, load_options=load_options(args))
    print(markdown_table(result.table[["system", "split", "source", "accuracy", "accuracy_lo", "accuracy_hi",
                                       "f1", "yes_ratio", "n"]]))
    if len(result.tests):
        print(markdown_table(result.tests, floatfmt=".4f"))
    print("wrote " + ", ".join(str(p) for p in result.files.values()))
    _record_compare(args, result, "POPE comparison")
    return 0


def _record_compare(args: argparse.Namespace, result, title: str) -> None:
    """run.json and report.html of a comparison (by the main process only, under accelerate)."""
    from vlm_interp.hallucination.pope import process_rank
    from vlm_interp.runs import report_run, write_manifest

    if process_rank()[0] != 0:
        return
    out = Path(args.out)
    write_manifest(out, "compare", inputs={"models": args.models, "questions": args.questions or "zoo (built-in)",
                                           "images": args.images, "splits": args.splits},
                   settings={"benchmark": args.benchmark, "suffix": args.suffix, "max_new_tokens": args.max_new_tokens,
                             "interventions": args.intervention or []},
                   results=[{"file": "table.csv", "kind": "comparison", "title": title,
                             "files": {"tests": "tests.csv"}}], files=list(result.files.values()))
    print(f"report: {report_run(out)}")


def _compare_benchmarks(args: argparse.Namespace) -> int:
    from vlm_interp.hallucination.compare import markdown_table
    from vlm_interp.hallucination.suite import compare_benchmarks

    own = _own_questions(args)
    if own is not None and len(args.benchmark) > 1:
        raise SystemExit(f"--questions {own} gives one benchmark's folder, but --benchmark names "
                         f"{' '.join(args.benchmark)}; run them one at a time, or use the built-in sets")
    result = compare_benchmarks(args.models, args.benchmark, out=args.out,
                                interventions=named_interventions(args.intervention),
                                questions={args.benchmark[0]: own} if own is not None else None, n_images=args.images,
                                splits=args.splits, suffix=args.suffix, max_new_tokens=args.max_new_tokens,
                                caption_tokens=args.caption_tokens)
    table = result.table
    print(markdown_table(table[table["split"].isin(["all", "adversarial", "random", "generative", "captions"])]))
    if len(result.tests):
        print(markdown_table(result.tests[result.tests["split"] == "all"], floatfmt=".4f"))
    print("wrote " + ", ".join(str(p) for p in result.files.values()))
    _record_compare(args, result, "Comparison on " + ", ".join(args.benchmark))
    return 0


def _add_benchmark_args(p: argparse.ArgumentParser, default_out: str) -> None:
    """The options of every benchmark command: where the questions come from and where results go."""
    p.add_argument("--questions", help="folder with <split>.jsonl, captions.jsonl and images/ (default: the built-in "
                   "shapes-world set, written to OUT/pope_set)")
    p.add_argument("--images", type=positive, help="images in the built-in set (default 400, as the organism cards "
                   "use); not with --questions")
    p.add_argument("--out", default=default_out)
    p.add_argument("--batch-size", type=positive, default=1, help="questions answered at once (default 1; the answers "
                   "equal one at a time)")
    add_load_args(p)
    p.set_defaults(check=lambda args: _check_benchmark_args(args, p))


def _add_pope_args(p: argparse.ArgumentParser, default_out: str) -> None:
    """The options of the POPE commands (pope, compare)."""
    _add_benchmark_args(p, default_out)
    p.add_argument("--splits", nargs="+", default=["random", "popular", "adversarial"])
    p.add_argument("--suffix", default="", help="text appended to every question (recorded with each answer)")
    p.add_argument("--max-new-tokens", type=positive, default=8, help="tokens generated per answer (default 8)")


def add(sub) -> None:
    """Register this group's commands on the ``vlm-interp`` subparsers."""
    pope = sub.add_parser("pope", help="POPE on one model; shard with `accelerate launch -m vlm_interp.cli pope ...`")
    pope.add_argument("--model", default=DEFAULT_MODEL)
    pope.add_argument("--intervention", help=INTERVENTION_HELP)
    _add_pope_args(pope, "vlm-interp-pope")
    pope.set_defaults(run=_pope)
    chair = sub.add_parser("chair", help="CHAIR on captions generated by one model")
    chair.add_argument("--model", default=DEFAULT_MODEL)
    chair.add_argument("--vocab", default="shapes", help="built-in vocabulary (shapes, coco) or a JSON file")
    chair.add_argument("--prompt", default="Describe the image.")
    chair.add_argument("--limit", type=positive, help="caption only the first N images")
    chair.add_argument("--max-new-tokens", type=positive, default=32, help="tokens per caption (default 32)")
    chair.add_argument("--intervention", help=INTERVENTION_HELP)
    _add_benchmark_args(chair, "vlm-interp-chair")
    chair.set_defaults(run=_chair)
    comp = sub.add_parser("compare", help="several models side by side on the same questions, with paired tests")
    comp.add_argument("--models", nargs="+", required=True)
    comp.add_argument("--benchmark", nargs="+", default=["pope"], choices=["pope", "chair", "amber", "mme"],
                      help="one or several benchmarks, each on its built-in shapes-world set (default: pope); "
                      "with several, one long table, paired tests per benchmark and one plot across them")
    comp.add_argument("--caption-tokens", type=positive, default=32, help="tokens per caption for chair and "
                      "AMBER's generative part (default 32)")
    comp.add_argument("--intervention", action="append", help="[NAME=]SPEC, repeatable; every model is also run "
                      "without intervention. " + INTERVENTION_HELP)
    _add_pope_args(comp, "vlm-interp-compare")
    comp.set_defaults(run=_compare)
