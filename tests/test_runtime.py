"""`precision: auto` on the CPU: bf16 only where the CPU has bf16 dot products (AMX, or AVX512_BF16)
and oneDNN is not capped below them (a capped oneDNN emulates bf16 matmuls, up to dozens of times
slower than fp32)."""

from __future__ import annotations

import pytest
import torch

from coalign import runtime
from coalign.runtime import Runtime, cpu_has_fast_bf16, resolve_precision

CPU = torch.device("cpu")


def _cpu(monkeypatch, amx: bool, avx512_bf16: bool) -> None:
    """A CPU with these bf16 units, whatever this machine has; no oneDNN cap."""
    monkeypatch.setattr(runtime.torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(runtime.torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(runtime.torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)


@pytest.fixture
def amx(monkeypatch):
    _cpu(monkeypatch, amx=True, avx512_bf16=True)


@pytest.mark.parametrize(
    ("has_amx", "has_avx512_bf16", "expected"),
    [(True, True, "bf16"), (False, True, "bf16"), (False, False, "fp32")],  # Xeon 4th gen, EPYC, AVX2
)
def test_auto_is_bf16_where_the_cpu_has_bf16_dot_products(monkeypatch, has_amx, has_avx512_bf16, expected):
    _cpu(monkeypatch, has_amx, has_avx512_bf16)
    assert cpu_has_fast_bf16() is (expected == "bf16")
    assert resolve_precision("auto", CPU) == expected


@pytest.mark.parametrize("cap", ["AVX2", "AVX512_CORE", "avx512_core_vnni", "AVX2_VNNI_2"])
def test_a_onednn_cap_below_native_bf16_keeps_fp32(amx, monkeypatch, cap):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert resolve_precision("auto", CPU) == "fp32"
    assert Runtime.create("bf16", "cpu").precision == "bf16"  # asked for explicitly: given


@pytest.mark.parametrize("cap", ["ALL", "avx512_core_bf16", "AVX512_CORE_AMX", "avx10_1_512_amx_fp16"])
def test_a_cap_that_allows_native_bf16_keeps_bf16(amx, monkeypatch, cap):
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", cap)  # oneDNN's older name of the same variable
    assert resolve_precision("auto", CPU) == "bf16"


def test_an_unknown_precision_names_the_valid_ones():
    with pytest.raises(ValueError, match="precision 'fp16' is not one of auto, fp32, bf16"):
        resolve_precision("fp16", CPU)
