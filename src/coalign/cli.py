"""coalign command line: train | eval | compare | fewshot | report | list | demo | embed | index | search
| serve.

Each subcommand parses its own arguments (the search and serve subsystems keep theirs beside their code).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from coalign.evaluate.commands import add_compare, add_fewshot
from coalign.evaluate.report_command import add_report
from coalign.registry import ConfigError
from coalign.search.commands import add_embed, add_index, add_search
from coalign.serve.commands import add_serve


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="train a recipe", description="Train a recipe (a YAML path or a built-in name)."
    )
    p.add_argument("recipe", nargs="?", help="recipe YAML or built-in recipe name (omit with --resume)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 model.embed_dim=64")
    p.add_argument("--smoke", action="store_true", help="shrink the recipe to run in under a minute on CPU")
    p.add_argument("--out", type=Path, help="run folder (default: runs/<name>-<time>)")
    p.add_argument(
        "--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from coalign.config import load_recipe
    from coalign.train.loop import train

    if args.resume:
        result = train(None, args.resume, resume=True, progress=not args.no_progress)
    else:
        if not args.recipe:
            raise ConfigError("coalign train needs a recipe (or --resume RUN_DIR)")
        recipe = load_recipe(args.recipe, args.overrides, smoke=args.smoke)
        out = args.out or Path("runs") / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        result = train(recipe, out, progress=not args.no_progress)
    print(f"run folder: {result.run_dir}")
    return 0


def _add_eval(sub) -> None:
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
    from coalign.evaluate.commands import load_for_eval, run_suite_command
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


def _add_list(sub) -> None:
    p = sub.add_parser("list", help="list registered sources, transforms, encoders, objectives, evaluators")
    p.set_defaults(func=cmd_list)


def cmd_list(args) -> int:
    from coalign.config import recipes_dir
    from coalign.registry import ALL

    for kind, registry in ALL.items():
        print(f"{kind}: {', '.join(registry.names())}")
    print(f"recipes: {', '.join(sorted(p.stem for p in recipes_dir().glob('*.yaml')))}")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="train the demo recipe on the built-in world and evaluate it")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--smoke", action="store_true")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    import shutil

    from coalign.config import load_recipe
    from coalign.train.loop import DEMO_MARKER, train

    recipe = load_recipe("demo", args.overrides, smoke=args.smoke)
    out: Path = args.out
    # The demo starts fresh, but it deletes only a folder that an earlier `coalign demo` made (it
    # carries the marker); anything else is the user's, and is refused before any work.
    if out.exists() and not (out / DEMO_MARKER).is_file():
        if not out.is_dir() or any(out.iterdir()):
            raise FileExistsError(
                f"'{out}' exists and was not made by `coalign demo`; it is left as it is "
                "(choose another --out, or remove it yourself)"
            )
    elif out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("made by `coalign demo`, which replaces this folder when run again\n")
    result = train(recipe, out)
    print(f"\ntrained {result.step} steps in {result.seconds:.0f} s; run folder: {result.run_dir}")
    print(f"evaluate again with: coalign eval {result.run_dir}")
    return 0


def _log_to_stderr() -> None:
    """The library's warnings (a damaged checkpoint passed over, ...) as `coalign: warning: ...` lines."""
    import logging

    log = logging.getLogger("coalign")
    if not any(getattr(h, "_coalign", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("coalign: %(levelname)s: %(message)s"))
        handler._coalign = True  # type: ignore[attr-defined]
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="coalign", description="One embedding space for many modalities.")
    sub = parser.add_subparsers(dest="command", required=True)
    builders = [_add_train, _add_eval, add_compare, add_fewshot, add_report, _add_list, _add_demo]
    for add in (*builders, add_embed, add_index, add_search, add_serve):
        add(sub)
    args = parser.parse_args(argv)
    _log_to_stderr()
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as err:
        # Bad input (a recipe, a path, too few samples for k shots) is a message, not a traceback;
        # COALIGN_DEBUG=1 shows the traceback.
        if os.environ.get("COALIGN_DEBUG"):
            raise
        print(f"coalign {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
