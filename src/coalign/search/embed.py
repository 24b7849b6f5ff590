"""`coalign embed`: embed every sample of a source with a trained run, in resumable shards.

Shard s covers the source indices [s * shard_size, (s + 1) * shard_size). Samples that raise
`SampleError` are skipped and counted, so a shard holds at most shard_size rows. Rows are numbered
over the kept samples in source order, which makes the numbering deterministic: a resumed run writes
exactly what an uninterrupted one would. A shard's files are all written (atomically) before the
manifest marks it finished, and a restart recomputes only the shards the manifest does not list.
What one sample becomes (inputs, metadata, thumbnail, or a skip) is coalign.search.samples.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from coalign.build import LoadedRun, build_source, load_run
from coalign.config import Recipe, SourceSpec
from coalign.data.sources.base import SampleError, SkipCounter, Source
from coalign.registry import ConfigError
from coalign.runtime import Runtime
from coalign.search import (
    FORMAT,
    METADATA,
    atomic_save_npy,
    atomic_write_bytes,
    metadata_schema,
    part_path,
    read_manifest,
    shard_path,
    thumbnail_file,
    write_manifest,
    write_parquet,
)
from coalign.search.samples import Prepared, Skip

MANIFEST_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl"}
# What must match for a restart to continue an existing OUT rather than mix two different embeddings.
IDENTITY_KEYS = (
    "checkpoint",
    "source",
    "source_size",
    "modalities",
    "embed_dim",
    "shard_size",
    "thumbnail_size",
)


def resolve_source_spec(
    source: str | dict | SourceSpec,
    recipe: Recipe | None = None,
    image_key: str | None = None,
    caption_key: str | None = None,
) -> dict[str, Any]:
    """SOURCE as given on the command line -> a source spec dict {"source": name, **options}.

    SOURCE is one of the run's recipe evaluation sets (`heldout_samples`), a .csv/.tsv/.jsonl
    manifest path, or an inline YAML mapping ("{source: world, split: test, size: 1000}")."""
    eval_sets = dict(recipe.data.eval) if recipe is not None else {}
    if isinstance(source, SourceSpec):
        spec = {"source": source.source, **source.options()}
    elif isinstance(source, dict):
        spec = dict(source)
    elif source in eval_sets:
        spec = {"source": eval_sets[source].source, **eval_sets[source].options()}
    elif Path(source).suffix.lower() in MANIFEST_SUFFIXES:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ConfigError(f"SOURCE manifest '{path}' does not exist or is not a file")
        spec = {"source": MANIFEST_SUFFIXES[path.suffix.lower()], "path": str(path.absolute())}
    else:
        try:
            parsed = yaml.safe_load(source)
        except yaml.YAMLError:
            parsed = None
        if not isinstance(parsed, dict):
            valid = ", ".join(eval_sets) or "(the run's recipe has none)"
            raise ConfigError(
                f"SOURCE '{source}' is not an evaluation set of the run (valid: {valid}), a .csv/.tsv/.jsonl "
                f'manifest, or an inline mapping like "{{source: world, split: test, size: 1000}}"'
            )
        spec = parsed
    if "source" not in spec:
        raise ConfigError(f"SOURCE mapping {spec} needs a 'source' key naming a registered source")
    for option, key in (("image_key", image_key), ("caption_key", caption_key)):
        if key is None:
            continue
        if spec["source"] not in ("csv", "jsonl"):
            raise ConfigError(
                f"--{option.replace('_', '-')} applies to csv and jsonl sources, not '{spec['source']}'"
            )
        spec[option] = key
    if spec["source"] in ("csv", "jsonl") and "path" in spec:  # absolute, so a resume from elsewhere matches
        spec["path"] = str(Path(spec["path"]).expanduser().absolute())
    return spec


def carried_modalities(run: LoadedRun, source: Source, probe: int = 64) -> list[str]:
    """The model's modalities (with a transform) that the first readable samples of `source` carry."""
    wanted = [m for m in run.model.modalities if m in run.transforms]
    seen: set[str] = set()
    for i in range(min(len(source), probe)):
        try:
            sample = source[i]
        except SampleError:
            continue
        seen |= {m for m in wanted if sample.get(m) is not None}
    found = [m for m in wanted if m in seen]
    if len(source) and not found:
        raise ConfigError(f"the source's samples carry none of the model's modalities ({', '.join(wanted)})")
    return found


def _as_list(batch: list) -> list:
    return batch


class Computed(NamedTuple):
    """One shard embedded, in memory, before its rows are numbered (see `embed_source`)."""

    shard: int
    start: int
    stop: int
    arrays: dict[str, np.ndarray]  # modality -> (rows, dim) float16
    meta: list[dict[str, Any]]  # one per kept sample, in source order, without "row"
    pngs: list[bytes | None]
    skipped: SkipCounter


@torch.no_grad()
def compute_shard(
    run: LoadedRun,
    prepared: Prepared,
    shard: int,
    start: int,
    stop: int,
    batch_size: int,
    num_workers: int,
    bar: tqdm,
    running: SkipCounter,
) -> Computed:
    """Embed source indices [start, stop). `running` accumulates skips over the whole run, for the
    progress bar."""
    device = next(run.model.parameters()).device
    subset = torch.utils.data.Subset(prepared, range(start, stop))
    loader = torch.utils.data.DataLoader(
        subset, batch_size=batch_size, num_workers=num_workers, collate_fn=_as_list
    )
    chunks: dict[str, list[np.ndarray]] = {m: [] for m in prepared.modalities}
    meta: list[dict[str, Any]] = []
    pngs: list[bytes | None] = []
    skipped = SkipCounter()
    for batch in loader:
        kept = [item for item in batch if isinstance(item, dict)]
        here = SkipCounter()
        for item in batch:
            if isinstance(item, Skip):
                here.skip(item.reason, item.index)
        skipped.update(here)
        for m in prepared.modalities if kept else []:
            x = torch.stack([item["inputs"][m] for item in kept]).to(device)
            chunks[m].append(run.model.encode(m, x).float().cpu().numpy().astype(np.float16))
        meta += [item["meta"] for item in kept]
        pngs += [item["png"] for item in kept]
        running.update(here)
        bar.update(len(batch))
        bar.set_postfix(skipped=sum(running.values()), refresh=False)
    dim = run.model.embed_dim
    arrays = {m: np.concatenate(c) if c else np.zeros((0, dim), np.float16) for m, c in chunks.items()}
    return Computed(shard, start, stop, arrays, meta, pngs, skipped)


def write_shard(out: Path, done: Computed, row0: int) -> dict[str, Any]:
    """Write a computed shard whose first row is `row0`; return its manifest entry."""
    for i, png in enumerate(done.pngs):
        if png is not None:
            # No fsync per thumbnail (about 2 ms each): one os.sync below covers the whole shard.
            atomic_write_bytes(thumbnail_file(out, row0 + i), png, fsync=False)
    for m, arr in done.arrays.items():
        atomic_save_npy(shard_path(out, m, done.shard), arr)
    schema = metadata_schema()
    rows = [{"row": row0 + i, **m} for i, m in enumerate(done.meta)]
    write_parquet(
        part_path(out, done.shard), pa.table({c: [r[c] for r in rows] for c in schema.names}, schema=schema)
    )
    os.sync()  # the thumbnails reach the disk before the manifest says this shard is done
    record = done.skipped.record()
    return dict(
        shard=done.shard,
        start=done.start,
        stop=done.stop,
        row_offset=row0,
        rows=len(rows),
        skipped=record["counts"],
        skipped_rows=record["rows"],
    )


def _all(value: Any, world: int) -> list[Any]:
    """Every rank's `value`, in rank order (one process: [value])."""
    if world == 1:
        return [value]
    values: list[Any] = [None] * world
    dist.all_gather_object(values, value)
    return values


def shard_done(out: Path, entry: dict[str, Any], modalities: list[str]) -> bool:
    """A manifest entry whose files are all present (a deleted file means: recompute that shard)."""
    files = [shard_path(out, m, entry["shard"]) for m in modalities] + [part_path(out, entry["shard"])]
    return all(f.is_file() for f in files)


def open_manifest(out: Path, fresh: dict[str, Any]) -> dict[str, Any]:
    """The existing manifest of OUT if it describes the same embedding, else a new one; refuse to mix."""
    old = read_manifest(out)
    if old is None:
        if out.exists() and any(out.iterdir()):
            raise FileExistsError(
                f"'{out}' exists and is not a `coalign embed` folder (no manifest.json); "
                "choose a new or empty OUT folder"
            )
        out.mkdir(parents=True, exist_ok=True)
        return fresh
    for key in IDENTITY_KEYS:
        if old.get(key) != fresh[key]:
            raise FileExistsError(
                f"'{out}' holds a different embedding ({key}: {old.get(key)!r} there, {fresh[key]!r} now); "
                "choose another OUT folder, or delete it to start over"
            )
    return old


def embed_source(
    checkpoint: str | Path,
    source_spec: str | dict | SourceSpec,
    out_dir: str | Path,
    batch_size: int = 256,
    shard_size: int = 10_000,
    progress: bool = True,
    *,
    image_key: str | None = None,
    caption_key: str | None = None,
    device: str | None = None,
    num_workers: int = 0,
    thumbnail_size: int = 64,
    stop_after: int | None = None,
    rank: int = 0,
    world: int = 1,
) -> dict[str, Any]:
    """Embed `source_spec` with the run at `checkpoint` into `out_dir`; resume if it holds a partial run.

    `stop_after` stops after computing that many shards (how tests simulate an interrupted run).
    Returns a summary: rows, modalities, shards computed / reused, skipped counts by reason (and the
    source index of the first few skips of each reason), seconds.

    With `world` > 1 (under torchrun, the process group initialised by the caller), every rank runs
    this with its `rank`: the unfinished shards are dealt out in rounds of `world`, shard i of a round
    to rank i. A shard's first row is the number of samples kept before it, which is known only once
    the shards before it are embedded, so each rank embeds its shard in memory, the ranks exchange
    their row counts, and only then does each write its shard, numbered as one process would number
    it; rank 0 alone writes the manifest (after every rank of the round has written) and the merged
    metadata. The output is the single-process output, file for file."""
    if batch_size <= 0 or shard_size <= 0:
        raise ConfigError(f"batch_size and shard_size must be positive (got {batch_size}, {shard_size})")
    if not 0 <= rank < world:
        raise ConfigError(f"rank {rank} is not one of the {world} ranks")
    t0 = time.perf_counter()
    out = Path(out_dir)
    # fp32: an index is built once and queried many times; its vectors should not carry bf16 error
    run = load_run(checkpoint, Runtime.create("fp32", device))
    spec = resolve_source_spec(source_spec, run.recipe, image_key, caption_key)
    source = build_source(SourceSpec(**spec), "SOURCE")
    modalities = carried_modalities(run, source)
    n = len(source)
    manifest = open_manifest(
        out,
        {
            "format": FORMAT,
            "checkpoint": str(run.checkpoint.absolute()),
            "step": run.step,
            "source": spec,
            "source_size": n,
            "modalities": modalities,
            "embed_dim": run.model.embed_dim,
            "shard_size": shard_size,
            "thumbnail_size": thumbnail_size,
            "num_shards": math.ceil(n / shard_size),
            "shards": [],
            "finished": False,
        },
    )
    if world > 1:
        dist.barrier()  # every rank has looked at OUT before any writes into it
    manifest["shards"] = [s for s in manifest["shards"] if shard_done(out, s, modalities)]
    done = {s["shard"]: s for s in manifest["shards"]}
    prepared = Prepared(source, run.transforms, modalities, thumbnail_size)
    bar = tqdm(
        total=n,
        initial=sum(s["stop"] - s["start"] for s in done.values()),
        desc="embed",
        unit="sample",
        disable=not progress or rank != 0,
    )
    pending = [s for s in range(manifest["num_shards"]) if s not in done]
    if stop_after is not None:
        pending = pending[:stop_after]
    rows = {s: e["rows"] for s, e in done.items()}  # shard -> rows kept, as they become known
    running = SkipCounter()
    for k in range(0, len(pending), world):
        round_ = pending[k : k + world]  # shard round_[i] is rank i's
        mine = round_[rank] if rank < len(round_) else None
        computed = None
        if mine is not None:
            start, stop = mine * shard_size, min(n, (mine + 1) * shard_size)
            computed = compute_shard(run, prepared, mine, start, stop, batch_size, num_workers, bar, running)
        counts = _all(None if computed is None else len(computed.meta), world)
        rows.update({s: c for s, c in zip(round_, counts, strict=False)})
        entry = None
        if computed is not None:  # every shard before it is done or in this round: its row0 is known
            entry = write_shard(out, computed, sum(rows[s] for s in range(mine)))
        entries = [e for e in _all(entry, world) if e is not None]
        bar.update(sum(e["stop"] - e["start"] for e in entries) - (0 if entry is None else stop - start))
        manifest["shards"] = sorted([*manifest["shards"], *entries], key=lambda s: s["shard"])
        if rank == 0:
            write_manifest(out, manifest)
    bar.close()
    computed_shards, row = len(pending), sum(rows.values())
    skipped = SkipCounter()
    for s in manifest["shards"]:  # in source order, so the rows kept are the first of each reason
        skipped.update(SkipCounter(s["skipped"], s.get("skipped_rows")))
    finished = len(manifest["shards"]) == manifest["num_shards"]
    record = skipped.record()
    manifest.update(finished=finished, count=row, skipped=record["counts"], skipped_rows=record["rows"])
    if rank == 0:
        if finished:
            parts = [pq.read_table(part_path(out, s["shard"])) for s in manifest["shards"]]
            merged = pa.concat_tables(parts) if parts else metadata_schema().empty_table()
            write_parquet(out / METADATA, merged)
        write_manifest(out, manifest)
    if world > 1:
        dist.barrier()  # OUT is complete when any rank returns
    return {
        "out": str(out),
        "finished": finished,
        "rows": row,
        "modalities": modalities,
        "embed_dim": run.model.embed_dim,
        "shards": manifest["num_shards"],
        "computed_shards": computed_shards,
        "reused_shards": len(done),
        "skipped": record["counts"],
        "skipped_rows": record["rows"],  # the source index of the first few of each reason
        "skip_report": skipped.report(),
        "seconds": round(time.perf_counter() - t0, 3),
    }
