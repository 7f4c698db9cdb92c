"""Graded tests for Part 8a: symmetric INT8 per output channel, group-wise INT4, QuantLinear.

The error bound is the one the module docstring derives: round-to-nearest moves every
element by at most half a quantization step, ``|w - q * scale| <= scale / 2``, where the
step ``scale = max|w| / qmax`` belongs to the element's row (INT8) or group (INT4). The
checks allow float32 rounding on top (a few ulps of the row's largest magnitude).

Bugs these tests guard against, each caught by at least two of them (one hand-computed
case with exact codes, bytes and scales, and one property or reference comparison;
``scripts/mutation_check.py`` plants them): INT4 codes rounded half up, as floor of
x plus one half, instead of half to even, which breaks the odd symmetry INT8 and INT4
share; the two nibbles of a byte swapped, in pack and unpack alike, so that a round
trip still works but the bytes are not the documented layout; an all-zero row or
group given a scale of 0 instead of 1.0; the divisor 128 instead of 127; a per-tensor
scale instead of one per row, or a per-row scale instead of one per group; a
QuantLinear that drops the bias or keeps a float copy of the weight.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.part(8)

SLACK = 4e-7  # float32 rounding allowed on top of half a step, relative to the group's max |w|


def rows_of_mixed_magnitude(out: int = 8, cols: int = 256, seed: int = 0) -> torch.Tensor:
    """Rows whose magnitudes span 1e-3..1e2, so one shared scale would be far too coarse for the small rows."""
    gen = torch.Generator().manual_seed(seed)
    magnitudes = torch.logspace(-3, 2, out)[:, None]
    return torch.randn(out, cols, generator=gen) * magnitudes


def assert_within_half_step(w: torch.Tensor, w_hat: torch.Tensor, step: torch.Tensor, absmax: torch.Tensor, what: str) -> None:
    err = (w.float() - w_hat.float()).abs()
    bound = step / 2 + SLACK * absmax
    worst = float((err - bound).max())
    assert worst <= 0, (
        f"{what}: an element moved by more than half a quantization step (scale / 2) when quantized "
        f"and dequantized (excess {worst:.3g}): round to the nearest code, do not truncate"
    )


# ----------------------------------------------------------------------------- INT8
@pytest.mark.points(1)
def test_int8_shapes_and_dtypes(quantization):
    w = torch.randn(12, 64)
    q, scales = quantization.quantize_int8(w)
    assert q.dtype == torch.int8 and tuple(q.shape) == (12, 64), f"q must be int8 [out, in] = [12, 64], got {q.dtype} {tuple(q.shape)}"
    assert scales.dtype == torch.float32 and tuple(scales.shape) == (12,), (
        f"scales must be float32 [out] = [12] (one per output channel), got {scales.dtype} {tuple(scales.shape)}"
    )
    assert int(q.abs().max()) <= 127 and int(q.min()) >= -127, "int8 codes must lie in [-127, 127] (symmetric: -128 is unused)"


@pytest.mark.points(2)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_round_trip_within_half_step(quantization, dtype):
    w = rows_of_mixed_magnitude().to(dtype)
    q, scales = quantization.quantize_int8(w)
    w_hat = quantization.dequantize_int8(q, scales)
    assert w_hat.dtype == torch.float32 and w_hat.shape == w.shape, "dequantize_int8 returns float32 [out, in] by default"
    absmax = w.float().abs().amax(dim=1, keepdim=True)
    assert_within_half_step(w, w_hat, scales[:, None], absmax, "int8 round trip")
    assert quantization.dequantize_int8(q, scales, torch.bfloat16).dtype == torch.bfloat16, "dequantize_int8(..., dtype) must return that dtype"


@pytest.mark.points(2)
def test_int8_scale_is_per_output_channel(quantization):
    w = rows_of_mixed_magnitude()
    q, scales = quantization.quantize_int8(w)
    absmax = w.abs().amax(dim=1)
    torch.testing.assert_close(scales, absmax / 127, rtol=1e-6, atol=0, msg="scales[n] must be max_k |w[n, k]| / 127 for each row n (per channel, not per tensor)")
    row_max = q.abs().amax(dim=1)
    assert bool((row_max == 127).all()), (
        f"every row's largest |w| must map to code +-127; row maxima were {row_max.tolist()} "
        "(a single scale for the whole tensor leaves small rows with few or no levels)"
    )


@pytest.mark.points(2)
def test_int8_exact_codes_and_symmetric_rounding(quantization):
    # Row 0: scale = 127 / 127 = 1 exactly, so the codes are round(w). Row 1 is all zero: scale 1.0, codes 0.
    w = torch.tensor([[127.0, -63.4, 0.6, -0.4, 1.2, -2.7, 0.0], [0.0] * 7])
    q, scales = quantization.quantize_int8(w)
    assert scales.tolist() == [1.0, 1.0], (
        f"scales must be [127 / 127, 1.0]: a row with max |w| = 127 has scale 1, an all-zero row gets 1.0 (not 0), got {scales.tolist()}"
    )
    assert q.tolist() == [[127, -63, 1, 0, 1, -3, 0], [0] * 7], f"codes must be round(w / scale), got {q.tolist()}"
    # Exact ties: a symmetric quantizer gives quantize(-w) == -quantize(w).
    ties = torch.tensor([[127.0, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 63.5, -63.5]])
    q_pos, _ = quantization.quantize_int8(ties)
    q_neg, _ = quantization.quantize_int8(-ties)
    assert torch.equal(q_neg, -q_pos), (
        f"rounding is not odd-symmetric: quantize(w) = {q_pos.tolist()}, quantize(-w) = {q_neg.tolist()}; "
        "use torch.round (half to even), not floor(x + 0.5)"
    )


@pytest.mark.points(2)
def test_int8_zero_and_constant_rows(quantization):
    w = torch.stack([torch.zeros(32), torch.full((32,), 0.37), torch.full((32,), -5.0), torch.randn(32)])
    q, scales = quantization.quantize_int8(w)
    assert bool(torch.isfinite(scales).all()) and bool((scales > 0).all()), (
        f"scales must be finite and positive, also for an all-zero row (got {scales.tolist()}): do not divide by zero"
    )
    assert bool((q[0] == 0).all()), "an all-zero row must quantize to code 0 everywhere"
    assert bool((q[1] == 127).all()) and bool((q[2] == -127).all()), "a constant row maps every element to +-127"
    w_hat = quantization.dequantize_int8(q, scales)
    assert bool(torch.isfinite(w_hat).all()), "dequantized weights must be finite (no NaN from a zero scale)"
    assert bool((w_hat[0] == 0).all()), "an all-zero row must dequantize to exactly 0"
    torch.testing.assert_close(w_hat[1:3], w[1:3], rtol=1e-6, atol=0, msg="a constant row must come back (to float32 rounding)")


@pytest.mark.points(1)
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_rounding_is_to_nearest_with_ties_to_even(quantization, method):
    # Every row (int8) or group of 32 (int4) has max |w| = qmax * 0.25, so scale = 0.25 exactly and
    # w / scale is exact: a multiple of 0.5 in [-qmax, qmax], about half of them ties (k + 0.5).
    qmax, width = (127, 32) if method == "int8" else (7, 32)
    gen = torch.Generator().manual_seed(8)
    halves = torch.randint(-2 * qmax, 2 * qmax + 1, (16, 4 * width), generator=gen).float() / 2
    halves.view(16, 4, width)[:, :, 0] = qmax * torch.tensor([1.0, -1.0]).repeat(8)[:, None]  # pin each group's max
    w = halves * 0.25
    quantize = (lambda x: quantization.quantize_int8(x)[0]) if method == "int8" else (
        lambda x: quantization.unpack_int4(quantization.quantize_int4(x, width)[0]))
    codes = quantize(w).float()
    off = (halves - codes).abs()
    assert bool((off <= 0.5).all()), f"{method}: a code is more than half a step from w / scale: round to the nearest code"
    ties = off == 0.5
    assert int(ties.sum()) > 100, "the test weight must contain ties (w / scale = k + 0.5)"
    assert bool((codes[ties] % 2 == 0).all()), (
        f"{method}: ties w / scale = k + 0.5 must go to the even code (torch.round, half to even), got odd codes "
        f"{codes[ties][codes[ties] % 2 != 0][:6].tolist()}; floor(x + 0.5) rounds every tie up"
    )
    assert torch.equal(quantize(-w).float(), -codes), f"{method}: rounding must be odd-symmetric, quantize(-w) == -quantize(w)"


@pytest.mark.points(1)
def test_int8_rejects_bad_weight(quantization):
    for bad in (torch.randn(16), torch.randn(2, 3, 4), torch.ones(4, 4, dtype=torch.int32)):
        with pytest.raises(ValueError, match="weight"):
            quantization.quantize_int8(bad)


# ----------------------------------------------------------------------------- packing
@pytest.mark.points(2)
def test_pack_int4_nibble_order(quantization):
    packed = quantization.pack_int4(torch.tensor([[1, 2, -8, 7, 0, -1]], dtype=torch.int8))
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (1, 3), f"pack_int4 must give uint8 [..., K // 2], got {packed.dtype} {tuple(packed.shape)}"
    want = [(1 + 8) | ((2 + 8) << 4), 0 | (15 << 4), 8 | (7 << 4)]
    assert packed.tolist() == [want], (
        f"bytes {packed.tolist()[0]} != {want}: column 2j goes in the LOW nibble and column 2j + 1 in the HIGH nibble, each stored as code + 8"
    )


@pytest.mark.points(1)
def test_pack_int4_is_lossless(quantization):
    every_byte = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(4, 64)
    codes = quantization.unpack_int4(every_byte)
    assert codes.dtype == torch.int8 and tuple(codes.shape) == (4, 128), f"unpack_int4 must give int8 [..., 2 * K], got {codes.dtype} {tuple(codes.shape)}"
    assert int(codes.min()) == -8 and int(codes.max()) == 7, "unpacked codes must lie in [-8, 7]"
    assert torch.equal(quantization.pack_int4(codes), every_byte), "pack_int4(unpack_int4(b)) must give back every byte value 0..255"
    gen = torch.Generator().manual_seed(0)
    c = torch.randint(-8, 8, (3, 5, 64), generator=gen, dtype=torch.int64).to(torch.int8)
    assert torch.equal(quantization.unpack_int4(quantization.pack_int4(c)), c), "unpack_int4(pack_int4(c)) must give back c (any leading dimensions)"


@pytest.mark.points(1)
def test_pack_int4_rejects_bad_codes(quantization):
    with pytest.raises(ValueError, match="codes"):
        quantization.pack_int4(torch.zeros(2, 7, dtype=torch.int8))  # odd last dimension
    with pytest.raises(ValueError, match="codes"):
        quantization.pack_int4(torch.tensor([[9, 0]], dtype=torch.int8))  # outside [-8, 7]


# ----------------------------------------------------------------------------- INT4
@pytest.mark.points(1)
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_round_trip_within_half_step(quantization, group_size):
    w = rows_of_mixed_magnitude(out=6, cols=384, seed=group_size)
    packed, scales = quantization.quantize_int4(w, group_size)
    groups = 384 // group_size
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (6, 192), f"packed must be uint8 [out, in // 2] = [6, 192], got {packed.dtype} {tuple(packed.shape)}"
    assert scales.dtype == torch.float32 and tuple(scales.shape) == (6, groups), (
        f"scales must be float32 [out, in // group_size] = [6, {groups}], got {scales.dtype} {tuple(scales.shape)}"
    )
    w_hat = quantization.dequantize_int4(packed, scales, group_size)
    assert w_hat.dtype == torch.float32 and w_hat.shape == w.shape, "dequantize_int4 returns float32 [out, in] by default"
    step = scales.repeat_interleave(group_size, dim=1)
    absmax = w.abs().reshape(6, groups, group_size).amax(-1).repeat_interleave(group_size, dim=1)
    assert_within_half_step(w, w_hat, step, absmax, f"int4 round trip (group_size={group_size})")


@pytest.mark.points(1)
def test_int4_exact_codes_bytes_and_scales(quantization):
    # Group 0 (columns 0-31) has max |w| = 7, so its scale is 7 / 7 = 1 and the codes are round(w):
    # ties to even, symmetric (0.5 -> 0, -0.5 -> 0, 1.5 -> 2, -2.5 -> -2). Group 1 is all zero: scale 1.0.
    head = [7.0, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 3.4, -3.6, -7.0]
    w = torch.zeros(1, 64)
    w[0, : len(head)] = torch.tensor(head)
    packed, scales = quantization.quantize_int4(w, 32)
    assert scales.tolist() == [[1.0, 1.0]], f"scales must be [[7 / 7, 1.0 for the all-zero group]], got {scales.tolist()}"
    codes = quantization.unpack_int4(packed)
    assert codes[0, : len(head)].tolist() == [7, 0, 0, 2, -2, 2, -2, 3, -4, -7], (
        f"codes must be round(w / scale) with ties to even, got {codes[0, : len(head)].tolist()}"
    )
    assert bool((codes[0, len(head):] == 0).all()), "zeros (and an all-zero group) must give code 0"
    # byte j = (code[2j] + 8) | (code[2j + 1] + 8) << 4: (7, 0) -> 15 | 8 << 4 = 143, (0, 2) -> 8 | 10 << 4 = 168, ...
    want = [15 | 8 << 4, 8 | 10 << 4, 6 | 10 << 4, 6 | 11 << 4, 4 | 1 << 4] + [8 | 8 << 4] * 27
    assert packed.tolist() == [want], f"packed bytes {packed.tolist()[0][:5]}... != {want[:5]}...: low nibble = even column, code + 8"


@pytest.mark.points(1)
def test_int4_scale_is_per_group(quantization):
    gen = torch.Generator().manual_seed(3)
    # One row, four groups of 32 whose magnitudes differ by 10x each.
    w = torch.cat([torch.randn(1, 32, generator=gen) * m for m in (0.01, 0.1, 1.0, 10.0)], dim=1)
    packed, scales = quantization.quantize_int4(w, 32)
    torch.testing.assert_close(
        scales, w.abs().reshape(1, 4, 32).amax(-1) / 7, rtol=1e-6, atol=0,
        msg="scales[n, g] must be max |w| over group g of row n, divided by 7 (one scale per group, not per row)",
    )
    codes = quantization.unpack_int4(packed).reshape(1, 4, 32)
    assert int(codes.min()) >= -7, "int4 codes must lie in [-7, 7] (symmetric: -8 is unused)"
    group_max = codes.abs().amax(-1)
    assert bool((group_max == 7).all()), f"every group's largest |w| must map to +-7, group maxima were {group_max.tolist()}"


@pytest.mark.points(1)
def test_int4_zero_and_constant_groups(quantization):
    w = torch.cat([torch.zeros(2, 32), torch.full((2, 32), -0.25), torch.randn(2, 64)], dim=1)
    packed, scales = quantization.quantize_int4(w, 32)
    assert bool(torch.isfinite(scales).all()) and bool((scales > 0).all()), "scales must be finite and positive, also for an all-zero group"
    w_hat = quantization.dequantize_int4(packed, scales, 32)
    assert bool(torch.isfinite(w_hat).all()), "dequantized weights must be finite (no NaN from a zero scale)"
    assert bool((w_hat[:, :32] == 0).all()), "an all-zero group must dequantize to exactly 0"
    torch.testing.assert_close(w_hat[:, 32:64], w[:, 32:64], rtol=1e-6, atol=0, msg="a constant group must come back (to float32 rounding)")


@pytest.mark.points(1)
def test_int4_group_size_errors(quantization):
    w = torch.randn(4, 576)  # SmolLM2's hidden size: 576 = 18 x 32 = 9 x 64, but not a multiple of 128
    with pytest.raises(ValueError, match="group_size") as info:
        quantization.quantize_int4(w, 128)
    assert "576" in str(info.value), f"the error should name in_features (576) so the user sees why: {info.value}"
    with pytest.raises(ValueError, match="group_size"):
        quantization.quantize_int4(w, 48)  # divides 576 but is not one of 32, 64, 128
    packed, scales = quantization.quantize_int4(w, 64)
    assert tuple(scales.shape) == (4, 9), "group_size=64 divides 576: 9 groups per row"
    with pytest.raises(ValueError, match="weight"):
        quantization.quantize_int4(torch.randn(64), 32)


# ----------------------------------------------------------------------------- QuantLinear
@pytest.mark.points(2)
@pytest.mark.parametrize("method,group_size", [("int8", 128), ("int4", 32), ("int4", 128)])
def test_quant_linear_matches_dequantized_weight(quantization, method, group_size):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96, bias=True)
    module = quantization.QuantLinear.from_linear(linear, method, group_size)
    if method == "int8":
        q, s = quantization.quantize_int8(linear.weight)
        w_hat = quantization.dequantize_int8(q, s)
        assert module.qweight.dtype == torch.int8 and tuple(module.qweight.shape) == (96, 256), "int8 qweight must be int8 [out, in]"
    else:
        q, s = quantization.quantize_int4(linear.weight, group_size)
        w_hat = quantization.dequantize_int4(q, s, group_size)
        assert module.qweight.dtype == torch.uint8 and tuple(module.qweight.shape) == (96, 128), "int4 qweight must be packed uint8 [out, in // 2]"
    assert torch.equal(module.qweight, q) and torch.equal(module.scales, s), "QuantLinear must store the codes and scales of quantize_int8 / quantize_int4"
    assert torch.equal(module.dequantized_weight(torch.float32), w_hat), "dequantized_weight() must equal dequantize_* of the stored codes"
    assert (module.in_features, module.out_features, module.method) == (256, 96, method), "set in_features, out_features and method"
    assert not any(p.dtype.is_floating_point and p.numel() >= linear.weight.numel() for p in list(module.parameters()) + list(module.buffers())), (
        "QuantLinear must not keep a floating-point copy of the weight (that is the memory quantization saves)"
    )
    x = torch.randn(3, 5, 256)
    with torch.no_grad():
        got = module(x)
        want = F.linear(x, w_hat, linear.bias)
    assert got.shape == (3, 5, 96) and got.dtype == torch.float32, f"forward must map [..., 256] -> [..., 96] in x's dtype, got {tuple(got.shape)} {got.dtype}"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg="QuantLinear(x) must equal F.linear(x, dequantized weight, bias) in float32")


@pytest.mark.points(1)
def test_quant_linear_by_hand(quantization):
    # W = [[7, 0, ..., 0], [0, ..., 0, -7]] (32 columns) is exact in int8 (scale 7 / 127) and int4 (scale 1):
    # x = [0, 1, ..., 31], bias [0.5, -1]: y = [7 * 0 + 0.5, -7 * 31 - 1] = [0.5, -218].
    linear = torch.nn.Linear(32, 2)
    with torch.no_grad():
        linear.weight.zero_()
        linear.weight[0, 0], linear.weight[1, 31] = 7.0, -7.0
        linear.bias.copy_(torch.tensor([0.5, -1.0]))
    x = torch.arange(32, dtype=torch.float32)[None]
    for method in ("int8", "int4"):
        module = quantization.QuantLinear.from_linear(linear, method, 32)
        with torch.no_grad():
            y = module(x)
        assert y.tolist() == [[0.5, -218.0]], f"{method}: QuantLinear(x) = {y.tolist()}, expected [[0.5, -218.0]] (x @ W_hat.T + bias)"


@pytest.mark.points(1)
def test_quant_linear_bfloat16_activations_and_bad_method(quantization):
    torch.manual_seed(1)
    linear = torch.nn.Linear(128, 32, bias=False).to(torch.bfloat16)
    module = quantization.QuantLinear.from_linear(linear, "int8")
    assert module.bias is None, "a Linear without bias gives a QuantLinear without bias"
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        y = module(x)
    assert y.dtype == torch.bfloat16, f"forward must compute in the activation dtype (bfloat16), got {y.dtype}"
    want = F.linear(x.float(), module.dequantized_weight(torch.float32))
    torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="method"):
        quantization.QuantLinear.from_linear(linear, "fp8")
