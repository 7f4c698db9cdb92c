"""``dtype="auto"`` follows the hardware: bfloat16 where it is native, float32 where it would be emulated."""

from __future__ import annotations

import pytest
import torch

from servinglab.cli import DTYPE_CHOICES as CLI_DTYPES
from servinglab.engine.config import EngineConfig
from servinglab.model import dtypes


def test_cli_choices_match_the_engine():
    assert set(CLI_DTYPES) == set(dtypes.DTYPE_CHOICES)


@pytest.mark.parametrize("flags,want", [
    ({"avx2", "fma"}, "float32"),  # AMD Zen 3, older Intel: bf16 only emulated
    ({"avx2", "avx512f", "avx512_bf16"}, "bfloat16"),  # Zen 4/5, Cooper Lake, Sapphire Rapids
    ({"avx2", "avx512f", "amx_tile", "amx_bf16"}, "bfloat16"),
    ({"asimd", "bf16"}, "bfloat16"),  # ARM with FEAT_BF16 (Neoverse V1/V2, Graviton 3/4)
    (set(), "float32"),  # no /proc/cpuinfo (macOS, Windows)
])
def test_auto_on_a_cpu(monkeypatch, flags, want):
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert dtypes.resolve_dtype("auto", "cpu") == want
    assert EngineConfig(device="cpu").torch_dtype == getattr(torch, want)


def test_an_onednn_isa_cap_below_bf16_means_float32(monkeypatch):
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert dtypes.resolve_dtype("auto", "cpu") == "float32"


def test_explicit_dtypes_pass_through_and_bad_ones_name_the_choices():
    assert dtypes.resolve_dtype("float16", "cpu") == "float16"
    assert EngineConfig(dtype="float32").resolved_dtype == "float32"
    with pytest.raises(ValueError, match=r"dtype must be one of \['auto', 'float32', 'bfloat16', 'float16'\]"):
        EngineConfig(dtype="fp32")


def test_the_doctor_line_names_the_cpu():
    assert dtypes.cpu_summary().split()[0]
