"""`precision: auto` on the CPU: bf16 only where AMX runs it, i.e. AMX in the CPU and oneDNN not capped
below it (a capped oneDNN emulates bf16 matmuls, dozens of times slower than fp32)."""

from __future__ import annotations

import pytest
import torch

from coalign import runtime
from coalign.runtime import Runtime, cpu_has_fast_bf16, resolve_precision

CPU = torch.device("cpu")


@pytest.fixture
def amx(monkeypatch):
    """A CPU that has AMX, whatever this machine has; no oneDNN cap."""
    monkeypatch.setattr(runtime.torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)


def test_auto_is_bf16_with_amx_and_fp32_without(amx, monkeypatch):
    assert cpu_has_fast_bf16() and resolve_precision("auto", CPU) == "bf16"
    monkeypatch.setattr(runtime.torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(runtime.torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not cpu_has_fast_bf16() and resolve_precision("auto", CPU) == "fp32"


@pytest.mark.parametrize("cap", ["AVX2", "avx512_core_bf16", "AVX512_CORE"])
def test_a_onednn_cap_below_amx_keeps_fp32(amx, monkeypatch, cap):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert resolve_precision("auto", CPU) == "fp32"
    assert Runtime.create("bf16", "cpu").precision == "bf16"  # asked for explicitly: given


@pytest.mark.parametrize("cap", ["ALL", "AVX512_CORE_AMX", "avx10_1_512_amx_fp16"])
def test_a_cap_that_allows_amx_keeps_bf16(amx, monkeypatch, cap):
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", cap)  # oneDNN's older name of the same variable
    assert resolve_precision("auto", CPU) == "bf16"


def test_an_unknown_precision_names_the_valid_ones():
    with pytest.raises(ValueError, match="precision 'fp16' is not one of auto, fp32, bf16"):
        resolve_precision("fp16", CPU)
