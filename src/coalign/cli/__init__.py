"""coalign command line: train | demo | list | eval | compare | fewshot | report | embed | index |
search | serve | data | interpolate | caption.

The argument parsing of every subcommand lives in this package, one module per subsystem; the
library packages (`models`, `objectives`, `data`, `evaluate`, `search`, `serve`) hold no argparse code.
Each module's `add_*` builds its subparser and sets `func`, which does the work.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from coalign.cli.caption import add_caption
from coalign.cli.convert import add_export, add_import
from coalign.cli.data import add_data
from coalign.cli.evaluate import add_compare, add_eval, add_fewshot
from coalign.cli.interpolate import add_interpolate
from coalign.cli.report import add_report
from coalign.cli.search import add_embed, add_index, add_search
from coalign.cli.serve import add_serve
from coalign.cli.train import add_demo, add_list, add_train
from coalign.registry import ConfigError

BUILDERS = (
    add_train,
    add_eval,
    add_compare,
    add_fewshot,
    add_report,
    add_list,
    add_demo,
    add_embed,
    add_index,
    add_search,
    add_serve,
    add_data,
    add_import,
    add_export,
    add_interpolate,
    add_caption,
)
OVERRIDE = re.compile(r"^[A-Za-z_][\w.@-]*=")  # a dotted override `a.b.c=value`


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coalign", description="One embedding space for many modalities.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in BUILDERS:
        add(sub)
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse, letting `train` and `demo` take dotted overrides before or after their flags
    (`coalign train demo --smoke train.steps=5` as well as `... train.steps=5 --smoke`)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "takes_overrides", False):
        unknown = [a for a in extra if not OVERRIDE.match(a)]
        if not unknown:
            args.overrides = [*args.overrides, *extra]
            extra = []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _log_to_stderr() -> None:
    """The library's warnings (a damaged checkpoint passed over, ...) as `coalign: warning: ...` lines."""
    log = logging.getLogger("coalign")
    if not any(getattr(h, "_coalign", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("coalign: %(levelname)s: %(message)s"))
        handler._coalign = True  # type: ignore[attr-defined]
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    _log_to_stderr()
    try:
        return args.func(args)
    except (
        ConfigError,
        FileNotFoundError,
        FileExistsError,
        IsADirectoryError,
        NotADirectoryError,
        PermissionError,
        ValueError,
    ) as err:
        # Bad input (a recipe, a path, a folder one may not write, too few samples for k shots) is a
        # message, not a traceback; COALIGN_DEBUG=1 shows the traceback.
        if os.environ.get("COALIGN_DEBUG"):
            raise
        print(f"coalign {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `coalign list | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
