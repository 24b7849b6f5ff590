"""Metrics to JSONL (always) and TensorBoard (when installed), plus the progress bar."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


class MetricLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, progress: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.file = self.path.open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # tensorboard is a dependency, but a stripped install still trains
            self.tb = None
        self.bar = tqdm(
            total=total_steps, initial=start_step, disable=not progress, dynamic_ncols=True, unit="step"
        )
        self.samples_since = 0
        self.t_since = time.perf_counter()

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
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
        self.file.close()
        if self.tb is not None:
            self.tb.close()
