"""Graded tests for Part 8b: the fused dequantizing matrix product in Triton.

Expected values are ``x @ w_hat.T`` computed here in float64, where ``w_hat`` is the
dequantized weight written out with plain torch from the codes and scales (not with
your Part 8a functions), so a kernel is compared with the layout Part 8a's docstring
defines. Correctness runs everywhere: compiled on CUDA, through Triton's interpreter on
a CPU (``tests/conftest.py`` sets ``TRITON_INTERPRET=1``), on small float32 shapes,
which keeps them cheap. The speed and memory checks need CUDA and are skipped (reported
*blocked*) without it.

Weights are built so that the mistakes a kernel is likely to make change the answer:
rows and groups of very different magnitudes (a scale applied per tensor or per row
instead of per group is far off), random codes in both nibbles (the two nibbles of a
byte swapped pair each code with the wrong activation column), all-zero groups and
rows quantized by your Part 8a code (they must come out exactly 0), more split-K
slices than K blocks (an empty slice must still count in, or its tile is never
written), and two calls in a row (the split-K counters must be reset).

Planted mistakes these tests were checked against (each must fail at least two graded
tests): the two nibbles of a byte swapped in the kernel fails the two INT4 decode
cases, the tiled case, the empty-slice case, the Part 8a agreement case for INT4 and
both zero-group cases (7 tests); a scale applied per tensor instead of per group fails
the same 7; a missing zero-group guard in Part 8a's ``quantize_int4`` (scale 0 / 0 for an
all-zero group) goes unseen here, since the kernel multiplies a zero code by any scale,
but fails Part 8a's ``test_int4_zero_and_constant_groups`` and Part 8c's
``test_zero_group_and_dead_input_stay_finite`` (GPTQ divides by that scale and the NaN
spreads along the row).
"""

from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (bf16 speed and memory checks)")
pytestmark = pytest.mark.part(8)


def mixed_weight(n: int, k: int, group: int, seed: int) -> torch.Tensor:
    """Groups of ``group`` columns whose magnitudes span 1e-2..1e1 (differently in each row)."""
    gen = torch.Generator().manual_seed(seed)
    mags = 10 ** (3 * torch.rand(n, k // group, 1, generator=gen) - 2)
    return (torch.randn(n, k // group, group, generator=gen) * mags).reshape(n, k)


def int8_reference(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    w_hat = q.double().cpu() * scales.double().cpu()[:, None]
    return x.double().cpu() @ w_hat.T


def int4_reference(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    b = packed.cpu().to(torch.int16)
    codes = torch.stack((b & 15, b >> 4), dim=-1).flatten(-2) - 8  # low nibble = even column
    w_hat = codes.double() * scales.double().cpu().repeat_interleave(group, dim=1)
    return x.double().cpu() @ w_hat.T


def random_int4(n: int, k: int, group: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random packed codes in [-7, 7] and per-group scales spanning 1e-3..1e1 (no Part 8a involved)."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-7, 8, (n, k), generator=gen)
    packed = ((codes[:, 0::2] + 8) | ((codes[:, 1::2] + 8) << 4)).to(torch.uint8)
    scales = 10 ** (4 * torch.rand(n, k // group, generator=gen) - 3)
    return packed, scales.float()


def check(out: torch.Tensor, expected: torch.Tensor, x: torch.Tensor, what: str) -> None:
    assert out.dtype == x.dtype and out.device == x.device, f"{what}: the output must keep x's dtype and device"
    assert tuple(out.shape) == tuple(expected.shape), f"{what}: shape {tuple(out.shape)}, expected {tuple(expected.shape)}"
    got = out.double().cpu()
    assert bool(torch.isfinite(got).all()), f"{what}: the output has NaN or inf (a zero scale? an unwritten tile?)"
    err = float((got - expected).abs().max())
    tol = 1e-5 * float(expected.abs().max()) + 1e-6
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g}: check the nibble order, which scale each block uses, the split-K sum"


@pytest.mark.points(1)
@pytest.mark.parametrize("split_k", [1, 3])
def test_int8_decode_rows(quant_gemm_triton, split_k):
    """M = 3 rows, N = 40 (not a multiple of the tile), rows of mixed magnitude, with and without split-K."""
    gen = torch.Generator().manual_seed(split_k)
    q = torch.randint(-127, 128, (40, 192), generator=gen, dtype=torch.int8)
    scales = (10 ** (3 * torch.rand(40, generator=gen) - 2)).float()
    x = torch.randn(3, 192, generator=gen)
    out = quant_gemm_triton.quant_matmul(x.to(DEVICE), q.to(DEVICE), scales.to(DEVICE), None,
                                         block_n=16, block_k=64, split_k=split_k)
    check(out, int8_reference(x, q, scales), x.to(DEVICE), f"int8 split_k={split_k}")


@pytest.mark.points(1)
@pytest.mark.parametrize("group,split_k", [(32, 1), (64, 2)])
def test_int4_decode_rows(quant_gemm_triton, group, split_k):
    """M = 1 and 2 rows through the split-K decode shape; random codes, per-group scales of many magnitudes."""
    packed, scales = random_int4(48, 256, group, seed=group)
    for m in (1, 2):
        x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m))
        out = quant_gemm_triton.quant_matmul(x.to(DEVICE), packed.to(DEVICE), scales.to(DEVICE), group,
                                             block_n=16, block_k=32, split_k=split_k)
        check(out, int4_reference(x, packed, scales, group), x.to(DEVICE), f"int4 g{group} M={m} split_k={split_k}")


@pytest.mark.points(1)
def test_int4_tiled_larger_m(quant_gemm_triton):
    """M = 40 rows in 32-row tiles (the prefill shape): a ragged last row block and column block."""
    packed, scales = random_int4(72, 128, 64, seed=7)
    x = torch.randn(40, 128, generator=torch.Generator().manual_seed(8))
    out = quant_gemm_triton.quant_matmul(x.to(DEVICE), packed.to(DEVICE), scales.to(DEVICE), 64,
                                         block_m=32, block_n=32, block_k=64, split_k=1)
    check(out, int4_reference(x, packed, scales, 64), x.to(DEVICE), "int4 tiled M=40")


@pytest.mark.points(1)
def test_empty_split_k_slices_and_repeated_calls(quant_gemm_triton):
    """8 slices over 2 K blocks (6 slices get no block) and two calls in a row: same, right answer."""
    packed, scales = random_int4(32, 64, 32, seed=9)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(10)).to(DEVICE)
    expected = int4_reference(x, packed, scales, 32)
    for call in range(2):
        out = quant_gemm_triton.quant_matmul(x, packed.to(DEVICE), scales.to(DEVICE), 32, block_n=16, block_k=32, split_k=8)
        check(out, expected, x, f"call {call + 1} with 8 slices over 2 blocks")


@pytest.mark.points(1)
@pytest.mark.parametrize("method,group", [("int8", None), ("int4", 64)])
def test_agrees_with_part8a(quant_gemm_triton, quantization, method, group):
    """Your Part 8a codes of a mixed-magnitude weight, multiplied by the kernel = ``QuantLinear`` (float32)."""
    w = mixed_weight(24, 128, 64, seed=11)
    q, scales = quantization.quantize_int8(w) if method == "int8" else quantization.quantize_int4(w, group)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(12))
    out = quant_gemm_triton.quant_matmul(x.to(DEVICE), q.to(DEVICE), scales.to(DEVICE), group, block_n=16, block_k=32, split_k=2)
    w_hat = quantization.dequantize_int8(q, scales) if method == "int8" else quantization.dequantize_int4(q, scales, group)
    check(out, x.double() @ w_hat.double().T, x.to(DEVICE), f"{method} against Part 8a")


@pytest.mark.points(1)
@pytest.mark.parametrize("block_m,split_k", [(16, 2), (32, 1)], ids=["decode", "tiled"])
def test_zero_groups_and_rows_from_part8a(quant_gemm_triton, quantization, block_m, split_k):
    """All-zero groups and an all-zero row, quantized by your Part 8a: finite, and zero where the weight is."""
    w = mixed_weight(20, 128, 32, seed=13)
    w[:, 32:64] = 0.0
    w[3] = 0.0
    packed, scales = quantization.quantize_int4(w, 32)
    x = torch.randn(18, 128, generator=torch.Generator().manual_seed(14))
    rows = 3 if block_m == 16 else 18
    out = quant_gemm_triton.quant_matmul(x[:rows].to(DEVICE), packed.to(DEVICE), scales.to(DEVICE), 32,
                                         block_m=block_m, block_n=16, block_k=32, split_k=split_k)
    expected = x[:rows].double() @ quantization.dequantize_int4(packed, scales, 32).double().T
    check(out, expected, x[:rows].to(DEVICE), "zero groups")
    assert bool((out[:, 3] == 0).all()), "an all-zero weight row must give exactly 0"


# ------------------------------------------------------------------ CUDA only
def _bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


@pytest.mark.points(1)
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("group", [None, 64], ids=["int8", "int4"])
def test_bf16_decode_is_close_and_allocates_no_weight_on_cuda(quant_gemm_triton, group):
    """bf16 activations on SmolLM2-1.7B's ``down_proj`` shape: close to the float64 answer, and no
    dequantized ``[N, K]`` weight is allocated (only the output and the split-K workspace)."""
    gen = torch.Generator().manual_seed(15)
    n, k = 2048, 8192
    if group is None:
        q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
        scales = torch.rand(n, generator=gen) / 100
        expected_fn = int8_reference
    else:
        q, scales = random_int4(n, k, group, seed=15)
        expected_fn = lambda x, q, s: int4_reference(x, q, s, group)  # noqa: E731
    x = torch.randn(4, k, generator=gen).to(torch.bfloat16)
    q, s, xd = q.cuda(), scales.float().cuda(), x.cuda()
    out = quant_gemm_triton.quant_matmul(xd, q, s, group)
    expected = expected_fn(x, q, s)
    err = float((out.double().cpu() - expected).abs().max())
    assert err <= 2e-2 * float(expected.abs().max()), f"bf16 error {err:.3g}"
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    quant_gemm_triton.quant_matmul(xd, q, s, group)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < n * k // 4, f"the call allocated {extra} bytes: a dequantized weight would be {2 * n * k}"


@pytest.mark.points(1)
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("group", [None, 64], ids=["int8", "int4"])
def test_faster_than_dequantize_then_matmul_on_cuda(quant_gemm_triton, quantization, group):
    """Decode rows through ``gate_up`` of SmolLM2-1.7B ([16384, 2048]): the fused kernel must beat Part 8a's
    ``QuantLinear`` forward (dequantize the weight, then ``F.linear``), measured side by side (medians)."""
    n, k = 16384, 2048
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / 40
    lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    lin.weight.copy_(w)
    layer = quantization.QuantLinear.from_linear(lin, "int8" if group is None else "int4", group or 64)
    for m in (1, 16):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ours = _bench(lambda: quant_gemm_triton.quant_matmul(x, layer.qweight, layer.scales, group))
        unfused = _bench(lambda: layer(x))
        assert ours < unfused, f"M={m}: fused {ours * 1e3:.1f} us vs dequantize + F.linear {unfused * 1e3:.1f} us"
