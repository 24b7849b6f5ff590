"""Does `coalign data filter` help? Noisy web pairs on the built-in world, as JSON.

    python benchmarks/curation.py OUT [--samples 6000] [--noise 0.3] [--steps 150] [--keep 0.7]

1. packs `--samples` world training samples into shards (OUT/clean), then writes OUT/noisy: the
   same shards with the captions of a random `--noise` fraction of samples shuffled among them
   (each of those samples gets another one's caption: the misaligned pairs of web data);
2. trains a small CLIP on OUT/noisy for `--steps` steps (OUT/runs/noisy);
3. filters OUT/noisy with that model (`coalign data filter --model OUT/runs/noisy --keep-fraction K`,
   plus exact-duplicate removal and the default caption rules) into OUT/filtered;
4. trains the same model on OUT/filtered for the same number of steps (OUT/runs/filtered), and,
   with `--clean`, on OUT/clean (the ceiling);
5. prints each run's zero-shot accuracy and retrieval recall on the world's held-out test samples,
   and how well the filter found the shuffled pairs (precision and recall of what it removed).

Every stage whose output exists is reused, so an interrupted benchmark continues. Each training
run is a `coalign train` subprocess (the same model, data order seed and steps).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from coalign.data.pack import pack
from coalign.data.shards import MANIFEST, ShardWriter
from coalign.data.sources.webdataset import WebDatasetSource
from coalign.registry import SOURCES

# A small CLIP that trains at a few hundred samples/s on two shared CPU cores.
MODEL = [
    "data.transforms.image.size=32",
    "model.towers.image.patch_size=8",
    "model.towers.image.width=64",
    "model.towers.image.depth=2",
    "model.towers.image.heads=2",
    "model.towers.text.width=64",
    "model.towers.text.heads=2",
    "model.embed_dim=64",
    "data.batch_size=64",
    "data.eval.heldout_samples.size=1000",
    "data.eval.heldout_combos.size=500",
    "train.warmup_steps=30",
]
CLI = [sys.executable, "-c", "import sys; from coalign.cli import main; sys.exit(main(sys.argv[1:]))"]


def noisy_copy(clean: Path, out: Path, fraction: float, seed: int = 0) -> list[str]:
    """`clean`'s samples with the captions of `fraction` of them shuffled among themselves (a
    derangement: none keeps its own); the same keys and shard sizes. Returns the shuffled keys."""
    source = WebDatasetSource(path=str(clean), shuffle=False, required=[])
    n = len(source)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(n, size=int(round(fraction * n)), replace=False))
    donor = dict(zip(chosen.tolist(), np.roll(rng.permutation(chosen), 1).tolist(), strict=True))
    # the roll of a permutation of the chosen is a derangement of them when no i maps to itself
    for i in list(donor):
        if donor[i] == i:
            j = next(k for k in donor if k != i and donor[k] != i)
            donor[i], donor[j] = donor[j], donor[i]
    manifest = json.loads((clean / MANIFEST).read_text())
    out.mkdir(parents=True)
    writer = ShardWriter(out, shard_size=manifest["shards"][0]["samples"])
    keys = []
    for i in range(n):
        key, members, _ = source.members(i)
        if i in donor:
            members = {**members, "txt": source.members(donor[i])[1]["txt"]}
            keys.append(key)
        writer.write(key, members)
    extra = {k: manifest[k] for k in ("zero_shot", "modalities") if k in manifest}
    writer.close({**extra, "source": {"noisy_copy_of": str(clean), "fraction": fraction, "seed": seed}})
    return keys


def train(data: Path, run: Path, steps: int, seed: int) -> None:
    if (run / "results.json").exists():
        return
    cmd = [
        *CLI,
        "train",
        "demo",
        f"data.train={{source: webdataset, path: '{data}'}}",
        f"train.steps={steps}",
        f"train.log_every={max(steps // 10, 1)}",
        f"train.checkpoint_every={steps}",
        f"seed={seed}",
        *MODEL,
        "--out",
        str(run),
        "--no-progress",
    ]
    print("+", " ".join(cmd[3:]), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=sys.stderr)  # stdout is the JSON


def scores(run: Path) -> dict[str, float]:
    """The headline metrics of a run's final evaluation, on the held-out test samples."""
    results = json.loads((run / "results.json").read_text())
    out = {}
    for m in results["metrics"]:
        if m["dataset"] != "heldout_samples":
            continue
        if m["name"] == "acc1":
            out[f"zero_shot/{m['label']}"] = round(m["value"], 4)
        elif m["name"] in ("image_retrieval_recall@1", "text_retrieval_recall@1"):
            out[m["name"]] = round(m["value"], 4)
    accs = [v for k, v in out.items() if k.startswith("zero_shot/")]
    out["zero_shot/mean"] = round(float(np.mean(accs)), 4)
    seconds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    out["train_seconds"] = round(max(r.get("elapsed_s", 0) for r in seconds), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--samples", type=int, default=6000)
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--keep", type=float, default=0.7, help="--keep-fraction of the filter")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clean", action="store_true", help="also train on the clean set (the ceiling)")
    parser.add_argument("--until", choices=["noisy", "filter"], help="stop after this stage")
    args = parser.parse_args()
    out = args.out
    clean, noisy, filtered = out / "clean", out / "noisy", out / "filtered"
    if not (clean / MANIFEST).exists():
        world = SOURCES.create("world", split="train", size=args.samples, seed=args.seed)
        pack(world, clean, shard_size=1000, progress=False, spec={"source": "world", "size": args.samples})
    if not (noisy / MANIFEST).exists():
        keys = noisy_copy(clean, noisy, args.noise, args.seed)
        (out / "shuffled_keys.json").write_text(json.dumps(keys))
    shuffled = set(json.loads((out / "shuffled_keys.json").read_text()))
    train(noisy, out / "runs" / "noisy", args.steps, args.seed)
    if args.until == "noisy":
        return
    if not (filtered / MANIFEST).exists():
        cmd = [*CLI, "data", "filter", str(noisy), str(filtered), "--model", str(out / "runs" / "noisy")]
        cmd += ["--keep-fraction", str(args.keep), "--no-progress"]
        print("+", " ".join(cmd[3:]), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=sys.stderr)
    report = json.loads((filtered / "filter_report.json").read_text())
    kept = set(_keys(filtered))
    removed = set(_keys(noisy)) - kept
    caught = len(removed & shuffled)
    if args.until == "filter":
        return
    train(filtered, out / "runs" / "filtered", args.steps, args.seed)
    runs = {"noisy": scores(out / "runs" / "noisy"), "filtered": scores(out / "runs" / "filtered")}
    if args.clean:
        train(clean, out / "runs" / "clean", args.steps, args.seed)
        runs["clean"] = scores(out / "runs" / "clean")
    print(
        json.dumps(
            {
                "samples": args.samples,
                "noise": args.noise,
                "steps": args.steps,
                "batch_size": 64,
                "keep_fraction": args.keep,
                "filter": {
                    "kept": report["kept"],
                    "removed_by_rule": report["removed"],
                    "removed_that_were_shuffled": caught,
                    "precision": round(caught / max(len(removed), 1), 4),
                    "recall_of_shuffled": round(caught / max(len(shuffled), 1), 4),
                },
                "runs": runs,
            },
            indent=2,
        )
    )


def _keys(folder: Path) -> list[str]:
    source = WebDatasetSource(path=str(folder), shuffle=False, required=[])
    return [source.members(i)[0] for i in range(len(source))]


if __name__ == "__main__":
    main()
