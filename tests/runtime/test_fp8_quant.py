"""FP8 activation quantization in one pass, and the projections bench's crossover report.

On a CPU the kernel runs in Triton's interpreter, whose float32 -> e4m3 conversion does not
round to nearest (127.0 becomes 64.0 there), so the CPU test checks the scales and the
argument checks; the codes are compared with PyTorch's cast (round to nearest even, as the
GPU's ``cvt.rn.satfinite``) on CUDA, where they must be equal, not close.
"""

from __future__ import annotations

import pytest
import torch

from servinglab.bench.quant_gemm import ProjectionRow, crossovers
from servinglab.model.triton.fp8_quant import E4M3_MAX, quantize_rows_fp8

CUDA = torch.cuda.is_available()


def reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.float().abs().amax(1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def test_scales_per_row_and_zero_rows_on_any_device():
    device = "cuda" if CUDA else "cpu"
    x = torch.randn(6, 576, dtype=torch.bfloat16, device=device) * torch.arange(1, 7, device=device)[:, None]
    x[3] = 0
    codes, scale = quantize_rows_fp8(x)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == x.shape and scale.shape == (6, 1)
    torch.testing.assert_close(scale, reference(x)[1], rtol=0, atol=0)
    assert bool((codes[3].float() == 0).all()), "a zero row must give zero codes, not NaN"
    assert E4M3_MAX == torch.finfo(torch.float8_e4m3fn).max


@pytest.mark.parametrize("shape, message", [((4,), "contiguous rows"), ((2, 20000), "K must be <= 16384")])
def test_bad_input_is_named(shape, message):
    with pytest.raises(ValueError, match=message):
        quantize_rows_fp8(torch.zeros(*shape, dtype=torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (the interpreter's e4m3 conversion does not round to nearest)")
@pytest.mark.parametrize("k", [576, 2048, 8192])
def test_codes_equal_torchs_cast_on_cuda(k):
    x = torch.randn(33, k, dtype=torch.bfloat16, device="cuda")
    codes, scale = quantize_rows_fp8(x)
    want, want_scale = reference(x)
    torch.testing.assert_close(scale, want_scale, rtol=0, atol=0)
    assert torch.equal(codes.view(torch.uint8), want.view(torch.uint8))


def test_crossover_is_the_smallest_measured_m_that_wins():
    rows = [ProjectionRow("bf16", m, ms, 1.0, 100) for m, ms in ((1, 1.0), (512, 2.0), (8192, 30.0))]
    rows += [ProjectionRow("fp8", m, ms, 1.0, 50) for m, ms in ((1, 1.5), (512, 1.9), (8192, 20.0))]
    rows += [ProjectionRow("slow", m, ms, 1.0, 50) for m, ms in ((1, 1.5), (512, 2.5), (8192, 31.0))]
    rows += [ProjectionRow("absent", 1, None, 1.0, 0)]
    assert crossovers(rows) == ["- fp8: faster than bf16 at M = 512, 8192 (crossover M = 512), of M = 1, 512, 8192",
                                "- slow: never faster than bf16, of M = 1, 512, 8192"]
