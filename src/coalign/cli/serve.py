"""`coalign serve CHECKPOINT INDEX`: the search API and web page over an embedded, indexed folder;
`coalign serve-front --backend URL ...`: the same API over several workers that each serve some parts."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

TOKEN_ENV = "COALIGN_TOKEN"
BACKEND_TOKEN_ENV = "COALIGN_BACKEND_TOKEN"


def _add_listen(p) -> None:
    """The options a worker and a front share: where to listen, the token, the request limits."""
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
    p.add_argument("--max-k", type=int, help="most results one search may ask for (default: 100)")
    p.add_argument("--max-body-mb", type=float, help="largest request body in MB (default: 5)")


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
    _add_listen(p)
    p.add_argument("--device", default="cpu", help="torch device for encoding queries (default: cpu)")
    p.add_argument(
        "--shards",
        type=int,
        nargs="+",
        metavar="PART",
        help="of an index built with --shards: serve only these parts (a worker behind `serve-front`)",
    )
    p.add_argument(
        "--onnx",
        type=Path,
        metavar="DIR",
        help="encode queries with onnxruntime, from the towers `coalign export onnx CHECKPOINT DIR` wrote",
    )
    p.set_defaults(func=cmd_serve)

    f = sub.add_parser(
        "serve-front",
        help="serve one search API over several `coalign serve --shards` workers",
        description="Fan every search out to the workers in parallel and merge their top-k by score: "
        "the API and page of one server over a sharded index whose parts live on several workers.",
    )
    f.add_argument(
        "--backend",
        action="append",
        required=True,
        metavar="URL",
        help="a worker, e.g. http://10.0.0.2:8001 (repeat: together they must serve every part once)",
    )
    _add_listen(f)
    f.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for a worker's answer")
    f.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the workers at start")
    f.add_argument(
        "--backend-token",
        default=None,
        help=f"the workers' token, if they have one (default: ${BACKEND_TOKEN_ENV})",
    )
    f.set_defaults(func=cmd_front)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _limits(args):
    import dataclasses

    from coalign.registry import ConfigError
    from coalign.serve.app import Limits

    limits = Limits()
    try:
        if args.max_k is not None:
            limits = dataclasses.replace(limits, max_k=args.max_k)
        if args.max_body_mb is not None:
            limits = dataclasses.replace(limits, max_body_bytes=int(args.max_body_mb * 1024 * 1024))
    except ValueError as err:
        raise ConfigError(f"{err} (from --max-k / --max-body-mb)") from None
    return limits


def _run(app, args, token: str | None, what: str) -> int:
    import uvicorn

    if token is None and not _is_loopback(args.host):
        print(
            f"warning: serving on {args.host} without a token: anyone who can reach it can query the index "
            f"(set ${TOKEN_ENV} or --token)",
            file=sys.stderr,
        )
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {what} at http://{shown}:{args.port}/", flush=True)
    if token:
        print(f"token required: open http://{shown}:{args.port}/?token=<token> or enter it on the page")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from coalign.search.query import SearchIndex
    from coalign.serve.app import create_app

    token = args.token or os.environ.get(TOKEN_ENV) or None
    limits = _limits(args)
    extra = {} if args.onnx is None else {"onnx": args.onnx}
    index = SearchIndex.load(
        args.index, checkpoint=args.checkpoint, device=args.device, shards=args.shards, **extra
    )
    if "text" in index.modalities:  # load the model now: a bad checkpoint fails here, not on a query
        index.encode_text(["warm up"])
    app = create_app(index, token=token, limits=limits)
    shards = index.shard_info() if hasattr(index, "shard_info") else None
    parts = "" if shards is None else f", parts {shards['served']} of {shards['total']}"
    return _run(app, args, token, f"{len(index)} items ({', '.join(index.modalities)}{parts})")


def cmd_front(args: argparse.Namespace) -> int:
    from coalign.serve.front import Backends, create_front

    token = args.token or os.environ.get(TOKEN_ENV) or None
    limits = _limits(args)
    backend_token = args.backend_token or os.environ.get(BACKEND_TOKEN_ENV) or None
    backends = Backends(args.backend, timeout=args.timeout, token=backend_token)
    info = backends.connect(args.wait)
    app = create_front(backends, token=token, limits=limits)
    return _run(app, args, token, f"{info['items']} items from {len(backends.urls)} workers")
