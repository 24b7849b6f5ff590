"""`coalign eval | compare | fewshot`: evaluate a run (its recipe's sets, or a suite), pivot result
files into a comparison table, and the few-shot sweep."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from coalign.registry import ConfigError
from coalign.runtime import Runtime

if TYPE_CHECKING:
    from coalign.build import LoadedRun

DEFAULT_SHOTS = [1, 2, 4, 8, 16]


def load_for_eval(run_path: Path) -> tuple[LoadedRun, Runtime]:
    """A run loaded onto the runtime evaluation uses: CUDA when there is one, `auto` precision."""
    from coalign.build import load_run

    runtime = Runtime.create()
    return load_run(run_path, runtime), runtime


def add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a run or checkpoint",
        description="Zero-shot classification and "
        "retrieval on the recipe's evaluation sets (or those named by overrides).",
    )
    p.add_argument("run", type=Path, help="run folder or checkpoint folder")
    p.add_argument("--out", type=Path, help="results JSON (default: RUN/eval/step_N.json)")
    p.add_argument("--max-samples", type=int, help="evaluate at most this many samples per set")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--suite",
        type=Path,
        help="suite YAML: several evaluators over several datasets, one CLIP_benchmark result file each "
        "(written to --out, a folder; default RUN/eval/<suite>-step_N)",
    )
    p.add_argument("--model", help="model name in the result files (default: the recipe's name)")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from coalign.build import build_source
    from coalign.evaluate.results import format_table, step_results_path, write_results
    from coalign.evaluate.run import evaluate

    if args.suite:
        return run_suite_command(args.run, args.suite, args.out, args.model)
    run, runtime = load_for_eval(args.run)
    sources = {k: build_source(s, f"data.eval.{k}") for k, s in run.recipe.data.eval.items()}
    if not sources:
        raise ConfigError("the recipe has no data.eval sets to evaluate on")
    max_samples = args.max_samples or run.recipe.eval.max_samples
    results = evaluate(
        run.model,
        run.transforms,
        sources,
        run.recipe.eval.evaluators,
        runtime,
        args.batch_size,
        max_samples,
        progress=True,
    ).about(args.model or run.recipe.name, run.checkpoint, run.step, "eval")
    out = write_results(args.out or step_results_path(run.run_dir, run.step), results)
    print(format_table(results))
    print(f"results: {out}")
    return 0


def run_suite_command(run_path: Path, suite_path: Path, out: Path | None, model: str | None) -> int:
    """`coalign eval RUN --suite SUITE.yaml`: OUT/results.json and OUT/clip_benchmark/*.json (default OUT:
    RUN/eval/<suite>-step_N)."""
    from coalign.evaluate.results import comparison, scores_of, to_markdown
    from coalign.evaluate.suites import BENCHMARK_FOLDER, RESULTS_FILE, load_suite, run_suite

    suite = load_suite(suite_path)
    run, runtime = load_for_eval(run_path)
    out = out or run.run_dir / "eval" / f"{suite.name}-step_{run.step:08d}"
    results, paths = run_suite(run, suite, out, runtime, model)
    header, rows = comparison(scores_of(results))
    print(to_markdown(header, rows))
    print(
        f"results: {out / RESULTS_FILE}; {len(paths)} CLIP_benchmark result files in {out / BENCHMARK_FOLDER}"
    )
    return 0


def add_compare(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="build a comparison table (CSV and Markdown) from result files",
        description="Read results files (coalign's results.json and CLIP_benchmark-layout files; files or "
        "folders of *.json, from `coalign eval`, `coalign eval --suite` or CLIP_benchmark itself) and pivot "
        "them: one row per dataset, task and metric, one column per model.",
    )
    p.add_argument("results", type=Path, nargs="+", help="result files or folders")
    p.add_argument("--out", type=Path, default=Path("comparison"), help="writes OUT.csv and OUT.md")
    p.add_argument(
        "--metrics",
        help="regular expression over metric names (default: each evaluator's headline metrics)",
    )
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    from coalign.evaluate.results import comparison, load_scores, to_csv, to_markdown
    from coalign.io import atomic_write_text

    header, rows = comparison(load_scores(args.results), args.metrics)
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
    from coalign.evaluate.fewshot import fewshot_table
    from coalign.evaluate.results import to_csv
    from coalign.evaluate.suites import load_suite
    from coalign.io import atomic_write_text

    if any(k < 1 for k in args.shots):
        raise ConfigError(f"--shots must be positive integers, got {args.shots}")
    suite = load_suite(args.suite)
    run, runtime = load_for_eval(args.run)
    table = fewshot_table(run, suite, sorted(set(args.shots)), runtime, seeds=args.seeds)
    out = args.out or run.run_dir / "eval" / "fewshot"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".md"), table.markdown())
    atomic_write_text(out.with_suffix(".csv"), to_csv(*table.rows()))
    atomic_write_text(out.with_suffix(".json"), json.dumps(table.values, indent=2))
    print(table.markdown())
    print(f"wrote {out.with_suffix('.md')}, .csv and .json")
    return 0
