"""Weight-space interpolation of two runs of one architecture (WiSE-FT, Wortsman et al. 2022): the
weights (1 - alpha) * A + alpha * B. With A a zero-shot (or pretrained) model and B its fine-tuned
version, intermediate alphas often keep most of B's gain on the fine-tuning data and most of A's
robustness elsewhere; OpenCLIP's maintainers point users who see forgetting after fine-tuning to it.

Library code (no command line): `coalign interpolate` (cli/interpolate.py) writes one interpolated
run folder, or evaluates a sweep of alphas into one table.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from coalign.build import RECIPE_FILE, LoadedRun, input_differences, load_run
from coalign.checkpoint import load_weights, model_weights, save_checkpoint
from coalign.config import save_resolved
from coalign.io import atomic_write_json
from coalign.registry import ConfigError

INFO_FILE = "interpolation.json"


def architecture_differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """What keeps two sets of weights from being interpolated: keys only one has, shapes that differ."""
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    shapes = sorted(k for k in set(a) & set(b) if a[k].shape != b[k].shape)
    out = []
    if only_a:
        out.append(f"{len(only_a)} tensors only in A (e.g. {only_a[0]})")
    if only_b:
        out.append(f"{len(only_b)} tensors only in B (e.g. {only_b[0]})")
    if shapes:
        k = shapes[0]
        out.append(f"{len(shapes)} of another shape (e.g. {k}: {tuple(a[k].shape)} vs {tuple(b[k].shape)})")
    return out


def interpolate_weights(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """(1 - alpha) * a + alpha * b for every floating-point tensor (computed in float32, stored in b's
    dtype); other tensors (batch-norm step counters) are b's."""
    out = {}
    for k, vb in b.items():
        va = a[k]
        if vb.is_floating_point():
            out[k] = torch.lerp(va.float(), vb.float(), alpha).to(vb.dtype)
        else:
            out[k] = vb.clone()
    return out


class Pair:
    """Two runs loaded and checked to have one architecture and the same inputs."""

    def __init__(self, a: str | Path, b: str | Path):
        self.a, self.b = load_run(a), load_run(b)
        self.weights_a, self.weights_b = load_weights(self.a.checkpoint), load_weights(self.b.checkpoint)
        problems = architecture_differences(self.weights_a, self.weights_b)
        problems += input_differences(self.a.transforms, self.b.transforms, self.b.model.modalities)
        if problems:
            raise ConfigError(
                f"cannot interpolate '{a}' and '{b}': they differ in architecture or inputs: "
                f"{'; '.join(problems)}"
            )

    def weights(self, alpha: float) -> dict[str, torch.Tensor]:
        """The task's interpolated weights (model and objectives: the temperature too)."""
        return interpolate_weights(self.weights_a, self.weights_b, alpha)

    def run(self, alpha: float) -> LoadedRun:
        """B's run with the interpolated model weights, in memory, ready to evaluate."""
        model = self.b.model
        weights = self.weights(alpha)
        model.load_state_dict(model_weights(weights))
        return LoadedRun(self.b.recipe, model, self.b.transforms, self.b.checkpoint, self.b.step)

    def write(self, alpha: float, out: Path) -> Path:
        """A run folder OUT that `coalign eval`, `embed`, `serve` and `model.init_from` read: B's recipe
        and transforms, and one checkpoint of the interpolated weights. Written into a hidden temporary
        folder and renamed into place, so OUT is whole or absent."""
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
        try:
            recipe = self.b.recipe.model_copy(deep=True)
            recipe.name = f"{recipe.name}-wise{alpha:g}"
            save_resolved(recipe, tmp / RECIPE_FILE)
            for t in self.b.transforms.values():
                t.save(tmp)
            info = {"a": str(self.a.checkpoint), "b": str(self.b.checkpoint), "alpha": alpha}
            atomic_write_json(tmp / INFO_FILE, info)
            save_checkpoint(tmp, self.b.step, self.weights(alpha), {"interpolation": info}, keep=1)
            if out.is_dir():
                out.rmdir()  # the caller checked it is empty
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out


def check_alphas(alphas: list[float]) -> None:
    bad = [a for a in alphas if not 0.0 <= a <= 1.0]
    if bad:
        raise ConfigError(f"alpha must lie in [0, 1] (0: A, 1: B), got {bad}")
