"""Embedding throughput of a trained run on the built-in world, or side by side with OpenCLIP, as JSON.

    python benchmarks/embed_throughput.py RUN [--size 2000] [--batch-size 256] [--device cpu]
    python benchmarks/embed_throughput.py --vs-openclip [--size 2000] [--threads 2]

`model`: items/s of the image and text towers alone, on inputs transformed beforehand.
`end_to_end`: items/s of `coalign embed` (world rendering, transforms, both towers, float16 shards,
metadata, thumbnails, atomic writes) over the same samples.

`--vs-openclip`: coalign's towers and `open_clip`'s `encode_image` / `encode_text` on the same
architecture (`benchmarks/vs_openclip.py`'s sizes and model config; weights do not change the speed, so
coalign's side is a one-step run and OpenCLIP's a random init), on the same preprocessed inputs, in
fp32 and in bf16 autocast for both, and each side's default (coalign: `precision: auto`; OpenCLIP:
fp32 unless the caller autocasts), with coalign / OpenCLIP ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # vs_openclip, scenes (--vs-openclip)

from machine import describe  # benchmarks/machine.py

from coalign.build import build_source, load_run
from coalign.config import SourceSpec
from coalign.runtime import Runtime
from coalign.search.embed import embed_source


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def tower_rate(model, modality: str, x: torch.Tensor, batch_size: int, device: torch.device) -> float:
    model.encode(modality, x[:batch_size].to(device))  # warm-up (kernel selection, allocations)
    sync(device)
    t = time.perf_counter()
    for i in range(0, len(x), batch_size):
        model.encode(modality, x[i : i + batch_size].to(device))
    sync(device)
    return len(x) / (time.perf_counter() - t)


@torch.no_grad()
def rate(encode, x: torch.Tensor, batch_size: int, autocast: bool) -> float:
    """Items/s of `encode` over `x` in batches, after one warm-up batch; bf16 autocast if asked."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        encode(x[:batch_size])
        t = time.perf_counter()
        for i in range(0, len(x), batch_size):
            encode(x[i : i + batch_size])
    return len(x) / (time.perf_counter() - t)


def vs_openclip(args: argparse.Namespace) -> dict:
    """Both sides' towers on the same sizes and inputs; see the module docstring."""
    import open_clip  # the reference side only
    import vs_openclip as vs
    from scenes import DATASETS, export

    from coalign.config import load_recipe
    from coalign.runtime import resolve_precision
    from coalign.train.loop import train

    a = vs.parse_args(["--steps", "1", "--warmup", "1", "--threads", str(torch.get_num_threads())])
    with tempfile.TemporaryDirectory() as tmp:
        data = DATASETS[a.dataset]
        csv = export(data, Path(tmp) / "data", "train", max(args.size, a.batch_size), a.image_size)
        recipe = load_recipe(vs.coalign_recipe(a, csv, list(data.labels), 0), [])
        with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON
            train(recipe, Path(tmp) / "run", progress=False)
        run = load_run(Path(tmp) / "run", Runtime(torch.device("cpu"), "fp32"))
        paths, captions, _ = vs.read_manifest(csv, list(data.labels))
        rng = np.random.default_rng(0)
        images = torch.stack([run.transforms["image"](p, rng) for p in paths[: args.size]])
        texts = {"coalign": run.transforms["text"].encode(captions[: args.size])}
        config = Path(tmp) / f"{vs.OPENCLIP_MODEL}.json"
        config.write_text(json.dumps(vs.openclip_config(a)))
        open_clip.add_model_config(config)
        reference = open_clip.create_model(vs.OPENCLIP_MODEL).eval()
        texts["openclip"] = open_clip.get_tokenizer(vs.OPENCLIP_MODEL)(captions[: args.size])
    encoders = {
        "coalign": {
            "image": lambda x: run.model.encode("image", x),
            "text": lambda x: run.model.encode("text", x),
        },
        "openclip": {"image": reference.encode_image, "text": reference.encode_text},
    }
    inputs = {side: {"image": images, "text": texts[side]} for side in encoders}
    defaults = {"coalign": resolve_precision("auto", torch.device("cpu")) == "bf16", "openclip": False}
    out: dict = {}
    for setting in ("fp32", "bf16", "default"):
        for side, towers in encoders.items():
            bf16 = defaults[side] if setting == "default" else setting == "bf16"
            for tower, encode in towers.items():
                out.setdefault(setting, {}).setdefault(side, {})[f"{tower}_items_per_s"] = round(
                    rate(encode, inputs[side][tower], args.batch_size, bf16), 1
                )
        c, o = out[setting]["coalign"], out[setting]["openclip"]
        out[setting]["ratio"] = {k: round(c[k] / o[k], 3) for k in c}
    out["default"]["precision"] = {side: "bf16" if bf16 else "fp32" for side, bf16 in defaults.items()}
    return {"benchmark": "embed_vs_openclip", "items": len(images), "batch_size": args.batch_size,
            "machine": describe(), "towers": out}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, nargs="?", help="run folder or checkpoint folder")
    p.add_argument("--vs-openclip", action="store_true", help="side by side with open_clip (no RUN)")
    p.add_argument("--size", type=int, default=2000, help="world samples to embed")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.vs_openclip:
        print(json.dumps(vs_openclip(args), indent=2))
        return
    if args.run is None:
        p.error("give a RUN folder, or --vs-openclip")
    device = torch.device(args.device)
    run = load_run(args.run, Runtime(device, "fp32"))
    spec = {"source": "world", "split": "test", "size": args.size}
    source = build_source(SourceSpec(**spec), "world")
    rng = np.random.default_rng(0)
    samples = [source[i] for i in range(args.size)]
    images = torch.stack([run.transforms["image"](s["image"], rng) for s in samples])
    texts = run.transforms["text"].encode([s["text"] for s in samples])
    model = {
        "image_items_per_s": round(tower_rate(run.model, "image", images, args.batch_size, device), 1),
        "text_items_per_s": round(tower_rate(run.model, "text", texts, args.batch_size, device), 1),
    }
    with tempfile.TemporaryDirectory() as tmp:
        summary = embed_source(
            args.run, spec, Path(tmp) / "out", batch_size=args.batch_size, progress=False, device=args.device
        )
    end_to_end = {
        "items_per_s": round(summary["rows"] / summary["seconds"], 1),
        "seconds": summary["seconds"],
        "note": "includes loading the run, rendering the world, both towers and all writes",
    }
    env = {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "machine": describe(),
        "checkpoint": str(run.checkpoint),
        "embed_dim": run.model.embed_dim,
        "items": args.size,
        "batch_size": args.batch_size,
    }
    print(json.dumps({"environment": env, "model": model, "end_to_end": end_to_end}, indent=2))


if __name__ == "__main__":
    main()
