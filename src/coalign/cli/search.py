"""`coalign embed | index | search`: embed a source into shards, index them, query the index."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from coalign.registry import ConfigError


def add_embed(sub) -> None:
    p = sub.add_parser(
        "embed",
        help="embed a source with a trained run (resumable)",
        description="Embed every sample of SOURCE with the run at CHECKPOINT into OUT: float16 shards, "
        "metadata and thumbnails. Run the same command again to resume an interrupted run.",
    )
    p.add_argument("checkpoint", type=Path, help="run folder or checkpoint folder")
    p.add_argument(
        "source",
        help="an evaluation set of the run's recipe (e.g. heldout_samples), a .csv/.tsv/.jsonl manifest, "
        'or an inline mapping such as "{source: world, split: test, size: 1000}"',
    )
    p.add_argument("out", type=Path, help="output folder (created; reused to resume)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=10_000, help="source samples per shard (unit of resume)")
    p.add_argument("--image-key", help="image column / field of a csv or jsonl manifest")
    p.add_argument("--caption-key", help="caption column / field of a csv or jsonl manifest")
    p.add_argument("--workers", type=int, default=0, help="data loading processes (decoding images)")
    p.add_argument("--thumbnail-size", type=int, default=64, help="thumbnail side in pixels (0: none)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--nproc", type=int, default=1, metavar="N", help="embed with N processes on this machine (torchrun)"
    )
    p.set_defaults(func=cmd_embed)


def cmd_embed(args) -> int:
    from coalign.search.embed import embed_source
    from coalign.train.distributed import init_from_env, launch, shutdown

    if args.nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {args.nproc}")
    if args.nproc > 1:
        return launch(args.nproc, _embed_argv(args))
    d = init_from_env()
    summary = embed_source(
        args.checkpoint,
        args.source,
        args.out,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        progress=not args.no_progress,
        image_key=args.image_key,
        caption_key=args.caption_key,
        device=args.device or (str(d.device()) if d.active else None),
        num_workers=args.workers,
        thumbnail_size=args.thumbnail_size,
        rank=d.rank,
        world=d.world,
    )
    shutdown(d)
    if not d.main:
        return 0
    print(
        f"embedded {summary['rows']} items ({', '.join(summary['modalities'])}) into {summary['out']} "
        f"in {summary['seconds']:.1f} s; shards: {summary['computed_shards']} computed, "
        f"{summary['reused_shards']} reused from an earlier run"
    )
    print(summary["skip_report"])
    print(f"build a search index with: coalign index {summary['out']}")
    return 0


def _embed_argv(args) -> list[str]:
    """The same `embed` command for each process that torchrun starts (without --nproc)."""
    argv = ["embed", str(args.checkpoint), args.source, str(args.out)]
    argv += ["--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size)]
    argv += ["--workers", str(args.workers), "--thumbnail-size", str(args.thumbnail_size)]
    for flag, value in (("--image-key", args.image_key), ("--caption-key", args.caption_key)):
        argv += [flag, value] if value is not None else []
    argv += ["--device", args.device] if args.device else []
    return argv + (["--no-progress"] if args.no_progress else [])


def add_index(sub) -> None:
    p = sub.add_parser(
        "index",
        help="build FAISS indexes over embeddings",
        description="Build one FAISS index per embedded modality of OUT (Flat, HNSW32 or IVF-PQ, chosen by "
        "size and memory budget) and report its recall@10 against exact search. With --recall, build every "
        "candidate that fits the budgets, tune its search parameters on held-out rows and keep the fastest "
        "that reaches the target.",
    )
    p.add_argument("out", type=Path, help="the folder `coalign embed` wrote")
    p.add_argument("--max-memory", type=float, metavar="MB", help="memory budget of each index in MB")
    p.add_argument(
        "--factory", help="a FAISS index_factory string (e.g. 'IVF1024,PQ32'), instead of the rule"
    )
    p.add_argument("--sample-queries", type=int, default=1000, help="stored vectors used to measure recall")
    p.add_argument(
        "--recall", type=float, metavar="R", help="target recall@10 in (0, 1], e.g. 0.95: tune to it"
    )
    p.add_argument(
        "--max-build-seconds",
        type=float,
        metavar="S",
        help="with --recall: skip candidates that build slower",
    )
    p.add_argument(
        "--candidates", nargs="+", metavar="KIND", help="with --recall: the index kinds to try (default: all)"
    )
    p.add_argument(
        "--add", action="store_true", help="append the rows embedded since the last build, without a rebuild"
    )
    p.add_argument(
        "--mmap", action="store_true", help="search and serve memory-map the index instead of loading it"
    )
    p.add_argument(
        "--shards", type=int, metavar="N", help="N indexes over contiguous row ranges, searched in parallel"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_index)


def cmd_index(args) -> int:
    from coalign.search.index import add_to_index, build_index

    if args.add:
        given = [
            f
            for f in ("recall", "factory", "max_memory", "max_build_seconds", "candidates")
            if getattr(args, f)
        ]
        if given:
            raise ConfigError(f"--add keeps the index as built: drop --{given[0].replace('_', '-')}")
        for modality, r in add_to_index(args.out, progress=not args.no_progress)["modalities"].items():
            print(f"{modality:>8}: added {r['additions'][-1]['rows']} rows, now {r['n']}")
        return 0
    if args.recall is None and (args.max_build_seconds is not None or args.candidates):
        raise ConfigError("--max-build-seconds and --candidates tune to a target: give --recall too")
    report = build_index(
        args.out,
        args.max_memory,
        args.factory,
        args.sample_queries,
        target_recall=args.recall,
        max_build_seconds=args.max_build_seconds,
        kinds=tuple(args.candidates) if args.candidates else None,
        progress=not args.no_progress,
        mmap=args.mmap,
        shards=args.shards,
    )
    for modality, r in report["modalities"].items():
        if "candidates" in r:
            from coalign.search.tune import table_lines

            print(
                f"{modality}: {r['n']} vectors, target recall@10 {r['target_recall']:g}, "
                f"{r['held_out_queries']} held-out queries"
            )
            print("\n".join(table_lines(r)))
        recall = next((v for k, v in r.items() if k.startswith("recall@")), None)
        print(
            f"{modality:>8}: {r['factory']:<18} n={r['n']:<9} build {r['build_seconds']:.1f} s  "
            f"{r['file_mb']:.1f} MB  recall@10 {recall:.3f}  {r['search_params']}"
        )
    print(f"report: {Path(args.out) / 'index' / 'report.json'}")
    return 0


def add_search(sub) -> None:
    p = sub.add_parser(
        "search",
        help="search an index by text or image",
        description="Print the k stored items nearest to a text or an image query.",
    )
    p.add_argument(
        "index", type=Path, help="the folder `coalign embed` wrote (with or without `coalign index`)"
    )
    p.add_argument("--text", help="a text query")
    p.add_argument("--image", type=Path, help="an image file as the query (with --text: both, combined)")
    p.add_argument(
        "--weights",
        type=float,
        nargs=2,
        default=(0.5, 0.5),
        metavar=("TEXT", "IMAGE"),
        help="with --text and --image: their weights in the combined query (default 0.5 0.5)",
    )
    p.add_argument(
        "--combine",
        choices=["sum", "product"],
        default="sum",
        help="with --text and --image: weighted sum, or product (Symile: retrieval given the rest)",
    )
    p.add_argument(
        "--filter", help='only items whose labels match, as JSON: \'{"shape": 2, "color": [0, 3]}\''
    )
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--modality", default="image", help="which stored embeddings to search (default: image)")
    p.add_argument(
        "--checkpoint", type=Path, help="encode the query with this run (default: the embedding's)"
    )
    p.add_argument("--json", action="store_true", help="print the hits as JSON lines")
    p.add_argument(
        "--mmap", action="store_true", default=None, help="memory-map the index (default: as indexed)"
    )
    p.add_argument(
        "--shards", type=int, nargs="+", metavar="PART", help="search only these parts of a sharded index"
    )
    p.add_argument(
        "--rerank",
        type=int,
        metavar="K",
        help="re-rank the top K hits by the run's image-text matching head (a fusion run, e.g. albef)",
    )
    p.set_defaults(func=cmd_search)


def cmd_search(args) -> int:
    from dataclasses import asdict

    from coalign.data.sources.base import SampleError
    from coalign.search.filters import parse_filter
    from coalign.search.query import SearchIndex

    if args.k <= 0:
        raise ConfigError(f"--k must be positive, got {args.k}")
    if args.text is None and args.image is None:
        raise ConfigError("give a query: --text, --image, or both")
    flt = None
    if args.filter is not None:
        try:
            flt = parse_filter(json.loads(args.filter))
        except (json.JSONDecodeError, ConfigError) as err:
            raise ConfigError(f"--filter '{args.filter}': {err}") from None
    index = SearchIndex.load(args.index, args.checkpoint, mmap=args.mmap, shards=args.shards)
    if args.rerank is not None:
        from coalign.search.rerank import check_rerank, rerank_hits

        check_rerank(index, args.rerank, args.modality, args.text is not None)
    try:
        if args.text is not None and args.image is not None:
            vectors = index.encode_query(args.text, args.image, tuple(args.weights), args.combine)
        elif args.text is not None:
            vectors = index.encode_text([args.text])
        else:
            vectors = index.encode_image([args.image])
    except SampleError as err:
        what = "--text" if args.image is None else f"--image '{args.image}'"
        raise ConfigError(f"{what}: cannot use this query ({err})") from None
    hits = index.search(vectors, max(args.k, args.rerank or 0), args.modality, filter=flt)[0]
    if args.rerank is not None:
        hits = rerank_hits(index, args.text, hits, args.rerank, args.modality)[: args.k]
    if args.json:
        for hit in hits:
            print(json.dumps(asdict(hit)))
        return 0
    print(format_hits(hits))
    return 0


def format_hits(hits) -> str:
    width = max([len(h.id) for h in hits] + [2])
    lines = [f"{'rank':>4}  {'id':<{width}}  {'score':>7}  caption / path"]
    for rank, h in enumerate(hits, start=1):
        lines.append(f"{rank:>4}  {h.id:<{width}}  {h.score:7.4f}  {h.caption or h.path or ''}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """A parser with only these three subcommands (tests; `coalign.cli` registers them with the rest)."""
    parser = argparse.ArgumentParser(prog="coalign")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_embed, add_index, add_search):
        add(sub)
    return parser
