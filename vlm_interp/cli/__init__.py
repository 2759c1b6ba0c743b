"""The ``vlm-interp`` command line: one module per command group.

Each group module has an ``add(sub)`` that registers its commands on the top-level subparsers; a
command's parser sets ``run`` (the function to call) and, where options depend on each other,
``check`` (which ends with a usage error before anything loads).
"""

from __future__ import annotations

import argparse

from . import benchmarks, demo, info, interventions, methods, report, sweeps, trace, zoo

GROUPS = (demo, info, zoo, trace, sweeps, methods, benchmarks, interventions, report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-interp",
        description="Causal interpretability for vision-language models: trace, intervene, compare hallucination.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if "check" in args:  # options that cannot be honoured together end here, with a usage error
        args.check(args)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # keep the command's output to what it says itself
    return args.run(args)


__all__ = ["build_parser", "main"]
