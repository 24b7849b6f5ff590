"""The one training loop. It knows nothing about objectives: `task(batch)["loss"]` is all it sums.

In parts, so that distributed training, gradient accumulation and objectives with their own state
plug in without another copy of the loop:

- `setup()` checks the run folder, builds data, model, task, optimizer and scheduler into a
  `TrainState`, and restores the newest intact checkpoint when resuming;
- `train_step()` does one optimisation step on one batch (precision, backward, clipping);
- `train()` is the outer loop: batches, steps, logging, periodic evaluation, checkpoints, the end.

It resumes a killed run exactly (same weights as an uninterrupted run).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from coalign.build import RECIPE_FILE, build_model, build_source, build_transforms, prepare_transforms
from coalign.checkpoint import checkpoint_step, clean_partial, latest_checkpoint
from coalign.config import Recipe, load_recipe, save_resolved
from coalign.data.collate import batch_size
from coalign.data.loader import train_batches
from coalign.data.sources.base import SkipCounter, Source
from coalign.data.transforms.base import Pipeline, Transform
from coalign.evaluate.results import RUN_RESULTS, Results, format_table, step_results_path, write_results
from coalign.evaluate.run import evaluate
from coalign.io import atomic_write_json
from coalign.objectives.task import Task
from coalign.runtime import Runtime
from coalign.train.log import MetricLogger
from coalign.train.optim import build_optimizer, build_scheduler
from coalign.train.state import TrainState

log = logging.getLogger("coalign")
DEMO_MARKER = ".coalign-demo"  # `coalign demo` may replace a folder that holds this file, and no other


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    results: Results | None  # the final evaluation; None when the run stopped before its last step
    skipped: SkipCounter
    seconds: float


@dataclass
class Session:
    """What `setup` builds for one process's run of the loop."""

    recipe: Recipe
    run_dir: Path
    runtime: Runtime
    state: TrainState
    source: Source
    pipeline: Pipeline
    eval_sources: dict[str, Source]
    eval_transforms: dict[str, Transform]
    resumed_from: Path | None = None
    notes: list[str] = field(default_factory=list)  # said once the logger is up


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """A new run goes into a new or empty folder; resuming needs a run folder. Never write into, let
    alone delete, a folder that coalign did not create."""
    if resume:
        if not (run_dir / RECIPE_FILE).is_file():
            raise FileNotFoundError(f"cannot resume: '{run_dir}' has no {RECIPE_FILE}; is it a run folder?")
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"'{run_dir}' is a file; the run needs a folder")
    if (run_dir / RECIPE_FILE).exists():
        raise FileExistsError(
            f"'{run_dir}' already holds a run; use --resume to continue it, or another --out"
        )
    if run_dir.is_dir() and any(p.name != DEMO_MARKER for p in run_dir.iterdir()):
        raise FileExistsError(
            f"'{run_dir}' exists and is not empty; a new run goes into a new or empty folder "
            "(choose another --out)"
        )


def setup(
    recipe: Recipe | None, run_dir: Path, resume: bool = False, runtime: Runtime | None = None
) -> Session:
    run_dir = Path(run_dir)
    check_run_dir(run_dir, resume)
    if resume:
        recipe = load_recipe(run_dir / RECIPE_FILE)
    elif recipe is None:
        raise ValueError("train() needs a recipe unless resuming")
    cfg = recipe.train
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(recipe.seed)
    runtime = runtime or Runtime.create(cfg.precision)
    notes = []
    checkpoint = None
    if resume:
        leftovers = clean_partial(run_dir)
        if leftovers:
            notes.append(f"removed {len(leftovers)} unfinished checkpoint write(s) left by a crash")
        checkpoint = latest_checkpoint(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

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
    task = Task.from_specs(build_model(recipe, transforms), recipe.objectives, transforms).to(runtime.device)
    optimizer = build_optimizer(task, cfg, task.lr_scales(recipe.objectives))
    state = TrainState(task, optimizer, build_scheduler(optimizer, cfg))
    if checkpoint is not None:
        state.restore(checkpoint)
        notes.append(f"resuming from step {checkpoint_step(checkpoint)} ({checkpoint})")
    elif resume:
        notes.append(f"'{run_dir}' has no checkpoint left: starting again from step 0")
    pipeline = Pipeline(transforms, recipe.data.drop_modalities)
    return Session(
        recipe, run_dir, runtime, state, source, pipeline, eval_sources, eval_transforms, checkpoint, notes
    )


@dataclass
class StepOutput:
    out: dict[str, torch.Tensor]  # the task's losses and metrics (tensors: no host sync yet)
    grad_norm: torch.Tensor
    samples: int


def train_step(
    state: TrainState, batch: dict[str, Any], recipe: Recipe, runtime: Runtime
) -> StepOutput | None:
    """One optimisation step on `batch`. A batch with fewer than two usable samples has nothing to
    contrast: its samples are counted as skipped and the optimizer does not step, but the step and
    the schedule advance as usual, so the data position, the learning rate and the checkpoints stay
    those of an uninterrupted run."""
    cfg = recipe.train
    n = batch_size(batch)
    state.skipped.update(SkipCounter.from_batch(batch))
    if n < 2:
        state.skipped["small_batch"] += n
        state.scheduler.step()
        state.step += 1
        return None
    with runtime.autocast():
        out = state.task(runtime.to_device(batch))
    state.optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(state.task.parameters(), cfg.grad_clip or math.inf)
    state.optimizer.step()
    state.scheduler.step()
    state.step += 1
    return StepOutput(out, grad_norm, n)


def run_eval(session: Session, logger: MetricLogger) -> Results:
    """Evaluate the model as it is now: log the flat view, write RUN/eval/step_N.json."""
    recipe, step = session.recipe, session.state.step
    results = evaluate(
        session.state.task.model,
        session.eval_transforms,
        session.eval_sources,
        recipe.eval.evaluators,
        session.runtime,
        recipe.eval.batch_size,
        recipe.eval.max_samples,
    ).about(recipe.name, "", step, "train")
    for dataset, metrics in results.flat().items():
        logger.log(step, {f"{dataset}/{k}": v for k, v in metrics.items()}, kind="eval")
    write_results(step_results_path(session.run_dir, step), results)
    return results


def _log_step(logger: MetricLogger, state: TrainState, done: StepOutput, started: float) -> None:
    value = done.out["loss"].item()  # the only host sync, on logging steps
    if not math.isfinite(value):
        raise FloatingPointError(f"loss is {value} at step {state.step}; last checkpoint is kept")
    metrics = {k: v.item() for k, v in done.out.items()}
    metrics.update(
        lr=state.scheduler.get_last_lr()[0],
        grad_norm=done.grad_norm.item(),
        samples_per_s=logger.throughput(),
        elapsed_s=time.perf_counter() - started,  # wall time of this process's loop
    )
    logger.log(state.step, metrics)


def train(
    recipe: Recipe | None,
    run_dir: Path,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    runtime: Runtime | None = None,
) -> TrainResult:
    """Train `recipe` into `run_dir`; with resume=True continue the run found there.

    `stop_after` ends the process-level loop early (after that many steps in total) while keeping
    the schedule of the full run: that is how tests simulate a run that was killed.
    """
    session = setup(recipe, run_dir, resume, runtime)
    recipe, state, cfg = session.recipe, session.state, session.recipe.train
    logger = MetricLogger(session.run_dir, cfg.steps, state.step, progress)
    logger.write(f"coalign: training '{recipe.name}' on {session.runtime} into {session.run_dir}")
    for note in session.notes:
        logger.write(f"coalign: {note}")
    batches = train_batches(
        session.source,
        session.pipeline,
        recipe.data.batch_size,
        recipe.seed,
        state.step,
        recipe.data.num_workers,
    )
    end = min(cfg.steps, stop_after or cfg.steps)
    results: Results | None = None
    started = time.perf_counter()
    state.task.train()
    try:
        while state.step < end:
            done = train_step(state, next(batches), recipe, session.runtime)
            if done is not None:
                logger.count(done.samples)
                if state.step % cfg.log_every == 0 or state.step == end:
                    _log_step(logger, state, done, started)
            if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < cfg.steps:
                run_eval(session, logger)
            if state.step % cfg.checkpoint_every == 0 or state.step == end:
                state.save(session.run_dir, cfg.keep_checkpoints)
    except KeyboardInterrupt:
        logger.write(
            f"interrupted at step {state.step}: saving a checkpoint; continue with --resume {run_dir}"
        )
        state.save(session.run_dir, cfg.keep_checkpoints)
        logger.close()
        raise
    seconds = time.perf_counter() - started
    if state.step >= cfg.steps:
        results = run_eval(session, logger)
        write_results(session.run_dir / RUN_RESULTS, results)
    atomic_write_json(
        session.run_dir / "data_report.json",
        {"skipped": dict(state.skipped), "skipped_rows": state.skipped.record()["rows"], "step": state.step},
    )
    logger.write(f"data: {state.skipped.report()}")
    if results is not None:
        logger.write(format_table(results))
    logger.close()
    return TrainResult(session.run_dir, state.step, results, state.skipped, seconds)
