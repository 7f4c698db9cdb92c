"""Graded tests for Part 8c: GPTQ into Part 8a's INT4 format.

Tiny random layers, float32 on the CPU, each in well under a second. Calibration inputs
are correlated the way a transformer's are (a few directions carry most of the variance,
a couple of channels are large), which is where GPTQ's error feedback pays: its output
error on those inputs must beat round-to-nearest's clearly. With an identity Hessian
there is nothing to feed back and GPTQ must give Part 8a's codes exactly. An all-zero
weight group (its scale needs Part 8a's zero-group guard: without it GPTQ divides 0 by 0
and the NaN spreads along the row through the error feedback) and an input channel that
is 0 on every token (a zero Hessian diagonal) must both give finite codes. A column-by-column float64 version of the paper's
Algorithm 1, written out here, must give (almost all) the same codes.

Plausible bugs these tests guard against (each fails at least two of them): the
quantization error not fed back to later columns (plain RTN), the error not divided by
the Cholesky factor's diagonal, a Hessian without its factor ``2 / n``.
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


@pytest.mark.points(1)
def test_hessian_by_hand(gptq):
    """Four tokens of two channels: ``X^T X = [[11, 14], [14, 21]]``, so ``H = 2 / 4 X^T X``, with any leading batch shape."""
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [1.0, 0.0]]])  # [2, 2, 2]: a batch of two, two tokens each
    torch.testing.assert_close(gptq.hessian_from_inputs(x), torch.tensor([[5.5, 7.0], [7.0, 10.5]]))


@pytest.mark.points(1)
def test_one_error_fed_forward_by_hand(gptq):
    """Columns 0 and 1 coupled through ``H^-1 = [[0.25, 0.125], [0.125, 1]]`` (identity elsewhere), one row, one group.

    Scale ``0.7 / 7 = 0.1`` (column 31). Column 0: ``0.26 -> 3``, error ``-0.04``. GPTQ moves
    column 1 by ``-error x H^-1[0, 1] / H^-1[0, 0] = +0.02``: ``0.135 -> 0.155 -> code 2``, where
    round-to-nearest gives 1 (and a feedback not divided by ``U[0, 0] = 0.5`` moves it by only 0.01).
    """
    hinv = torch.eye(32, dtype=torch.float64)
    hinv[:2, :2] = torch.tensor([[0.25, 0.125], [0.125, 1.0]], dtype=torch.float64)
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1], w[0, 31] = 0.26, 0.135, 0.7
    packed, scales = gptq.gptq_quantize_int4(w, torch.linalg.inv(hinv).float(), 32)
    codes = dequant(packed, torch.ones_like(scales), 32)[0]
    torch.testing.assert_close(scales, torch.tensor([[0.1]]))
    assert codes[:2].tolist() == [3.0, 2.0] and float(codes[31]) == 7.0 and not bool(codes[2:31].any()), codes.tolist()


def plain_gptq(w: torch.Tensor, h: torch.Tensor, group: int, damp: float = 0.01) -> torch.Tensor:
    """Frantar et al.'s Algorithm 1 without lazy batching, in float64: the INT4 codes ``[N, K]``.

    For each column ``j`` in order: a new group takes its scale from the weights *as updated
    so far*; ``q = round(w_j / s)`` clamped to +-7; the error ``(w_j - q s) / U[j, j]`` is
    subtracted from the columns to its right along row ``j`` of ``U``, the upper Cholesky
    factor of ``H^-1`` (``H`` damped by ``damp x mean(diag H)``).
    """
    w = w.double().clone()
    h = h.double() + damp * torch.diagonal(h).double().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    codes = torch.zeros_like(w)
    s = torch.ones(w.shape[0], dtype=torch.float64)
    for j in range(w.shape[1]):
        if j % group == 0:
            absmax = w[:, j : j + group].abs().amax(1)
            s = torch.where(absmax > 0, absmax / 7, torch.ones_like(absmax))
        q = torch.round(w[:, j] / s).clamp(-7, 7)
        codes[:, j] = q
        err = (w[:, j] - q * s) / u[j, j]
        w[:, j:] -= err[:, None] * u[j, j:][None, :]
    return codes


@pytest.mark.points(1)
def test_agrees_with_the_unbatched_algorithm(gptq):
    """The lazy-batched float32 GPTQ gives (almost all) the codes of the column-by-column float64 algorithm.

    Lazy batching reorders the same updates, so only a weight sitting on a rounding
    boundary may come out one code apart: at most 1% of the codes may differ.
    """
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(24, 256, generator=gen) / 16
    h = gptq.hessian_from_inputs(correlated_inputs(512, 256, seed=12))
    packed, scales = gptq.gptq_quantize_int4(w, h, 64)
    got = dequant(packed, torch.ones_like(scales), 64)
    want = plain_gptq(w, h, 64).float()
    differ = float((got != want).float().mean())
    assert differ <= 0.01, f"{differ:.1%} of the codes differ from Algorithm 1 (error feedback along U's rows, divided by U[j, j])"


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
