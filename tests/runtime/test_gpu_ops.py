"""The fused per-token kernels (RMSNorm+residual, RoPE, SiLU*up) against the model's PyTorch layers.

RMSNorm follows transformers' rounding steps (only its sum runs in another order), so
in float32 it matches the PyTorch layer within float32 rounding, and in bfloat16 (on a
GPU: the interpreter truncates float32 to bfloat16 instead of rounding) within one
bfloat16 step. RoPE and SiLU*up compute in float32 and round once (PyTorch rounds after
every op). On a CPU the kernels run through Triton's interpreter.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from servinglab.model.llama import RMSNorm, RotaryEmbedding
from servinglab.model.triton.rmsnorm import rms_norm
from servinglab.model.triton.rope import apply_rope_, rope_cos_sin_cache
from servinglab.model.triton.silu_mul import silu_and_mul

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


BF16 = pytest.param(
    torch.bfloat16, id="bf16",
    marks=pytest.mark.skipif(DEVICE == "cpu", reason="the interpreter truncates to bfloat16; checked on a GPU"),
)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("hidden", [64, 576])
def test_rmsnorm_with_residual(dtype, hidden):
    gen = torch.Generator().manual_seed(hidden)
    norm = RMSNorm(hidden, 1e-5)
    norm.weight.data = torch.randn(hidden, generator=gen)
    norm = norm.to(DEVICE, dtype)
    x = torch.randn(5, hidden, generator=gen).to(DEVICE, dtype)
    residual = torch.randn(5, hidden, generator=gen).to(DEVICE, dtype)
    expected_residual = x + residual
    with torch.no_grad():
        expected = norm(expected_residual)
        plain = norm(x)
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-3, "rtol": 2**-7}
    torch.testing.assert_close(rms_norm(x, norm.weight, norm.eps), plain, **tol)
    out = rms_norm(x, norm.weight, norm.eps, residual=residual)
    assert torch.equal(residual, expected_residual), "the residual must become x + residual, in place"
    torch.testing.assert_close(out, expected, **tol)


def test_rope_matches_rotary_embedding():
    heads, kv_heads, dim = 9, 3, 64
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(6, (heads + 2 * kv_heads) * dim, generator=gen).to(DEVICE)
    positions = torch.tensor([0, 1, 7, 100, 2047, 5], device=DEVICE)
    rotary = RotaryEmbedding(dim, 100000.0)
    cos, sin = rotary.cos_sin(positions, torch.float32)
    qk = qkv[:, : (heads + kv_heads) * dim].view(6, heads + kv_heads, dim)
    expected_qk = RotaryEmbedding.apply(qk, cos, sin)
    expected_v = qkv[:, (heads + kv_heads) * dim :].clone()
    cos_t, sin_t = rope_cos_sin_cache(dim, 100000.0, 2048, DEVICE)
    apply_rope_(qkv, positions.int(), cos_t, sin_t, heads + kv_heads, dim)
    torch.testing.assert_close(qkv[:, : (heads + kv_heads) * dim].view_as(expected_qk), expected_qk, atol=1e-5, rtol=1e-5)
    assert torch.equal(qkv[:, (heads + kv_heads) * dim :], expected_v), "v heads must not be rotated"


def test_silu_and_mul():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 2 * 1536, generator=gen).to(DEVICE)
    gate, up = x.split(1536, dim=-1)
    torch.testing.assert_close(silu_and_mul(x), F.silu(gate) * up, atol=1e-6, rtol=1e-5)
