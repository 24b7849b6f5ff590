"""`coalign serve CHECKPOINT INDEX`: the search API and web page over an embedded, indexed folder."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

TOKEN_ENV = "COALIGN_TOKEN"


def add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the search API and web page",
        description="Serve the search API (embed, search, items, health, metrics) and the web page over "
        "a folder written by `coalign embed` (and indexed by `coalign index`).",
    )
    p.add_argument(
        "checkpoint", type=Path, help="run folder or checkpoint folder whose model encodes queries"
    )
    p.add_argument("index", type=Path, help="folder written by `coalign embed` / `coalign index`")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--token",
        default=None,
        help=f"require 'Authorization: Bearer TOKEN' on every data route (default: ${TOKEN_ENV}; "
        "prefer the variable: a command-line token is visible to other users in the process list)",
    )
    p.add_argument("--device", default="cpu", help="torch device for encoding queries (default: cpu)")
    p.add_argument("--max-k", type=int, help="most results one search may ask for (default: 100)")
    p.add_argument("--max-body-mb", type=float, help="largest request body in MB (default: 5)")
    p.set_defaults(func=cmd_serve)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    import dataclasses

    import uvicorn

    from coalign.registry import ConfigError
    from coalign.search.query import SearchIndex
    from coalign.serve.app import Limits, create_app

    token = args.token or os.environ.get(TOKEN_ENV) or None
    limits = Limits()
    try:
        if args.max_k is not None:
            limits = dataclasses.replace(limits, max_k=args.max_k)
        if args.max_body_mb is not None:
            limits = dataclasses.replace(limits, max_body_bytes=int(args.max_body_mb * 1024 * 1024))
    except ValueError as err:
        raise ConfigError(f"{err} (from --max-k / --max-body-mb)") from None
    index = SearchIndex.load(args.index, checkpoint=args.checkpoint, device=args.device)
    if "text" in index.modalities:  # load the model now: a bad checkpoint fails here, not on a query
        index.encode_text(["warm up"])
    app = create_app(index, token=token, limits=limits)
    if token is None and not _is_loopback(args.host):
        print(
            f"warning: serving on {args.host} without a token: anyone who can reach it can query the index "
            f"(set ${TOKEN_ENV} or --token)",
            file=sys.stderr,
        )
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {len(index)} items ({', '.join(index.modalities)}) at http://{shown}:{args.port}/")
    if token:
        print(f"token required: open http://{shown}:{args.port}/?token=<token> or enter it on the page")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
