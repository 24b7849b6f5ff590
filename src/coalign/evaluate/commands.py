"""The `coalign compare | fewshot` subcommands and `coalign eval --suite` (argparse builders in the
style of coalign.cli, which lists them)."""

from __future__ import annotations

import json
from pathlib import Path

from coalign.registry import ConfigError

DEFAULT_SHOTS = [1, 2, 4, 8, 16]


def run_suite_command(run_path: Path, suite_path: Path, out: Path | None, model: str | None) -> int:
    """`coalign eval RUN --suite SUITE.yaml`: result files into OUT (default RUN/eval/<suite>-step_N)."""
    from coalign.build import load_run
    from coalign.evaluate.results import comparison, load_records, to_markdown
    from coalign.evaluate.runner import load_suite, run_suite

    suite = load_suite(suite_path)
    run = load_run(run_path)
    out = out or run.run_dir / "eval" / f"{suite.name}-step_{run.step:08d}"
    _, paths = run_suite(run, suite, out, model)
    header, rows = comparison(load_records(paths))
    print(to_markdown(header, rows))
    print(f"{len(paths)} result files (CLIP_benchmark layout) in {out}")
    return 0


def add_compare(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="build a comparison table (CSV and Markdown) from result files",
        description="Read CLIP_benchmark-layout result files (files or folders of *.json, from `coalign eval "
        "--suite` or CLIP_benchmark itself) and pivot them: one row per dataset, task and metric, one column "
        "per model.",
    )
    p.add_argument("results", type=Path, nargs="+", help="result files or folders")
    p.add_argument("--out", type=Path, default=Path("comparison"), help="writes OUT.csv and OUT.md")
    p.add_argument(
        "--metrics",
        help="regular expression over metric names (default: acc1, lp_acc1, knn_acc1, recall@1/5)",
    )
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    from coalign.evaluate.results import comparison, load_records, to_csv, to_markdown
    from coalign.io import atomic_write_text

    header, rows = comparison(load_records(args.results), args.metrics)
    if not rows:
        raise ConfigError("no metric in these result files matches; see --metrics")
    markdown = to_markdown(header, rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out.with_suffix(".csv"), to_csv(header, rows))
    atomic_write_text(args.out.with_suffix(".md"), markdown)
    print(markdown)
    print(f"wrote {args.out.with_suffix('.csv')} and {args.out.with_suffix('.md')}")
    return 0


def add_fewshot(sub) -> None:
    p = sub.add_parser(
        "fewshot",
        help="zero-shot vs CoOp vs linear probe at k shots per class",
        description="For every dataset of SUITE that names a train split: zero-shot accuracy, and CoOp and "
        "a linear probe trained on k examples per class, for each k. Prints and writes a table.",
    )
    p.add_argument("run", type=Path, help="run folder or checkpoint folder")
    p.add_argument("--suite", type=Path, required=True, help="suite YAML (datasets with train splits)")
    p.add_argument("--shots", type=int, nargs="+", default=DEFAULT_SHOTS)
    p.add_argument("--seeds", type=int, default=1, help="repeat each k with this many shot samples; mean")
    p.add_argument("--out", type=Path, help="writes OUT.md, OUT.csv, OUT.json (default RUN/eval/fewshot)")
    p.set_defaults(func=cmd_fewshot)


def cmd_fewshot(args) -> int:
    from coalign.build import load_run
    from coalign.evaluate.fewshot import fewshot_table
    from coalign.evaluate.results import to_csv
    from coalign.evaluate.runner import load_suite
    from coalign.io import atomic_write_text

    if any(k < 1 for k in args.shots):
        raise ConfigError(f"--shots must be positive integers, got {args.shots}")
    suite = load_suite(args.suite)
    run = load_run(args.run)
    table = fewshot_table(run, suite, sorted(set(args.shots)), seeds=args.seeds)
    out = args.out or run.run_dir / "eval" / "fewshot"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".md"), table.markdown())
    atomic_write_text(out.with_suffix(".csv"), to_csv(*table.rows()))
    atomic_write_text(out.with_suffix(".json"), json.dumps(table.values, indent=2))
    print(table.markdown())
    print(f"wrote {out.with_suffix('.md')}, .csv and .json")
    return 0
