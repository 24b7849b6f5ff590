"""`coalign report RUN_DIR`: write a run's self-contained HTML report (see `coalign.evaluate.report`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="write a self-contained HTML report of a run",
        description="Write one HTML file (plots and images embedded, no external URLs) with a run's summary, "
        "loss curves, learning rate and throughput, evaluation metrics over steps, zero-shot confusion "
        "matrices and retrieval examples from its latest checkpoint, and its recipe.",
    )
    p.add_argument("run", type=Path, help="run folder written by `coalign train`")
    p.add_argument("--out", type=Path, help="HTML file to write (default: RUN/report.html)")
    p.add_argument(
        "--max-samples",
        type=int,
        default=500,
        help="embed at most this many samples of the first eval set for the confusion matrices and "
        "retrieval examples (default: 500)",
    )
    p.add_argument("--examples", type=int, default=8, help="retrieval example queries to show (default: 8)")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from coalign.evaluate.report import write_report

    path = write_report(args.run, args.out, max_samples=args.max_samples, examples=args.examples)
    print(f"report: {path}")
    return 0
