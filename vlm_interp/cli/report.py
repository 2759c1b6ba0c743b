"""vlm-interp report: one self-contained, interactive HTML file of a run folder."""

from __future__ import annotations

import argparse


def _report(args: argparse.Namespace) -> int:
    from vlm_interp.runs import report_run

    path = report_run(args.run_dir, args.out)
    print(f"report: {path} ({path.stat().st_size / 1e6:.1f} MB; opens offline in any browser)")
    return 0


def add(sub) -> None:
    """Register this group's commands on the ``vlm-interp`` subparsers."""
    rep = sub.add_parser("report", help="an interactive HTML report (one offline file) of a folder a command wrote")
    rep.add_argument("run_dir", metavar="RUN_DIR", help="a folder with run.json (written by demo, trace, "
                     "trace-dataset, lens, knockout, attention or compare)")
    rep.add_argument("--out", help="the HTML file to write (default RUN_DIR/report.html)")
    rep.set_defaults(run=_report)
