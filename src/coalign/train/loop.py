"""The one training loop. It knows nothing about objectives: `task(batch)["loss"]` is all it sums.

In parts, so that distributed training, gradient accumulation and objectives with their own state
plug in without another copy of the loop:

- `setup()` (`train/session.py`) checks the run folder, builds data, model, task, optimizer and
  scheduler into a `TrainState`, and restores the newest intact checkpoint when resuming;
- `train_step()` does one optimisation step on one batch (precision, backward, clipping);
- `train()` is the outer loop: batches, steps, logging, periodic evaluation, checkpoints, the end.

It resumes a killed run exactly (same weights as an uninterrupted run).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from coalign.config import Recipe
from coalign.data.collate import batch_size, split_batch
from coalign.data.loader import train_batches
from coalign.data.sources.base import SkipCounter
from coalign.evaluate.results import RUN_RESULTS, Results, format_table, step_results_path, write_results
from coalign.evaluate.run import evaluate
from coalign.io import atomic_write_json
from coalign.models.model import Features, MultimodalModel
from coalign.objectives.task import Task
from coalign.runtime import Runtime
from coalign.train.distributed import (
    Dist,
    agreed_lengths,
    average_gradients,
    init_from_env,
    reduce_skips,
)
from coalign.train.fsdp import clip_grad_norm, stand_ins, whole_model
from coalign.train.interrupt import Interrupted, StopSignal
from coalign.train.log import MetricLogger
from coalign.train.session import Session, setup
from coalign.train.state import TrainState, rng_state, set_rng_state

log = logging.getLogger("coalign")


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    results: Results | None  # the final evaluation; None when the run stopped before its last step
    skipped: SkipCounter
    seconds: float


@dataclass
class StepOutput:
    out: dict[str, torch.Tensor]  # the task's losses and metrics (tensors: no host sync yet)
    grad_norm: torch.Tensor
    samples: int


def train_step(
    state: TrainState, batch: dict[str, Any], recipe: Recipe, runtime: Runtime, dist: Dist | None = None
) -> StepOutput | None:
    """One optimisation step on `batch` (this rank's slice of the global batch under torchrun).

    A global batch with fewer than two usable samples has nothing to contrast: its samples are
    counted as skipped and the optimizer does not step, but the step and the schedule advance as
    usual, so the data position, the learning rate and the checkpoints stay those of an
    uninterrupted run."""
    d = dist or Dist()
    cfg = recipe.train
    n = batch_size(batch)
    state.skipped.update(SkipCounter.from_batch(batch))
    total = least = n
    if d.active:  # every rank must take the same branch: decide on the global count
        counts = [torch.zeros(1, dtype=torch.long, device=runtime.device) for _ in range(d.world)]
        torch.distributed.all_gather(counts, torch.tensor([n], device=runtime.device))
        every = torch.cat(counts).tolist()  # the one host sync
        total, least = sum(every), min(every)
    if total < 2:
        state.skipped["small_batch"] += n
        state.scheduler.step()
        state.step += 1
        return None
    # as many micro-batches on every rank (FSDP all-gathers a tower's weights in each forward)
    accumulate = cfg.accumulate if least >= cfg.accumulate else 1
    state.optimizer.zero_grad(set_to_none=True)
    out = forward_backward(state.task, batch, accumulate, runtime)
    average_gradients(state.task, d)
    grad_norm = clip_grad_norm(list(state.task.parameters()), cfg.grad_clip or math.inf)
    state.optimizer.step()
    state.task.after_step(state.step + 1)  # momentum models / EMA teachers follow the new weights
    state.scheduler.step()
    state.step += 1
    return StepOutput(out, grad_norm, total)


def forward_backward(task: Task, batch: dict[str, Any], accumulate: int, runtime: Runtime) -> dict:
    """The task's losses on `batch`, with the gradient of their sum in every parameter.

    `accumulate` K > 1 is GradCache (Gao et al., 2021): the batch's features are computed in K
    micro-batches without graphs; the loss and its gradient with respect to the features are computed
    on the whole batch (so the objectives see every negative); then each micro-batch is encoded again,
    with its graph, and backpropagated from its slice of the cached feature gradients. The gradient
    equals the whole batch's (to float tolerance) while activation memory is one micro-batch's. The
    RNG is replayed per micro-batch, so random encoders (patch dropping) draw the same twice. Under
    FSDP a (micro-)batch without rows of a modality that another rank's has gets a stand-in for it
    (`stand_ins`), so that every rank runs that tower's collectives."""
    device = runtime.device
    # Text padding cut before anything else, on the host (no device sync): micro-batches and ranks
    # then share one width per key, which their concatenated and gathered tokens need.
    batch = task.model.cut(batch, agreed_lengths(task.model.trim_lengths(batch)))
    if accumulate == 1 or batch_size(batch) < accumulate:
        (whole,) = stand_ins([runtime.to_device(batch)], task.model, device)  # FSDP: every tower runs
        with runtime.autocast():
            out = task(whole)
        out["loss"].backward()
        return out
    pieces = [batch, *split_batch(batch, accumulate)]
    whole, *parts = stand_ins([runtime.to_device(p) for p in pieces], task.model, device)
    states, cached = [], []
    with torch.no_grad():
        for part in parts:
            states.append(rng_state())
            with runtime.autocast():
                cached.append(task.model(part))
    keys = list(dict.fromkeys(k for c in cached for k in c))
    leaves = {k: Features.cat([c[k] for c in cached if k in c]).as_leaves() for k in keys}
    with runtime.autocast():
        out = task.loss(leaves, whole)
    out["loss"].backward()
    after = rng_state()
    offsets = {k: [0, 0, 0] for k in keys}  # rows of tokens, pooled, embedding handed out so far
    for part, before in zip(parts, states, strict=True):
        set_rng_state(before)
        with runtime.autocast():
            features = task.model(part)
        tensors, grads = [], []
        for key, f in features.items():
            for i, (t, leaf) in enumerate(zip(f.differentiable(), leaves[key].differentiable(), strict=True)):
                start, offsets[key][i] = offsets[key][i], offsets[key][i] + t.shape[0]
                if leaf.grad is not None and t.requires_grad:
                    tensors.append(t)
                    grads.append(leaf.grad[start : start + t.shape[0]])
        if tensors:
            torch.autograd.backward(tensors, grads)
    set_rng_state(after)
    return out


def _since(now: SkipCounter, before: SkipCounter) -> SkipCounter:
    """The skips counted in `now` but not yet in `before` (this rank's, since the last merge)."""
    counts = {k: n - before.get(k, 0) for k, n in now.items() if n > before.get(k, 0)}
    rows = {k: [r for r in v if r not in before.rows.get(k, [])] for k, v in now.rows.items()}
    return SkipCounter(counts, rows)


def eval_model(session: Session) -> MultimodalModel | None:
    """The model rank 0 evaluates (None elsewhere); under FSDP a whole copy, gathered by every rank."""
    state, d = session.state, session.dist
    if state.layout is None:
        return state.task.model if d.main else None
    return whole_model(state.weights(), session.recipe, session.pipeline.transforms, session.runtime.device)


def run_eval(session: Session, logger: MetricLogger, model: MultimodalModel | None = None) -> Results:
    """Evaluate the model as it is now: log the flat view, write RUN/eval/step_N.json."""
    recipe, step = session.recipe, session.state.step
    results = evaluate(
        model if model is not None else session.state.task.model,
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
    d = init_from_env()
    session = setup(recipe, run_dir, resume, runtime, d)
    recipe, state, cfg = session.recipe, session.state, session.recipe.train
    logger = MetricLogger(session.run_dir, cfg.steps, state.step, progress and d.main, enabled=d.main)
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
        shard=(d.rank, d.world),
    )
    end = min(cfg.steps, stop_after or cfg.steps)
    counted = SkipCounter(state.skipped, state.skipped.rows)  # every rank's, as of the last save

    def save() -> None:
        """All ranks: merge every rank's skips since the last save; rank 0 writes the checkpoint."""
        nonlocal counted
        if d.active:
            merged = SkipCounter(counted, counted.rows)
            merged.update(reduce_skips(_since(state.skipped, counted), d))
            state.skipped = counted = merged
        if d.main or state.collective:  # FSDP: every rank gathers (full) or writes (sharded)
            state.save(session.run_dir, cfg.keep_checkpoints, write=d.main)
        d.barrier()

    results: Results | None = None
    started = time.perf_counter()
    state.task.train()
    stop = StopSignal(d, session.runtime.device)  # several ranks: a signal stops all at one step
    try:
        with stop:
            while state.step < end:
                done = train_step(state, next(batches), recipe, session.runtime, d)
                if done is not None:
                    logger.count(done.samples)
                    if d.main and (state.step % cfg.log_every == 0 or state.step == end):
                        _log_step(logger, state, done, started)
                if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < cfg.steps:
                    model = eval_model(session)
                    if d.main:  # evaluation runs once, not once per rank
                        run_eval(session, logger, model)
                    d.barrier()
                stopping = stop.agreed()
                if stopping or state.step % cfg.checkpoint_every == 0 or state.step == end:
                    save()
                if stopping:
                    raise Interrupted(state.step)
    except Interrupted:
        logger.write(
            f"interrupted ({stop.received or 'by another rank'}) at step {state.step}: every rank "
            f"saved its checkpoint; continue with --resume {run_dir}"
        )
        logger.close()
        raise
    except KeyboardInterrupt:
        if state.collective:  # not a signal (those stop at a step): the other ranks may be anywhere
            logger.write(
                f"interrupted at step {state.step}: not saved; the last checkpoint is kept ({run_dir})"
            )
            logger.close()
            raise
        logger.write(
            f"interrupted at step {state.step}: saving a checkpoint; continue with --resume {run_dir}"
        )
        if d.main:
            state.save(session.run_dir, cfg.keep_checkpoints)
        logger.close()
        raise
    seconds = time.perf_counter() - started
    model = eval_model(session) if state.step >= cfg.steps else None
    if state.step >= cfg.steps and d.main:
        results = run_eval(session, logger, model)
        write_results(session.run_dir / RUN_RESULTS, results)
    if d.main:
        atomic_write_json(
            session.run_dir / "data_report.json",
            {
                "skipped": dict(state.skipped),
                "skipped_rows": state.skipped.record()["rows"],
                "step": state.step,
            },
        )
    d.barrier()
    logger.write(f"data: {state.skipped.report()}")
    if results is not None:
        logger.write(format_table(results))
    logger.close()
    return TrainResult(session.run_dir, state.step, results, state.skipped, seconds)
