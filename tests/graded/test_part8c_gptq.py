"""Graded tests for Part 8c: GPTQ into Part 8a's INT4 format.

Tiny random layers, float32 on the CPU, each in well under a second. Calibration inputs
are correlated the way a transformer's are (a few directions carry most of the variance,
a couple of channels are large), which is where GPTQ's error feedback pays: its output
error on those inputs must beat round-to-nearest's clearly. With an identity Hessian
there is nothing to feed back and GPTQ must give Part 8a's codes exactly. An all-zero
weight group (its scale needs Part 8a's zero-group guard: without it GPTQ divides 0 by 0
and the NaN spreads along the row through the error feedback) and an input channel that
is 0 on every token (a zero Hessian diagonal) must both give finite codes.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.part(8)


def correlated_inputs(n: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(8, k, generator=gen)
    x = torch.randn(n, 8, generator=gen) @ basis + 0.1 * torch.randn(n, k, generator=gen)
    x[:, :2] *= 10.0  # two large channels, as in real activations
    return x


def dequant(packed: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    b = packed.to(torch.int16)
    codes = torch.stack((b & 15, b >> 4), dim=-1).flatten(-2) - 8
    return codes.float() * scales.repeat_interleave(group, dim=1)


@pytest.mark.points(1)
def test_hessian_from_inputs(gptq):
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))
    h = gptq.hessian_from_inputs(x)
    flat = x.reshape(-1, 16)
    torch.testing.assert_close(h, 2 * flat.T @ flat / 15)


@pytest.mark.points(2)
@pytest.mark.parametrize("group", [32, 64])
def test_gptq_beats_round_to_nearest_on_calibration_inputs(gptq, quantization, group):
    gen = torch.Generator().manual_seed(group)
    w = torch.randn(48, 256, generator=gen) / 16
    x = correlated_inputs(512, 256, seed=group + 1)
    packed, scales = gptq.gptq_quantize_int4(w, gptq.hessian_from_inputs(x), group)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (48, 128)
    assert scales.dtype == torch.float32 and tuple(scales.shape) == (48, 256 // group)
    rtn = quantization.dequantize_int4(*quantization.quantize_int4(w, group), group)
    err_gptq = gptq.output_error(x, w, dequant(packed, scales, group))
    err_rtn = gptq.output_error(x, w, rtn)
    assert err_gptq < 0.7 * err_rtn, f"GPTQ output error {err_gptq:.3g} vs round-to-nearest {err_rtn:.3g}"


@pytest.mark.points(1)
def test_identity_hessian_gives_round_to_nearest(gptq):
    """No correlation, no feedback: the codes and scales of plain RTN (computed here from Part 8a's rules)."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(16, 128, generator=gen) * torch.logspace(-2, 1, 16)[:, None]
    packed, scales = gptq.gptq_quantize_int4(w, torch.eye(128), 64)
    groups = w.view(16, 2, 64)
    want_scales = groups.abs().amax(-1) / 7
    want_codes = torch.round(groups / want_scales[..., None]).clamp(-7, 7).view(16, 128)
    torch.testing.assert_close(scales, want_scales)
    assert torch.equal(dequant(packed, torch.ones_like(scales), 64), want_codes), "codes differ from round-to-nearest"


@pytest.mark.points(1)
def test_zero_group_and_dead_input_stay_finite(gptq):
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(12, 128, generator=gen)
    w[:, :32] = 0.0  # an all-zero first group (GPTQ reaches it before any error feedback)
    x = correlated_inputs(256, 128, seed=5)
    x[:, 100] = 0.0  # an input channel no token uses
    packed, scales = gptq.gptq_quantize_int4(w, gptq.hessian_from_inputs(x), 32)
    assert bool(torch.isfinite(scales).all()) and bool((scales > 0).all()), "scales must be finite and positive"
    w_hat = dequant(packed, scales, 32)
    assert bool(torch.isfinite(w_hat).all())
    assert gptq.output_error(x, w, w_hat) < 0.05 * float((x @ w.T).pow(2).mean()), "the error must stay small"
