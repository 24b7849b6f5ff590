"""Device and precision choice. bf16 autocast pays on CUDA and on CPUs with AMX; elsewhere (plain
AVX2) bf16 matrix math is emulated and several times *slower* than fp32, so `auto` picks fp32 there."""

from __future__ import annotations

import contextlib

import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_fast_bf16() -> bool:
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if probe is not None and probe():
        return True
    return "AMX" in torch.backends.cpu.get_cpu_capability()


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
