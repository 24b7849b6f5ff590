"""What a run of the training loop starts from: `setup()` checks the run folder (a new run never
writes into a folder coalign did not make; a resumed one must hold a run whose checkpoint can be
continued), builds data, model, task, optimizer and scheduler into a `TrainState` (sharded with
FSDP2 when asked), and restores the newest intact checkpoint when resuming."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from coalign.build import (
    RECIPE_FILE,
    build_model,
    build_source,
    build_transforms,
    init_checkpoint,
    prepare_transforms,
)
from coalign.checkpoint import (
    checkpoint_step,
    clean_partial,
    is_sharded,
    latest_checkpoint,
    load_state,
    load_weights,
)
from coalign.config import Recipe, load_recipe, save_resolved
from coalign.data.sources.base import Source
from coalign.data.transforms.base import Pipeline, Transform
from coalign.objectives.task import Task
from coalign.runtime import Runtime
from coalign.train.distributed import Dist, broadcast_state, sync_batch_norm
from coalign.train.fsdp import PlainLayout, shard_task
from coalign.train.optim import build_optimizer, build_scheduler, plain_group_names
from coalign.train.state import TrainState

DEMO_MARKER = ".coalign-demo"  # `coalign demo` may replace a folder that holds this file, and no other


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
    notes: list[str] = field(default_factory=list)  # said once the logger is up
    dist: Dist = field(default_factory=Dist)


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


def check_resumable(run_dir: Path, checkpoint: Path) -> None:
    """A checkpoint that no training wrote (an imported model, an interpolation) has weights but no
    optimizer state to continue: say so and what to do instead, before anything is built."""
    state = load_state(checkpoint)
    if "optimizer" in state or is_sharded(checkpoint):  # a sharded one keeps it in its shards
        return
    origin = state.get("imported")
    if isinstance(origin, dict):
        what = f"imported ({origin.get('format', 'another format')})"
    else:
        what = "a weight interpolation" if "interpolation" in state else "not written by training"
    raise ValueError(
        f"cannot resume '{run_dir}': its checkpoint is {what} and holds weights only, no optimizer "
        f"state; to train from it, start a new run with model.init_from={run_dir} --out NEW_RUN"
    )


def setup(
    recipe: Recipe | None,
    run_dir: Path,
    resume: bool = False,
    runtime: Runtime | None = None,
    dist: Dist | None = None,
) -> Session:
    """Everything the loop needs. Under torchrun every rank builds the same task; rank 0 alone
    writes (the recipe, the tokenizer, leftovers' cleanup) and the others wait for it, then read."""
    run_dir = Path(run_dir)
    d = dist or Dist()
    check_run_dir(run_dir, resume)
    d.barrier()  # every rank has looked at the folder before rank 0 writes into it
    if resume:
        recipe = load_recipe(run_dir / RECIPE_FILE)
    elif recipe is None:
        raise ValueError("train() needs a recipe unless resuming")
    cfg = recipe.train
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(recipe.seed)
    if recipe.data.batch_size % d.world:
        raise ValueError(
            f"data.batch_size {recipe.data.batch_size} is the global batch and must divide among "
            f"{d.world} processes"
        )
    if not resume and recipe.model.init_from is not None:
        init_checkpoint(recipe.model.init_from)  # fails before the run folder is made
    runtime = runtime or Runtime.create(cfg.precision, d.device())
    notes = []
    checkpoint = None
    if resume and d.main:
        leftovers = clean_partial(run_dir)
        if leftovers:
            notes.append(f"removed {len(leftovers)} unfinished checkpoint write(s) left by a crash")
    d.barrier()
    if resume:
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is not None:
            check_resumable(run_dir, checkpoint)
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)

    source = build_source(recipe.data.train, "data.train")
    eval_sources = {k: build_source(s, f"data.eval.{k}") for k, s in recipe.data.eval.items()}
    transforms = build_transforms(recipe)
    if d.main:
        prepare_transforms(transforms, source, run_dir, resume)
        if not resume:
            save_resolved(recipe, run_dir / RECIPE_FILE)
    d.barrier()
    if not d.main:  # what rank 0 fitted and saved
        prepare_transforms(transforms, source, run_dir, resume=True)
    eval_transforms = build_transforms(recipe, views=False)
    for t in eval_transforms.values():
        t.load(run_dir)
        t.eval()
    task = Task.from_specs(build_model(recipe, transforms, init=not resume), recipe.objectives, transforms)
    if not resume and recipe.model.init_from is not None:
        notes.append(f"model initialised from {recipe.model.init_from.run}")
    task, note = sync_batch_norm(task, d, runtime.device)
    notes += [note] if note else []
    task = task.to(runtime.device)
    sharded = cfg.fsdp and d.active
    if cfg.fsdp and not d.active:
        notes.append("train.fsdp: one process holds the whole model, nothing to shard: trained plainly")
    if sharded:  # the whole weights first (every rank reads them), then shard (train/fsdp.py)
        if checkpoint is not None and not is_sharded(checkpoint):  # a sharded one loads into the shards
            task.load_state_dict(load_weights(checkpoint))
        broadcast_state(task, d)
        notes.append(shard_task(task, runtime.device))
    if cfg.compile:  # in place, per tower: state_dict keys (checkpoints) stay those of the plain model
        for tower in task.model.towers.values():
            tower.compile(backend=cfg.compile_backend)
    scales = task.lr_scales(recipe)
    optimizer = build_optimizer(task, cfg, scales)
    layout = PlainLayout(task, optimizer, plain_group_names(task, scales)) if sharded else None
    scheduler = build_scheduler(optimizer, cfg)
    state = TrainState(task, optimizer, scheduler, layout=layout, sharded=cfg.checkpoint_format == "sharded")
    if checkpoint is not None:
        if sharded and not is_sharded(
            checkpoint
        ):  # the weights are in; the optimizer state goes into the shards
            state.load_state_dict(load_state(checkpoint))
        else:  # a sharded checkpoint reshards to this world size (train/fsdp_checkpoint.py)
            state.restore(checkpoint)
            notes += _resharded(checkpoint, d.world)
        notes.append(f"resuming from step {checkpoint_step(checkpoint)} ({checkpoint})")
    elif resume:
        notes.append(f"'{run_dir}' has no checkpoint left: starting again from step 0")
    if not sharded:
        broadcast_state(task, d)
    pipeline = Pipeline(transforms, recipe.data.drop_modalities)
    return Session(recipe, run_dir, runtime, state, source, pipeline, eval_sources, eval_transforms, notes, d)


def _resharded(checkpoint: Path, world: int) -> list[str]:
    saved = load_state(checkpoint).get("world", world) if is_sharded(checkpoint) else world
    return [f"the sharded checkpoint of {saved} processes resharded for {world}"] if saved != world else []
