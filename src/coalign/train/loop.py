"""The one training loop. It knows nothing about objectives: `task(batch)["loss"]` is all it sums.

It owns backward, the optimizer step, precision, clipping, logging, periodic evaluation and
checkpoints, and it resumes a killed run exactly (same weights as an uninterrupted run).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from coalign.config import Recipe, load_recipe, save_resolved
from coalign.data.collate import batch_size
from coalign.data.loader import train_batches
from coalign.data.sources.base import SkipCounter
from coalign.data.transforms.base import Pipeline
from coalign.evaluate.suite import evaluate, format_table
from coalign.objectives.task import Task
from coalign.run import RECIPE_FILE, build_model, build_source, build_transforms, prepare_transforms
from coalign.train.log import MetricLogger
from coalign.train.optim import build_optimizer, build_scheduler
from coalign.train.precision import autocast, default_device, resolve_precision
from coalign.train.state import (
    latest_checkpoint,
    load_state,
    load_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    results: dict[str, dict[str, float]]
    skipped: SkipCounter
    seconds: float


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    if device.type == "cpu":
        return batch
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def train(
    recipe: Recipe | None,
    run_dir: Path,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Train `recipe` into `run_dir`; with resume=True continue the run found there.

    `stop_after` ends the process-level loop early (after that many steps in total) while keeping
    the schedule of the full run: that is how tests simulate a run that was killed.
    """
    run_dir = Path(run_dir)
    if resume:
        if not (run_dir / RECIPE_FILE).exists():
            raise FileNotFoundError(f"cannot resume: '{run_dir}' has no {RECIPE_FILE}")
        recipe = load_recipe(run_dir / RECIPE_FILE)
    elif recipe is None:
        raise ValueError("train() needs a recipe unless resuming")
    elif latest_checkpoint(run_dir) is not None:
        raise FileExistsError(
            f"'{run_dir}' already holds a run; use --resume to continue it, or another --out"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = recipe.train
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(recipe.seed)
    device = default_device()
    precision = resolve_precision(cfg.precision, device)

    # ---- data and model
    source = build_source(recipe.data.train, "data.train")
    eval_sources = {k: build_source(s, f"data.eval.{k}") for k, s in recipe.data.eval.items()}
    transforms = build_transforms(recipe)
    prepare_transforms(transforms, source, run_dir, resume)
    if not resume:
        save_resolved(recipe, run_dir / RECIPE_FILE)
    eval_transforms = build_transforms(recipe, views=False)
    for t in eval_transforms.values():
        t.load(run_dir)
        t.eval()
    task = Task.from_specs(build_model(recipe, transforms), recipe.objectives, transforms).to(device)
    optimizer = build_optimizer(task, cfg, task.lr_scales(recipe.objectives))
    scheduler = build_scheduler(optimizer, cfg)
    skipped = SkipCounter()
    step = 0
    if resume:
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is not None:
            task.load_state_dict(load_weights(checkpoint))
            state = load_state(checkpoint)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"])
            skipped.update(state.get("skipped", {}))
            step = state["step"]

    def checkpoint_now() -> None:
        state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "data_position": step,  # batches consumed; the loader's order is a function of (seed, step)
            "skipped": dict(skipped),
        }
        save_checkpoint(run_dir, step, task.state_dict(), state, cfg.keep_checkpoints)

    def run_eval() -> dict[str, dict[str, float]]:
        results = evaluate(
            task.model,
            eval_transforms,
            eval_sources,
            recipe.eval.evaluators,
            recipe.eval.batch_size,
            recipe.eval.max_samples,
            device,
            autocast=lambda: autocast(precision, device),
        )
        for dataset, metrics in results.items():
            logger.log(step, {f"{dataset}/{k}": v for k, v in metrics.items()}, kind="eval")
        return results

    logger = MetricLogger(run_dir, cfg.steps, step, progress)
    logger.write(f"coalign: training '{recipe.name}' on {device} ({precision}) into {run_dir}")
    batches = train_batches(
        source,
        Pipeline(transforms, recipe.data.drop_modalities),
        recipe.data.batch_size,
        recipe.seed,
        step,
        recipe.data.num_workers,
    )
    end = min(cfg.steps, stop_after or cfg.steps)
    results: dict[str, dict[str, float]] = {}
    started = time.perf_counter()
    task.train()
    try:
        while step < end:
            batch = next(batches)
            skipped.update(batch["skipped"])
            if batch_size(batch) < 2:
                step += 1  # nothing to contrast in this batch; keep the data position moving
                continue
            with autocast(precision, device):
                out = task(to_device(batch, device))
            loss = out["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(task.parameters(), cfg.grad_clip or math.inf)
            optimizer.step()
            scheduler.step()
            step += 1
            logger.count(batch_size(batch))
            if step % cfg.log_every == 0 or step == end:
                value = loss.item()  # the only host sync, on logging steps
                if not math.isfinite(value):
                    raise FloatingPointError(f"loss is {value} at step {step}; last checkpoint is kept")
                metrics = {k: v.item() for k, v in out.items()}
                metrics.update(
                    lr=scheduler.get_last_lr()[0],
                    grad_norm=grad_norm.item(),
                    samples_per_s=logger.throughput(),
                    elapsed_s=time.perf_counter() - started,  # wall time of this process's loop
                )
                logger.log(step, metrics)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                run_eval()
            if step % cfg.checkpoint_every == 0 or step == end:
                checkpoint_now()
    except KeyboardInterrupt:
        logger.write(f"interrupted at step {step}: saving a checkpoint; continue with --resume {run_dir}")
        checkpoint_now()
        logger.close()
        raise
    seconds = time.perf_counter() - started
    if step >= cfg.steps:
        results = run_eval()
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    (run_dir / "data_report.json").write_text(json.dumps({"skipped": dict(skipped), "step": step}, indent=2))
    logger.write(f"data: {skipped.report()}")
    if results:
        logger.write(format_table(results))
    logger.close()
    return TrainResult(run_dir, step, results, skipped, seconds)
