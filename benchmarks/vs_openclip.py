"""coalign against OpenCLIP (`open_clip_train`) on the same CSV, architecture, schedule and seeds, as JSON.

    python benchmarks/vs_openclip.py --dataset scenes --seeds 0 1 2            # the issue's setting
    python benchmarks/vs_openclip.py --dataset world --steps 256 --train-size 8192 --seeds 0
    python benchmarks/vs_openclip.py --sides coalign --set train.grad_clip=1.0  # screen one coalign change

Both sides train on one exported CSV of PNG files (`scenes.py`: the built-in world, or a scene
generator that is not the world), with the same ViT and text transformer sizes (this script writes
OpenCLIP's model-config JSON and coalign's recipe from the same options), batch, steps, learning rate,
warmup, weight decay, AdamW betas and eps, precision, threads and seeds. Everything else is each side's
*default*: coalign's recipe names only the sizes (`--set` adds dotted overrides), OpenCLIP runs with
its trainer's defaults.
Each side keeps its own tokenizer and image preprocessing.

Then one evaluation path for both: the held-out images and captions go through each side's encoders,
and the same code computes zero-shot accuracy per label (class embedding = mean over the prompts that
name the class with every value of the other labels) and caption<->image retrieval recall@1/5.

Per side: samples/s (training steps after the first 5, data loading included), wall time of the whole
training (startup included), final loss (mean of the last 16 steps), zero-shot acc1 per label and
retrieval; per seed, then mean and standard deviation; and coalign / OpenCLIP ratios of the means.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402
from scenes import DATASETS, Dataset, export, read_manifest  # noqa: E402

from coalign.build import load_run  # noqa: E402
from coalign.config import load_recipe  # noqa: E402
from coalign.evaluate.classification import chunked_classification_metrics  # noqa: E402
from coalign.evaluate.retrieval import chunked_retrieval_recalls  # noqa: E402
from coalign.runtime import Runtime  # noqa: E402
from coalign.train.loop import train  # noqa: E402

SIDES = ("coalign", "openclip")
TAIL = 16  # final loss = mean of this many last steps
SKIP = 5  # samples/s leaves out the first steps (allocator and autocast caches warming up)
OPENCLIP_MODEL = "coalign-bench"
OPENCLIP_PRECISION = {"bf16": "amp_bf16", "fp32": "fp32"}
# Runs open_clip_train in a child process after registering the written model config.
OPENCLIP_CHILD = (
    "import sys, torch, open_clip; torch.set_num_threads(int(sys.argv[1])); "
    "open_clip.add_model_config(sys.argv[2]); from open_clip_train.main import main; main(sys.argv[3:])"
)


# --------------------------------------------------------------------------------------------- configs


def openclip_config(a: argparse.Namespace) -> dict:
    """OpenCLIP's model-config JSON for the benchmark's sizes (heads = width / 64, as OpenCLIP's ViT)."""
    return {
        "embed_dim": a.embed_dim,
        "vision_cfg": {
            "image_size": a.image_size,
            "layers": a.depth,
            "width": a.width,
            "head_width": a.width // a.heads,
            "patch_size": a.patch_size,
        },
        "text_cfg": {
            "context_length": a.context_length,
            "vocab_size": 49408,  # OpenCLIP's own BPE (bundled with the package)
            "width": a.width,
            "heads": a.heads,
            "layers": a.depth,
        },
    }


def coalign_recipe(a: argparse.Namespace, manifest: Path, labels: list[str], seed: int) -> dict:
    """A recipe that sets only what the comparison fixes; everything else is coalign's default."""
    tower = {"width": a.width, "depth": a.depth, "heads": a.heads}
    return {
        "name": "vs_openclip",
        "seed": seed,
        "data": {
            "train": {"source": "csv", "path": str(manifest), "label_keys": labels},
            "transforms": {
                "image": {"transform": "image", "size": a.image_size},
                "text": {"transform": "bpe", "context_length": a.context_length},
            },
            "batch_size": a.batch_size,
        },
        "model": {
            "embed_dim": a.embed_dim,
            "towers": {
                "image": {"encoder": "vit", "patch_size": a.patch_size, **tower},
                "text": {"encoder": "text_transformer", **tower},
            },
        },
        "objectives": [{"name": "clip"}],
        "train": {
            "steps": a.steps,
            "lr": a.lr,
            "warmup_steps": a.warmup,
            "weight_decay": a.wd,
            "betas": list(a.betas),
            "eps": a.eps,
            "precision": a.precision,
            "threads": a.threads,
            "log_every": 1,
            "checkpoint_every": a.steps,
            "keep_checkpoints": 1,
        },
        "eval": {"evaluators": []},
    }


# --------------------------------------------------------------------------------------------- sides


class Encoders:
    """What the shared evaluation needs from a trained model: images and texts -> (n, E) unit vectors."""

    def __init__(self, images, texts, runtime: Runtime):
        self._images, self._texts, self.runtime = images, texts, runtime

    @torch.no_grad()
    def _batched(self, fn, items: list, batch: int = 250) -> torch.Tensor:
        out = []
        for i in range(0, len(items), batch):
            with self.runtime.autocast():
                out.append(fn(items[i : i + batch]).float())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    def images(self, paths: list[str]) -> torch.Tensor:
        return self._batched(self._images, paths)

    def texts(self, texts: list[str]) -> torch.Tensor:
        return self._batched(self._texts, texts)


def flops_per_sample(image_fn, text_fn, images: torch.Tensor, texts: torch.Tensor) -> float:
    """Training FLOPs per image-text pair (both towers forward and backward), counted by PyTorch's
    FlopCounterMode (matmuls, convolutions, attention) on a small batch of real inputs."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        (image_fn(images).float().sum() + text_fn(texts).float().sum()).backward()
    return counter.get_total_flops() / len(images)


def matmul_peak(precision: str, threads: int, n: int = 2048, reps: int = 10) -> float:
    """FLOP/s of one large square matmul at the run's precision and thread count: the machine's
    practical matrix peak, measured in the same process as the runs it is compared with."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    x, y = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        x @ y
    started = time.perf_counter()
    for _ in range(reps):
        x @ y
    return 2 * n**3 * reps / (time.perf_counter() - started)


def coalign_encoders(run_dir: Path, runtime: Runtime) -> tuple[Encoders, Any]:
    """A trained coalign run's encoders for `evaluate`, and the loaded run."""
    run = load_run(run_dir)
    image_t, text_t = run.transforms["image"], run.transforms["text"]
    rng = np.random.default_rng(0)
    encoders = Encoders(
        lambda paths: run.model.encode("image", torch.stack([image_t(p, rng) for p in paths])),
        lambda texts: run.model.encode("text", text_t.encode(texts)),
        runtime,
    )
    return encoders, run


def openclip_encoders(config: Path, run_logs: Path, runtime: Runtime) -> tuple[Encoders, Any, Any, Any]:
    """An `open_clip_train` run's encoders for `evaluate` (its model config, its log folder with the
    last epoch's checkpoint), and the model, its preprocessing and its tokenizer."""
    import open_clip  # the reference side only

    open_clip.add_model_config(config)
    model, _, preprocess = open_clip.create_model_and_transforms(OPENCLIP_MODEL)
    checkpoint = sorted((run_logs / "checkpoints").glob("epoch_*.pt"))[-1]
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"])
    model.eval()
    tokenizer = open_clip.get_tokenizer(OPENCLIP_MODEL)
    encoders = Encoders(
        lambda paths: model.encode_image(torch.stack([preprocess(Image.open(p)) for p in paths])),
        lambda texts: model.encode_text(tokenizer(texts)),
        runtime,
    )
    return encoders, model, preprocess, tokenizer


def train_coalign(a, manifest: Path, dataset: Dataset, seed: int, out: Path, runtime: Runtime):
    run_dir = out / f"coalign-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    recipe = load_recipe(coalign_recipe(a, manifest, list(dataset.labels), seed), a.set)
    run_dir.mkdir(parents=True)
    (out / f"coalign-seed{seed}.yaml").write_text(yaml.safe_dump(recipe.model_dump(), sort_keys=False))
    started = time.perf_counter()
    log = open(out / f"coalign-seed{seed}.log", "w")  # noqa: SIM115 (closed by the with below)
    with log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        train(recipe, run_dir, progress=False)
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("kind") == "train"]
    losses, elapsed = [r["loss"] for r in rows], [r["elapsed_s"] for r in rows]
    k = SKIP if len(rows) > 2 * SKIP else 0  # a tiny run keeps every step
    speed = (len(rows) - 1 - k) * a.batch_size / max(elapsed[-1] - elapsed[k], 1e-9) if rows else 0.0
    encoders, run = coalign_encoders(run_dir, runtime)
    image_t, text_t, rng = run.transforms["image"], run.transforms["text"], np.random.default_rng(0)
    paths, captions, _ = read_manifest(manifest, list(dataset.labels))
    flops = flops_per_sample(  # at the full context, as OpenCLIP runs it: `features`, not the cut `encode`
        lambda x: run.model.features("image", x).embedding,
        lambda x: run.model.features("text", x).embedding,
        torch.stack([image_t(p, rng) for p in paths[:8]]),
        text_t.encode(captions[:8]),
    )
    return encoders, {
        "wall_s": wall,
        "samples_per_s": speed,
        "train_flops_per_sample": flops,
        "losses": losses,
    }


def train_openclip(a, manifest: Path, seed: int, out: Path, runtime: Runtime):
    config = out / "openclip-model" / f"{OPENCLIP_MODEL}.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps(openclip_config(a), indent=2))
    name, logs = f"openclip-seed{seed}", out / "openclip-logs"
    shutil.rmtree(logs / name, ignore_errors=True)
    n = len(manifest.read_text().splitlines()) - 1
    if (a.steps * a.batch_size) % n:
        raise SystemExit(
            f"OpenCLIP trains whole epochs: steps x batch ({a.steps * a.batch_size}) must be a multiple "
            f"of --train-size ({n})"
        )
    args = [
        "--model", OPENCLIP_MODEL, "--train-data", str(manifest), "--dataset-type", "csv",
        "--csv-separator", ",", "--csv-img-key", "filepath", "--csv-caption-key", "title",
        "--batch-size", str(a.batch_size), "--epochs", str(a.steps * a.batch_size // n),
        "--lr", str(a.lr), "--warmup", str(a.warmup), "--wd", str(a.wd),
        "--beta1", str(a.betas[0]), "--beta2", str(a.betas[1]), "--eps", str(a.eps),
        "--precision", OPENCLIP_PRECISION[a.precision], "--seed", str(seed), "--workers", "0",
        "--device", runtime.device.type, "--logs", str(logs), "--name", name,
        "--log-every-n-steps", "1", "--save-frequency", "0", "--report-to", "",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    started = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        cmd = [sys.executable, "-c", OPENCLIP_CHILD, str(a.threads), str(config), *args]
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - started
    text = (logs / name / "out.log").read_text()
    losses = [float(x) for x in re.findall(r" Loss: ([-\d.e+]+)", text)]
    times = [float(x) for x in re.findall(r"Batch \(t\): ([\d.]+)", text)]
    times = times[SKIP:] if len(times) > 2 * SKIP else times
    speed = a.batch_size * len(times) / max(sum(times), 1e-9)
    encoders, model, preprocess, tokenizer = openclip_encoders(config, logs / name, runtime)
    paths, captions, _ = read_manifest(manifest, [])
    flops = flops_per_sample(
        model.encode_image, model.encode_text, torch.stack([preprocess(Image.open(p)) for p in paths[:8]]),
        tokenizer(captions[:8]),
    )  # fmt: skip
    return encoders, {
        "wall_s": wall,
        "samples_per_s": speed,
        "train_flops_per_sample": flops,
        "losses": losses,
    }


# --------------------------------------------------------------------------------------------- evaluate


def evaluate(encoders: Encoders, dataset: Dataset, test: Path, images: torch.Tensor | None = None) -> dict:
    """The one evaluation of both sides: zero-shot per label and caption<->image retrieval.
    `images`: the test images' embeddings when the caller has them already (the probe)."""
    paths, captions, labels = read_manifest(test, list(dataset.labels))
    images = encoders.images(paths) if images is None else images  # (N, E)
    zero_shot = {}
    for key, classnames in dataset.labels.items():
        others = [k for k in dataset.labels if k != key]
        combos = list(itertools.product(*(dataset.labels[k] for k in others)))
        # every class in the same order of the other labels' values; prompt-major within a class
        prompts = [
            dataset.prompt({key: name, **dict(zip(others, combo, strict=True))})
            for name in classnames
            for combo in combos
        ]
        emb = encoders.texts(prompts).view(len(classnames), len(combos), -1)  # (C, T, E), unit rows
        classes = torch.nn.functional.normalize(emb.mean(1), dim=-1)  # (C, E), CLIP prompt ensembling
        targets = torch.as_tensor(labels[key], dtype=torch.long)
        zero_shot[key] = chunked_classification_metrics(images, classes, targets)["acc1"]
    recalls = chunked_retrieval_recalls(encoders.texts(captions), images, torch.arange(len(paths)), ks=(1, 5))
    retrieval = {f"text_to_image_r@{k}": recalls.text_to_image[k] for k in recalls.text_to_image} | {
        f"image_to_text_r@{k}": recalls.image_to_text[k] for k in recalls.image_to_text
    }
    return {"zero_shot": zero_shot, "retrieval": retrieval}


# --------------------------------------------------------------------------------------------- summary


def flat(run: dict) -> dict[str, float]:
    out = {k: run[k] for k in ("samples_per_s", "wall_s", "final_loss", "fraction_of_matmul_peak")}
    out |= {f"zero_shot/{k}": v for k, v in run["zero_shot"].items()}
    return out | {f"retrieval/{k}": v for k, v in run["retrieval"].items()}


def summarise(runs: list[dict]) -> dict:
    keys = flat(runs[0])
    values = {k: [flat(r)[k] for r in runs] for k in keys}
    return {
        "mean": {k: round(statistics.fmean(v), 4) for k, v in values.items()},
        "std": {k: round(statistics.stdev(v), 4) if len(v) > 1 else 0.0 for k, v in values.items()},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=sorted(DATASETS), default="scenes")
    p.add_argument("--data-dir", type=Path, default=None, help="default: OUT/data-DATASET")
    p.add_argument("--out", type=Path, default=Path("runs/vs_openclip"))
    p.add_argument("--train-size", type=int, default=16384)
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--wd", type=float, default=0.1)
    # AdamW's betas and eps go to both sides: left to itself, open_clip_train picks them by the model's
    # name (0.98 / 1e-6 only for names containing "vit"), and the benchmark's model is "coalign-bench"
    p.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.98], metavar=("BETA1", "BETA2"))
    p.add_argument("--eps", type=float, default=1e-6)
    p.add_argument("--precision", choices=sorted(OPENCLIP_PRECISION), default="bf16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--context-length", type=int, default=32)
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--set", nargs="*", default=[], help="dotted overrides of coalign's recipe")
    p.add_argument("--export-only", action="store_true", help="write the CSVs and PNGs, then stop")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    dataset = DATASETS[a.dataset]
    folder = a.data_dir or a.out / f"data-{a.dataset}"
    train_csv = export(dataset, folder, "train", a.train_size, a.image_size)
    test_csv = export(dataset, folder, "test", a.test_size, a.image_size)
    report = {
        "benchmark": "vs_openclip",
        "dataset": a.dataset,
        "train_csv": str(train_csv),
        "test_csv": str(test_csv),
        "settings": {k: v for k, v in vars(a).items() if k not in ("out", "data_dir", "export_only")},
        "machine": describe(),
        "sides": {},
    }
    if a.export_only:
        print(json.dumps(report, indent=2))
        return report
    runtime = Runtime.create(a.precision)
    report["machine"]["matmul_peak_flop_per_s"] = matmul_peak(a.precision, a.threads)
    for side in a.sides:
        runs = []
        for seed in a.seeds:
            out = a.out / a.dataset / side
            out.mkdir(parents=True, exist_ok=True)
            if side == "coalign":
                encoders, run = train_coalign(a, train_csv, dataset, seed, out, runtime)
            else:
                encoders, run = train_openclip(a, train_csv, seed, out, runtime)
            losses = run.pop("losses")
            run["final_loss"] = statistics.fmean(losses[-TAIL:]) if losses else float("nan")
            achieved = run["samples_per_s"] * run["train_flops_per_sample"]
            run["achieved_flop_per_s"] = achieved
            run["fraction_of_matmul_peak"] = achieved / report["machine"]["matmul_peak_flop_per_s"]
            run = {"seed": seed, **run, **evaluate(encoders, dataset, test_csv)}
            print(json.dumps({"side": side, **run}), file=sys.stderr)
            runs.append(run)
        report["sides"][side] = {"runs": runs, **summarise(runs)}
    if all(s in report["sides"] for s in SIDES):
        c, o = (report["sides"][s]["mean"] for s in SIDES)
        report["ratios"] = {k: round(c[k] / o[k], 4) if o[k] else None for k in c}
        report["coalign_at_least_openclip"] = {
            k.split("/", 1)[1]: c[k] >= o[k] for k in c if k.startswith("zero_shot/")
        }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
