"""What every benchmark's JSON says about the machine it ran on: figures differ by CPU generation
(AMX or AVX512_BF16 make bf16 several times faster than fp32; AVX2-only machines emulate it), so
each carries them."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

FLAGS = ("amx", "avx512_bf16", "avx512f", "avx2")  # the ones that decide matmul speed and precision


def describe() -> dict:
    """CPU model, the flags that matter, core count, and torch's view of it."""
    lines: list[str] = []
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    flags = next((set(ln.split(":", 1)[1].split()) for ln in lines if ln.startswith("flags")), set())
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    out = {
        "cpu": model or platform.processor() or platform.machine(),
        "cpu_flags": sorted(f for f in flags if f.startswith(FLAGS)),
        "cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),  # the cores here are often shared
    }
    with contextlib.suppress(ImportError):
        import torch

        from coalign.runtime import cpu_has_fast_bf16

        out |= {
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_fast_bf16": cpu_has_fast_bf16(),
            "torch": torch.__version__,
        }
    return out
