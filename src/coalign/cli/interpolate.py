"""`coalign interpolate A B --alpha 0.5 OUT` writes the WiSE-FT interpolation of two runs as a run
folder; `coalign interpolate A B --sweep 0 0.25 0.5 0.75 1` evaluates several alphas into one table."""

from __future__ import annotations

import math
from pathlib import Path

from coalign.registry import ConfigError


def add_interpolate(sub) -> None:
    p = sub.add_parser(
        "interpolate",
        help="weight-space interpolation of two runs (WiSE-FT): one run folder, or a sweep of alphas",
        description="The weights (1 - alpha) * A + alpha * B of two runs of one architecture (alpha 0: A, "
        "1: B; usually A the starting model, B fine-tuned from it). With --alpha, write them as run folder "
        "OUT (B's recipe and tokenizer); with --sweep, evaluate each alpha on B's evaluation sets (or a "
        "suite's) and print one comparison table.",
    )
    p.add_argument("a", type=Path, help="run or checkpoint folder A (alpha 0)")
    p.add_argument("b", type=Path, help="run or checkpoint folder B (alpha 1)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--alpha",
        nargs=2,
        metavar=("ALPHA", "OUT"),
        help="one alpha in [0, 1]: write run folder OUT (new or empty)",
    )
    mode.add_argument("--sweep", type=float, nargs="+", metavar="ALPHA", help="alphas to evaluate")
    p.add_argument("--suite", type=Path, help="with --sweep: evaluate on this suite's datasets and tasks")
    p.add_argument(
        "--table",
        type=Path,
        help="with --sweep: writes TABLE.md, TABLE.csv and TABLE.json (default: B/eval/interpolate)",
    )
    p.add_argument("--max-samples", type=int, help="evaluate at most this many samples per set")
    p.add_argument("--batch-size", type=int, default=256)
    p.set_defaults(func=cmd_interpolate)


def cmd_interpolate(args) -> int:
    from coalign.interpolate import Pair, check_alphas
    from coalign.train.session import check_run_dir

    if args.alpha is not None:
        try:
            alpha, out = float(args.alpha[0]), Path(args.alpha[1])
        except ValueError:
            raise ConfigError(
                f"--alpha ALPHA OUT: ALPHA must be a number in [0, 1], got {args.alpha[0]!r}"
            ) from None
        alphas = [alpha]
    else:
        alphas = args.sweep
    if any(not math.isfinite(a) for a in alphas):
        raise ConfigError(f"alpha must be a number in [0, 1], got {alphas}")
    check_alphas(alphas)
    if args.alpha is not None:
        check_run_dir(out, resume=False)  # a new or empty folder; never someone else's files
        written = Pair(args.a, args.b).write(alpha, out)
        print(
            f"wrote {written}: (1 - {alpha:g}) * {args.a} + {alpha:g} * {args.b}; evaluate it with "
            f"`coalign eval {written}`"
        )
        return 0
    return sweep(args, Pair(args.a, args.b), alphas)


def sweep(args, pair, alphas: list[float]) -> int:
    import json

    from coalign.build import build_source
    from coalign.evaluate.results import comparison, scores_of, to_csv, to_markdown
    from coalign.evaluate.run import evaluate
    from coalign.io import atomic_write_text
    from coalign.runtime import Runtime

    recipe = pair.b.recipe
    if args.suite is not None:
        from coalign.evaluate.suites import load_suite

        suite = load_suite(args.suite)
        sets = {name: d.source for name, d in suite.datasets.items()}
        trains = {name: d.train for name, d in suite.datasets.items() if d.train is not None}
        evaluators, max_samples = suite.tasks, args.max_samples or suite.max_samples
    else:
        sets, trains = dict(recipe.data.eval), {}
        evaluators, max_samples = recipe.eval.evaluators, args.max_samples or recipe.eval.max_samples
    if not sets:
        raise ConfigError("B's recipe has no data.eval sets to evaluate on; name a suite with --suite")
    sources = {k: build_source(s, f"eval.{k}") for k, s in sets.items()}
    train_sources = {k: build_source(s, f"eval.{k}.train") for k, s in trains.items()} or None
    runtime = Runtime.create()
    scores, per_alpha = [], {}
    for alpha in alphas:
        run = pair.run(alpha)
        run.model.to(runtime.device)
        results = evaluate(
            run.model,
            run.transforms,
            sources,
            evaluators,
            runtime,
            args.batch_size,
            max_samples,
            progress=True,
            train_sources=train_sources,
        ).about(f"alpha={alpha:g}", "", run.step, "interpolate")
        scores += scores_of(results)
        per_alpha[f"{alpha:g}"] = results.to_json()
    header, rows = comparison(scores)
    markdown = to_markdown(header, rows)
    table = args.table or pair.b.run_dir / "eval" / "interpolate"
    table.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(table.with_suffix(".md"), markdown)
    atomic_write_text(table.with_suffix(".csv"), to_csv(header, rows))
    about = {"a": str(pair.a.checkpoint), "b": str(pair.b.checkpoint), "results": per_alpha}
    atomic_write_text(table.with_suffix(".json"), json.dumps(about, indent=2))
    print(markdown)
    print(f"wrote {table.with_suffix('.md')}, .csv and .json")
    return 0
