"""`coalign data pack | stat`: write any source as WebDataset tar shards; describe shards."""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from coalign.registry import SOURCES


def add_data(sub) -> None:
    p = sub.add_parser("data", help="pack a source into WebDataset shards; describe shards")
    data = p.add_subparsers(dest="data_command", required=True)

    pack = data.add_parser(
        "pack",
        help="write a source as WebDataset tar shards with a manifest",
        description="Write every usable sample of SOURCE into OUT/000000.tar, 000001.tar, ... and "
        "OUT/manifest.json. Samples that do not decode (a corrupt image, a missing file, no caption) "
        "are skipped and counted, not packed.",
    )
    pack.add_argument(
        "source",
        help="a .csv/.tsv/.jsonl manifest, a folder of images (image_folder), or an inline mapping "
        'such as "{source: world, split: train, size: 1000}"',
    )
    pack.add_argument("out", type=Path, help="new or empty folder for the shards")
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


def source_spec(source: str, image_key: str | None, caption_key: str | None) -> dict:
    """SOURCE as `embed` reads it (manifest or inline mapping), plus a folder of images."""
    from coalign.search.embed import resolve_source_spec

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
