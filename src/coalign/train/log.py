"""Metrics to JSONL (always) and TensorBoard (when installed), plus the progress bar."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from coalign.io import atomic_write_text


def drop_rows_after(path: Path, step: int, final: bool = False) -> int:
    """Remove the rows of steps after `step` from a metrics log (the steps a resumed run replays, so
    they are not logged twice), and with `final` the evaluation rows of `step` itself (a run resumed
    at its last step evaluates again); a torn last line from a kill is dropped too. Returns rows
    removed."""
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            ok = int(row["step"]) < step or (
                int(row["step"]) == step and not (final and row["kind"] == "eval")
            )
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok:
            keep.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(f"{line}\n" for line in keep))
    return dropped


class MetricLogger:
    """`enabled=False` (ranks other than 0 under torchrun) writes and prints nothing."""

    def __init__(
        self, run_dir: Path, total_steps: int, start_step: int, progress: bool = True, enabled: bool = True
    ):
        self.enabled = enabled
        self.samples_since = 0
        self.t_since = time.perf_counter()
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            disable=not (progress and enabled),
            dynamic_ncols=True,
            unit="step",
        )
        if not enabled:
            self.file, self.tb = None, None
            return
        self.path = run_dir / "metrics.jsonl"
        drop_rows_after(self.path, start_step, final=start_step >= total_steps)
        self.file = self.path.open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides the events of replayed steps, as the JSONL log drops them
            self.tb = SummaryWriter(
                str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None
            )
        except ImportError:  # tensorboard is a dependency, but a stripped install still trains
            self.tb = None

    def count(self, samples: int) -> None:
        self.samples_since += samples
        self.bar.update(1)

    def throughput(self) -> float:
        """Samples per second since the last call."""
        now = time.perf_counter()
        rate = self.samples_since / max(now - self.t_since, 1e-9)
        self.samples_since, self.t_since = 0, now
        return rate

    def log(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}
        self.file.write(json.dumps({"step": step, "kind": kind, **clean}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in clean.items():
                self.tb.add_scalar(f"{kind}/{k}", v, step)
        if kind == "train":
            shown = {k: f"{clean[k]:.3f}" for k in ("loss",) if k in clean}
            if "samples_per_s" in clean:
                shown["samples/s"] = f"{clean['samples_per_s']:.0f}"
            self.bar.set_postfix(shown)

    def write(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
