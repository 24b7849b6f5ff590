"""`coalign train | demo | list`: training a recipe, the demo, and what the registries hold."""

from __future__ import annotations

import time
from pathlib import Path

from coalign.registry import ConfigError


def add_train(sub) -> None:
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
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="train with N processes on this machine (runs torchrun; data.batch_size is the global batch)",
    )
    p.set_defaults(func=cmd_train, takes_overrides=True)


def cmd_train(args) -> int:
    import os

    from coalign.config import load_recipe
    from coalign.train.distributed import launch, shutdown
    from coalign.train.loop import train

    if args.nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {args.nproc}")
    recipe = None
    if not args.resume:
        if not args.recipe:
            raise ConfigError("coalign train needs a recipe (or --resume RUN_DIR)")
        recipe = load_recipe(args.recipe, args.overrides, smoke=args.smoke)  # errors before any launch
        if args.out is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("under torchrun, name the run folder with --out (every rank must agree on it)")
        args.out = args.out or Path("runs") / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.nproc > 1:
        return launch(args.nproc, _argv(args))
    if args.resume:
        result = train(None, args.resume, resume=True, progress=not args.no_progress)
    else:
        result = train(recipe, args.out, progress=not args.no_progress)
    shutdown()  # the group torchrun's ranks trained in (train() keeps it for callers that own it)
    if result.step and int(os.environ.get("RANK", "0")) == 0:
        print(f"run folder: {result.run_dir}")
    return 0


def _argv(args) -> list[str]:
    """The same `train` command for each process that torchrun starts (without --nproc)."""
    if args.resume:
        argv = ["train", "--resume", str(args.resume)]
    else:
        argv = ["train", args.recipe, *args.overrides, "--out", str(args.out)]
        argv += ["--smoke"] if args.smoke else []
    return argv + (["--no-progress"] if args.no_progress else [])


def add_list(sub) -> None:
    p = sub.add_parser("list", help="list registered sources, transforms, encoders, objectives, evaluators")
    p.set_defaults(func=cmd_list)


def cmd_list(args) -> int:
    from coalign.config import recipes_dir
    from coalign.registry import ALL

    for kind, registry in ALL.items():
        print(f"{kind}: {', '.join(registry.names())}")
    print(f"recipes: {', '.join(sorted(p.stem for p in recipes_dir().glob('*.yaml')))}")
    return 0


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="train the demo recipe on the built-in world and evaluate it")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--smoke", action="store_true")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_demo, takes_overrides=True)


def cmd_demo(args) -> int:
    import shutil

    from coalign.config import load_recipe
    from coalign.train.loop import train
    from coalign.train.session import DEMO_MARKER

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
