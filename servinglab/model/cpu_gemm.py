"""Faster bfloat16/float16 matrix products on the CPU: packed oneDNN weights, and sgemm for big batches.

On a CPU, a decode step of the lab engine spends about 70% of its time in the four
matrix products of each layer and the LM head, so the kernel behind ``F.linear`` decides
the engine's speed. Two measured facts (``servinglab bench gemm`` prints them) shape this module:

1. PyTorch hands a bfloat16 ``F.linear`` to oneDNN, which re-lays the weight into its
   blocked format on *every* call. Re-laying it once at load time
   (``torch.ops.mkldnn._reorder_linear_weight``) and calling oneDNN's linear on the packed
   copy runs the same kernel 5-25% faster. vLLM's CPU backend does the same with its own
   oneDNN wrapper (``onednn_mm`` over a pre-packed weight); PyTorch's inductor does it
   when it freezes a model.
2. On x86 CPUs without AMX tiles, oneDNN's AVX512-BF16 kernel reaches about 150 GFLOP/s
   on two cores, while MKL's float32 sgemm reaches about 250. From about 48 rows on (a
   prefill chunk, a big decode batch) the product is compute bound, and it is faster to
   widen the bfloat16 operands to float32 and call sgemm. The result is the bfloat16
   product all the same: a product of two bfloat16 numbers (8-bit significands; float16:
   11) is exact in float32 (24 bits), oneDNN accumulates in float32 too, and the output is rounded back
   to bfloat16, so only the summation order differs (as it does between any two GEMM
   kernels). Below 48 rows the product is bound by reading the weights, and the 2-byte
   packed copy wins. The copies cost memory: 2 bytes a weight packed plus 4 in float32
   (about 0.7 GB for SmolLM2-135M, against 0.27 GB for its bfloat16 weights).

End to end on ``servinglab bench throughput`` (2-core Xeon without AMX, bfloat16, one
run): plain ``F.linear`` 189 output tokens/s, packed weights 207, both tricks 242.

:func:`prepack_linears` swaps each ``nn.Linear`` of the decoder for a :class:`CpuLinear`
that shares the original weight (``state_dict`` is unchanged) and keeps its fast copies as
non-persistent buffers. ``SERVINGLAB_CPU_GEMM`` picks the strategy: ``auto`` (both
tricks; sgemm only without AMX), ``onednn`` (packed weights only) or ``torch`` (plain
``F.linear``, nothing changed). float32 models and GPU models are left alone.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from servinglab.model.dtypes import cpu_flags


ENV_VAR = "SERVINGLAB_CPU_GEMM"
# Kernel choices for bf16/fp16 matrix products on a CPU (EngineConfig.cpu_gemm validates against these).
CPU_GEMM_MODES: tuple[str, ...] = ("auto", "onednn", "torch")
MODES = CPU_GEMM_MODES
# The batch size oneDNN tunes the packed layout for: a full decode batch of the
# throughput workload (any number of rows still works; 16 and 256 measured 4-5% slower).
PACK_BATCH_HINT = 64
# From this many rows on, float32 sgemm beats the packed bfloat16 kernel on AVX-512 CPUs
# without AMX (break-even measured at 32-48 rows for SmolLM2's shapes).
SGEMM_MIN_ROWS = 48


def gemm_mode(mode: str | None = None) -> str:
    """``mode``, or the strategy ``SERVINGLAB_CPU_GEMM`` asks for (default ``auto``); raise on an unknown one."""
    name = "cpu_gemm" if mode is not None else ENV_VAR
    mode = mode if mode is not None else os.environ.get(ENV_VAR, "auto")
    if mode not in MODES:
        raise ValueError(f"{name} must be one of {MODES}, got {mode!r}")
    return mode


def cpu_has_amx() -> bool:
    """Whether the CPU has AMX tiles for bfloat16 (then oneDNN's bfloat16 kernel is the fast one)."""
    return "amx_bf16" in cpu_flags()


def uses_sgemm(mode: str | None, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether ``mode`` adds float32 sgemm for big batches on this CPU (``auto``, no AMX, and measured faster)."""
    return gemm_mode(mode) == "auto" and not cpu_has_amx() and sgemm_beats_packed(dtype)


@functools.cache
def sgemm_beats_packed(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Measure once per process whether float32 sgemm beats the packed kernel at a big batch.

    Which one wins depends on the CPU, not only on its flags: on a 2-core Xeon with
    AVX512-BF16 (no AMX) sgemm was 1.28x faster end to end, on a 2-core AMD EPYC Zen 5 with
    AVX512-BF16 the packed bf16 kernel was 2.1x faster (``bench throughput --lab-cpu-gemm
    auto onednn torch``, one run each). So ``auto`` times both on SmolLM2's MLP shape
    (64 rows x 576 -> 1536), best of 5, and keeps sgemm only for a clear win (> 10%).
    """
    import time

    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(1536, 576, generator=gen) * 0.02).to(dtype)
    x = torch.randn(64, 576, generator=gen).to(dtype)
    fast = CpuLinear.from_weight(weight, None, sgemm=True)

    def best(fn) -> float:
        times = []
        for _ in range(6):
            start = time.perf_counter()
            for _ in range(4):
                fn(x)
            times.append(time.perf_counter() - start)
        return min(times[1:])  # the first call warms the kernel up

    with torch.inference_mode():
        return best(fast.forward_sgemm) * 1.1 < best(fast.forward_packed)


def packing_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether this PyTorch build can pack ``dtype`` weights for oneDNN on ``device``."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return False
    ops = torch.ops.mkldnn
    if not torch.backends.mkldnn.is_available() or not hasattr(ops, "_reorder_linear_weight"):
        return False
    check = ops._is_mkldnn_bf16_supported if dtype == torch.bfloat16 else ops._is_mkldnn_fp16_supported
    return bool(check())


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """Re-lay a ``[out, in]`` weight into oneDNN's blocked format (an opaque mkldnn tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH_HINT)


class CpuLinear(nn.Linear):
    """An ``nn.Linear`` that runs on a packed copy of its weight, or on sgemm for many rows.

    ``weight`` and ``bias`` stay the parameters of the module it was made from (no copy),
    so saving and converting the model see no difference. Make a new one after changing
    the weight.
    """

    packed: torch.Tensor
    weight_f32: torch.Tensor | None
    bias_f32: torch.Tensor | None

    @classmethod
    def from_linear(cls, linear: nn.Linear, sgemm: bool) -> CpuLinear:
        """Wrap ``linear``'s parameters and build the fast copies (``sgemm``: also a float32 one)."""
        return cls.from_weight(linear.weight, linear.bias, sgemm)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, sgemm: bool) -> CpuLinear:
        """A :class:`CpuLinear` over an existing ``[out, in]`` weight (e.g. tied embeddings)."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.out_features, module.in_features = weight.shape
        module.weight, module.bias = weight, bias
        module.register_buffer("packed", pack_weight(weight), persistent=False)
        f32 = (lambda t: None if t is None else t.detach().float()) if sgemm else (lambda t: None)
        module.register_buffer("weight_f32", f32(weight), persistent=False)
        module.register_buffer("bias_f32", f32(bias), persistent=False)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ weight.T + bias`` in ``x``'s dtype, by whichever kernel is faster for its size."""
        if self.weight_f32 is not None and x.numel() >= SGEMM_MIN_ROWS * self.in_features:
            return self.forward_sgemm(x)
        return self.forward_packed(x)

    def forward_packed(self, x: torch.Tensor) -> torch.Tensor:
        """oneDNN's linear on the packed weight (module docstring, 1.)."""
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def forward_sgemm(self, x: torch.Tensor) -> torch.Tensor:
        """Exact widening to float32, sgemm, one rounding back (module docstring, 2.)."""
        if self.weight_f32 is None:
            raise RuntimeError("this CpuLinear was built without a float32 copy (sgemm=False)")
        return F.linear(x.float(), self.weight_f32, self.bias_f32).to(x.dtype)


def _agrees(fast: CpuLinear) -> bool:
    """One-off check, on random rows, that both fast paths match ``F.linear``."""
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for rows in (3, SGEMM_MIN_ROWS):
            x = torch.randn(rows, fast.in_features, generator=gen).to(fast.weight.dtype)
            want, got = F.linear(x, fast.weight, fast.bias).float(), fast(x).float()
            if not torch.allclose(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()) + 1e-6):
                return False
    return True


def prepack_linears(model: nn.Module, mode: str | None = None) -> int:
    """Swap every ``nn.Linear`` under ``model`` for a :class:`CpuLinear`; return how many.

    Args:
        model: a module whose parameters are all on one device, in one dtype.
        mode: ``auto`` (packed weights, plus float32 copies for big batches when the CPU
            has no AMX), ``onednn`` (packed only) or ``torch`` (change nothing); ``None``
            reads ``SERVINGLAB_CPU_GEMM``.

    Returns 0, changing nothing, for float32 or GPU models, when the mode is ``torch``,
    when this PyTorch cannot pack the dtype, or when a packed product disagrees with
    ``F.linear``.
    """
    first = next(model.parameters(), None)
    mode = gemm_mode(mode)
    if first is None or mode == "torch" or not packing_supported(first.dtype, first.device):
        return 0
    sgemm = uses_sgemm(mode, first.dtype)
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear]
    try:
        fast = [CpuLinear.from_linear(child, sgemm) for _, _, child in targets]
    except RuntimeError:  # a oneDNN build that cannot reorder this dtype after all
        return 0
    if not fast or not _agrees(fast[0]):
        return 0
    for (parent, name, _), module in zip(targets, fast):
        setattr(parent, name, module)
    return len(fast)
