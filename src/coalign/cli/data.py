"""`coalign data pack | stat | filter`: write any source as WebDataset tar shards; describe shards;
curate a source or shards into new shards."""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from coalign.registry import SOURCES


def add_data(sub) -> None:
    p = sub.add_parser("data", help="pack a source into WebDataset shards; describe shards; filter pairs")
    data = p.add_subparsers(dest="data_command", required=True)

    pack = data.add_parser(
        "pack",
        help="write a source as WebDataset tar shards with a manifest",
        description="Write every usable sample of SOURCE into OUT/000000.tar, 000001.tar, ... and "
        "OUT/manifest.json. Samples that do not decode (a corrupt image, a missing file, no caption) "
        "are skipped and counted, not packed. Run the same command again on an interrupted OUT to "
        "continue it: finished shards are checked and kept, the rest redone.",
    )
    pack.add_argument(
        "source",
        help="a .csv/.tsv/.jsonl manifest, a folder of images (image_folder), or an inline mapping "
        'such as "{source: world, split: train, size: 1000}"',
    )
    pack.add_argument("out", type=Path, help="new or empty folder for the shards (or an interrupted pack's)")
    pack.add_argument("--shard-size", type=int, help="samples per shard (default 10000 unless bytes are set)")
    pack.add_argument(
        "--max-shard-bytes", help="close a shard before it passes this size: 500000, 64K, 256M, 1G"
    )
    pack.add_argument("--image-key", help="image column / field of a csv or jsonl manifest")
    pack.add_argument("--caption-key", help="caption column / field of a csv or jsonl manifest")
    pack.add_argument("--audio-rate", type=int, default=16000, help="sample rate of waveform arrays (Hz)")
    pack.add_argument("--workers", type=int, default=0, help="processes that read and check samples")
    pack.add_argument("--no-progress", action="store_true", help="no progress bar")
    pack.set_defaults(func=cmd_pack)

    stat = data.add_parser(
        "stat",
        help="counts, modality coverage and caption lengths of shards",
        description="Read shards as training would and report samples, unreadable ones by reason, "
        "modality coverage and caption-length statistics.",
    )
    stat.add_argument(
        "path", help="a folder of shards, a .tar, or a brace pattern (shards/{000000..000009}.tar)"
    )
    stat.add_argument("--json", action="store_true", help="print the report as JSON")
    stat.add_argument("--no-progress", action="store_true", help="no progress bar")
    stat.set_defaults(func=cmd_stat)
    add_filter(data)


def add_filter(data) -> None:
    f = data.add_parser(
        "filter",
        help="curate image-text pairs: caption and image rules, duplicates, CLIP-score filtering",
        description="Write the samples of SOURCE that pass every rule as shards in OUT, with "
        "OUT/filter_report.json (counts removed per rule), OUT/removed.jsonl and, when scored, "
        "OUT/scores.png. Rules apply in this order; a sample is counted under the first it fails.",
    )
    f.add_argument(
        "source",
        help="shards (a folder of .tar, a .tar, a brace pattern), a .csv/.tsv/.jsonl manifest, a folder "
        'of images, or an inline mapping such as "{source: world, size: 1000}"',
    )
    f.add_argument("out", type=Path, help="new or empty folder for the filtered shards")
    f.add_argument("--model", type=Path, help="a trained run (or checkpoint) that scores and embeds pairs")
    score = f.add_mutually_exclusive_group()
    score.add_argument(
        "--threshold", type=float, help="remove pairs whose cosine is below this (needs --model)"
    )
    score.add_argument(
        "--keep-fraction", type=float, help="keep the best-scoring fraction of what passes the other rules"
    )
    f.add_argument(
        "--near-duplicates",
        type=float,
        metavar="COSINE",
        help="remove images this similar to a kept one (FAISS)",
    )
    f.add_argument("--keep-exact-duplicates", action="store_true", help="keep images with the same pixels")
    f.add_argument("--min-words", type=int, default=1, help="fewest words in a caption (default 1)")
    f.add_argument("--max-words", type=int, help="most words in a caption")
    f.add_argument("--min-chars", type=int, default=1, help="fewest characters in a caption (default 1)")
    f.add_argument("--max-chars", type=int, help="most characters in a caption")
    f.add_argument(
        "--max-repeat", type=float, help="most of a caption's words that may repeat one before (0-1)"
    )
    f.add_argument(
        "--min-letters", type=float, help="least fraction of a caption's characters that are letters"
    )
    f.add_argument("--script", help="Unicode script the letters must be in: latin, cyrillic, greek, cjk, ...")
    f.add_argument("--script-fraction", type=float, default=0.9, help="of the letters, for --script (0.9)")
    f.add_argument("--max-caption-count", type=int, help="remove a caption carried by more samples than this")
    f.add_argument("--min-image-side", type=int, help="smallest shorter side of an image, pixels")
    f.add_argument("--max-aspect", type=float, help="largest longer / shorter side of an image")
    f.add_argument(
        "--shard-size", type=int, help="samples per output shard (default 10000 unless bytes are set)"
    )
    f.add_argument("--max-shard-bytes", help="close an output shard before it passes this size: 256M, 1G")
    f.add_argument("--batch-size", type=int, default=256, help="pairs embedded at once")
    f.add_argument("--workers", type=int, default=0, help="processes that read, check and transform samples")
    f.add_argument("--device", help="device the model runs on (default: the CPU)")
    f.add_argument("--image-key", help="image column / field of a csv or jsonl manifest")
    f.add_argument("--caption-key", help="caption column / field of a csv or jsonl manifest")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    f.set_defaults(func=cmd_filter)


def is_shards(source: str) -> bool:
    """A folder holding .tar shards, a .tar, a brace pattern of tars, or a shard URL."""
    if source.startswith(("http://", "https://", "pipe:")):
        return True
    path = Path(source).expanduser()
    if path.is_dir():
        return any(path.glob("*.tar"))
    return source.endswith(".tar") or ("{" in source and ".tar" in source)


def source_spec(source: str, image_key: str | None, caption_key: str | None) -> dict:
    """SOURCE as `embed` reads it (manifest or inline mapping), plus shards and a folder of images."""
    from coalign.search.embed import resolve_source_spec

    if is_shards(source):
        path = (
            source
            if "://" in source or source.startswith("pipe:")
            else str(Path(source).expanduser().absolute())
        )
        return {"source": "webdataset", "path": path, "shuffle": False}
    if Path(source).expanduser().is_dir():
        return {"source": "image_folder", "path": str(Path(source).expanduser().absolute())}
    return resolve_source_spec(source, image_key=image_key, caption_key=caption_key)


def cmd_pack(args) -> int:
    from coalign.data.pack import pack, parse_bytes

    spec = source_spec(args.source, args.image_key, args.caption_key)
    source = SOURCES.create(
        spec["source"], where="SOURCE", **{k: v for k, v in spec.items() if k != "source"}
    )
    max_bytes = parse_bytes(args.max_shard_bytes) if args.max_shard_bytes else None
    shard_size = args.shard_size if args.shard_size or max_bytes else 10_000
    manifest = pack(
        source,
        args.out,
        shard_size=shard_size,
        max_shard_bytes=max_bytes,
        workers=args.workers,
        audio_rate=args.audio_rate,
        progress=not args.no_progress,
        spec=spec,
    )
    skipped = manifest["skipped"]["counts"]
    if manifest["resumed_shards"]:
        print(f"resumed after {manifest['resumed_shards']} finished shards (checked against pack_state.json)")
    print(
        f"packed {manifest['samples']} of {manifest['source_samples']} samples into "
        f"{len(manifest['shards'])} shards ({manifest['bytes'] / 2**20:.1f} MiB) in {args.out} "
        f"in {manifest['seconds']:.1f} s"
    )
    print(
        "skipped " + ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in skipped.items())
        if skipped
        else "no samples skipped"
    )
    pattern = f"{args.out}/{{000000..{len(manifest['shards']) - 1:06d}}}.tar"
    print(f"train on them with: data.train='{{source: webdataset, path: \"{pattern}\"}}'")
    return 0


def cmd_stat(args) -> int:
    from coalign.data.pack import stat

    bar = tqdm(desc="reading", unit="sample", disable=args.no_progress, dynamic_ncols=True, leave=False)
    report = stat(args.path, on_sample=lambda: bar.update(1))
    bar.close()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    unreadable = report["unreadable"]["counts"]
    print(f"{report['samples']} samples in {report['shards']} shards ({report['bytes'] / 2**20:.1f} MiB)")
    print(f"readable: {report['readable']}" + (f"; unreadable: {unreadable}" if unreadable else ""))
    if report["skipped_when_packed"]:
        print(f"skipped when packed: {report['skipped_when_packed']}")
    print("modalities:")
    for m, c in report["modalities"].items():
        print(f"  {m:<10} {c['samples']:>9}  {100 * c['fraction']:5.1f}%")
    caps = report["captions"]
    for what in ("words", "chars", "per_sample"):
        if caps[what]:
            row = "  ".join(f"{k} {v}" for k, v in caps[what].items())
            print(f"caption {what.replace('_', ' ')}: {row}")
    if report["labels"]:
        print(f"labels: {', '.join(report['labels'])}")
    return 0


def cmd_filter(args) -> int:
    from coalign.build import load_run
    from coalign.data.filter import filter_source
    from coalign.data.filter_rules import Rules
    from coalign.data.pack import parse_bytes
    from coalign.runtime import Runtime

    rules = Rules(
        min_words=args.min_words,
        max_words=args.max_words,
        min_chars=args.min_chars,
        max_chars=args.max_chars,
        max_repeat=args.max_repeat,
        min_letters=args.min_letters,
        script=args.script,
        script_fraction=args.script_fraction,
        max_caption_count=args.max_caption_count,
        min_image_side=args.min_image_side,
        max_aspect=args.max_aspect,
        exact_duplicates=not args.keep_exact_duplicates,
        near_duplicates=args.near_duplicates,
        threshold=args.threshold,
        keep_fraction=args.keep_fraction,
    )
    rules.check(args.model is not None)  # before the model or the source is opened
    if args.batch_size < 1 or args.workers < 0:
        raise ValueError("--batch-size must be at least 1 and --workers at least 0")
    max_bytes = parse_bytes(args.max_shard_bytes) if args.max_shard_bytes else None
    shard_size = args.shard_size if args.shard_size or max_bytes else 10_000
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise FileExistsError(f"'{args.out}' exists and is not an empty folder; choose a new or empty OUT")
    spec = source_spec(args.source, args.image_key, args.caption_key)
    source = SOURCES.create(
        spec["source"], where="SOURCE", **{k: v for k, v in spec.items() if k != "source"}
    )
    # fp32: a score cut is compared across runs; it should not move with bf16 rounding
    run = load_run(args.model, Runtime.create("fp32", args.device)) if args.model is not None else None
    report = filter_source(
        source,
        args.out,
        rules,
        run,
        batch_size=args.batch_size,
        workers=args.workers,
        shard_size=shard_size,
        max_shard_bytes=max_bytes,
        progress=not args.no_progress,
        spec=spec,
    )
    print(f"kept {report['kept']} of {report['samples']} samples in {args.out} in {report['seconds']:.1f} s")
    for rule, n in report["removed"].items():
        extra = (
            f" ({', '.join(f'{c} {r}' for r, c in report['unreadable'].items())})"
            if rule == "unreadable"
            else ""
        )
        print(f"  removed {n:>8} {rule.replace('_', ' ')}{extra}")
    if "score" in report:
        sc = report["score"]
        parts = [f"cut {sc['cut']:.4f}"] if sc["cut"] is not None else []
        parts += [f"{k.replace('_', ' ')} {sc[k]:.4f}" for k in ("mean", "kept_mean") if sc[k] is not None]
        print(f"scores: {', '.join(parts)}; histogram in {args.out / 'scores.png'}")
    return 0
