"""Write a converted model as a coalign run folder, the layout `coalign train` writes and `load_run`
reads: `recipe.yaml`, what the transforms keep (the CLIP vocabulary), `checkpoints/step_00000000/`.

A converter supplies a recipe (as a dict) and the task's weights under coalign's names; this module
builds the recipe's model and objectives, loads the weights strictly (a missing or unused tensor is
an error naming it, never a silently random layer), and writes everything into a hidden folder beside
OUT that is renamed into place at the end, so a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from coalign.build import RECIPE_FILE, LoadedRun, build_model, build_transforms, load_run
from coalign.checkpoint import save_checkpoint
from coalign.config import Recipe, save_resolved, validate_recipe
from coalign.objectives.task import Task

IMPORTED = "imported.json"  # where the run came from (format, files), beside recipe.yaml


class ConversionError(ValueError):
    """A model that cannot be converted; the message names the part and why."""


def check_out(out: Path) -> None:
    """OUT must be new or an empty folder: a conversion never writes into, or over, what a user has."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"'{out}' already exists and is not an empty folder; choose another OUT")


def placeholder_data(transforms: dict[str, dict], eval_size: int = 500) -> dict[str, Any]:
    """A data section for a converted run: the built-in world as training and evaluation source, so
    `coalign eval RUN` runs as it is; fine-tuning names its own data (dotted overrides, or a recipe)."""
    return {
        "train": {"source": "world", "split": "train", "size": 1000},
        "eval": {"world": {"source": "world", "split": "test", "size": eval_size}},
        "transforms": transforms,
        "batch_size": 256,
    }


def build_task(recipe: Recipe, run_dir: Path) -> Task:
    """The recipe's model and objectives, its transforms read from `run_dir` (as `load_run` does)."""
    transforms = build_transforms(recipe, views=False)
    for t in transforms.values():
        t.load(run_dir)
    return Task.from_specs(build_model(recipe, transforms), recipe.objectives, transforms)


def load_strict(task: Task, weights: dict[str, torch.Tensor], what: str) -> None:
    """Every tensor of the task from `weights`, shapes checked; a one-line error otherwise."""
    own = task.state_dict()
    missing = sorted(set(own) - set(weights))
    unused = sorted(set(weights) - set(own))
    if missing or unused:
        parts = [
            f"no weights for {', '.join(missing[:5])}" if missing else "",
            f"unused weights {', '.join(unused[:5])}" if unused else "",
        ]
        raise ConversionError(f"{what}: {'; '.join(p for p in parts if p)}")
    for key, value in weights.items():
        if own[key].shape != value.shape:
            raise ConversionError(
                f"{what}: {key} has shape {tuple(value.shape)}, the model needs {tuple(own[key].shape)}"
            )
    task.load_state_dict({k: v.to(own[k].dtype) for k, v in weights.items()})


def write_run(
    out: Path,
    raw_recipe: dict[str, Any],
    weights: dict[str, torch.Tensor],
    origin: dict[str, Any],
    vocabulary: Path | None = None,
) -> LoadedRun:
    """Build, fill and save the run; `vocabulary` is where the text transform reads its table from
    (the transforms save it into the run). Returns the run as `load_run` reads it back."""
    out = Path(out)
    check_out(out)
    recipe = validate_recipe(raw_recipe)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # a folder as mkdir makes it, not mkdtemp's owner-only one
    try:
        if vocabulary is not None:  # the text transform reads the table there and saves it into the run
            with_path = json.loads(json.dumps(raw_recipe))
            with_path["data"]["transforms"]["text"]["path"] = str(vocabulary)
            for t in build_transforms(validate_recipe(with_path), views=False).values():
                t.fit(None, tmp)
        task = build_task(recipe, tmp)
        load_strict(task, weights, origin.get("format", "checkpoint"))
        save_checkpoint(tmp, 0, task.state_dict(), {"step": 0, "imported": origin}, keep=1)
        (tmp / IMPORTED).write_text(json.dumps(origin, indent=2) + "\n")
        save_resolved(recipe, tmp / RECIPE_FILE)
        if out.exists():
            out.rmdir()  # empty (check_out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_run(out)
