"""Where and how tensors run: one `Runtime` (device + precision) passed to everything that computes.

bf16 autocast pays on CUDA and on CPUs with bf16 dot products (AMX, or AVX512_BF16 as on AMD's EPYC);
elsewhere (plain AVX2 or AVX-512) bf16 matrix math is emulated and several times *slower* than fp32,
so `auto` picks fp32 there. Training, evaluation, suites, few-shot, embedding and serving all take a
Runtime, so each runs on the GPU when there is one and none of them carries its own "autocast or
nothing" fallback.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch

PRECISIONS = ("auto", "fp32", "bf16")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# oneDNN ISA caps (`ONEDNN_MAX_CPU_ISA`) that keep its native bf16 kernels: AVX512_CORE_BF16 and
# every ISA above it (AVX512_CORE_FP16, the AVX10 and AMX ones); unset or ALL caps nothing
_NATIVE_BF16_CAPS = ("BF16", "FP16", "AMX", "AVX10")


def cpu_has_fast_bf16() -> bool:
    """bf16 dot products in the CPU (AMX tiles, or AVX512_BF16's), and oneDNN, which runs the bf16
    matmuls, allowed to use them. A cap below (`ONEDNN_MAX_CPU_ISA=AVX2` or `AVX512_CORE`, as
    containers and benchmark scripts set) makes bf16 matmuls emulated. Measured with
    (8320, 192) @ (192, 768), one thread, bf16 against fp32, in GFLOP/s. On the AMX Xeon at
    AVX2: 1.5 against 89. On an AMD EPYC with AVX512_BF16 and no AMX: 439 against 89 uncapped,
    404 at AVX512_CORE_BF16, 72 at AVX512_CORE, 2.3 at AVX2."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "ALL")).upper()
    if isa not in ("ALL", "DEFAULT", "") and not any(tag in isa for tag in _NATIVE_BF16_CAPS):
        return False
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        probe = getattr(torch.cpu, name, None)
        if probe is not None and probe():
            return True
    return "AMX" in torch.backends.cpu.get_cpu_capability()


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision '{precision}' is not one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # "fp32" or "bf16", already resolved

    @classmethod
    def create(cls, precision: str = "auto", device: str | torch.device | None = None) -> Runtime:
        """`auto` device: CUDA when there is one; `auto` precision: see the module docstring."""
        dev = torch.device(device) if device is not None else default_device()
        return cls(dev, resolve_precision(precision, dev))

    @classmethod
    def cpu(cls) -> Runtime:
        """fp32 on the CPU: what tests and reference computations use."""
        return cls(torch.device("cpu"), "fp32")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Tensors of a batch dict (one level deep, and the `present`/`label` dicts) on this device."""
        if self.device.type == "cpu":
            return batch
        return {k: self._move(v) for k, v in batch.items()}

    def _move(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(self.device, non_blocking=True)
        if isinstance(value, dict) and all(isinstance(v, torch.Tensor) for v in value.values()):
            return {k: v.to(self.device, non_blocking=True) for k, v in value.items()}
        return value

    def __str__(self) -> str:
        return f"{self.device} ({self.precision})"
