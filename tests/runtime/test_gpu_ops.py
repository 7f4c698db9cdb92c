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
from servinglab.model.triton.rope_cache import rope_and_cache_
from servinglab.model.triton.silu_mul import silu_and_mul
from servinglab.model.triton.small_gemm import SMALL_M_MAX, small_gemm, worth_it

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


@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 32), (6, 2, 48)])
def test_rope_and_cache_matches_rotary_embedding_and_slot_writes(heads, kv_heads, dim):
    """The fused kernel = RotaryEmbedding on q and k + the Part 3 cache write; slot -1 writes nothing."""
    tokens, block_size, num_blocks = 7, 4, 5
    gen = torch.Generator().manual_seed(heads * dim)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen).to(DEVICE)
    positions = torch.tensor([0, 3, 9, 100, 2047, 5, 6], device=DEVICE)
    slots = torch.tensor([0, 5, 19, -1, 7, 12, -1], device=DEVICE)
    rotary = RotaryEmbedding(dim, 100000.0)
    cos, sin = rotary.cos_sin(positions, torch.float32)
    qk = qkv[:, : (heads + kv_heads) * dim].reshape(tokens, heads + kv_heads, dim)
    expected_qk = RotaryEmbedding.apply(qk, cos, sin)
    v = qkv[:, (heads + kv_heads) * dim :].reshape(tokens, kv_heads, dim).clone()
    poison = float("nan")
    k_cache = torch.full((num_blocks, block_size, kv_heads, dim), poison, device=DEVICE)
    v_cache = torch.full_like(k_cache, poison)
    expected_k, expected_v = k_cache.clone().view(-1, kv_heads, dim), v_cache.clone().view(-1, kv_heads, dim)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            expected_k[s], expected_v[s] = expected_qk[t, heads:], v[t]
    cos_t, sin_t = rope_cos_sin_cache(dim, 100000.0, 2048, DEVICE)
    rope_and_cache_(qkv, positions.int(), cos_t, sin_t, k_cache, v_cache, slots, heads, kv_heads)
    got_qk = qkv[:, : (heads + kv_heads) * dim].view_as(expected_qk)
    torch.testing.assert_close(got_qk, expected_qk, atol=1e-5, rtol=1e-5)
    assert torch.equal(qkv[:, (heads + kv_heads) * dim :].reshape_as(v), v), "v heads must not be rotated"
    # NaN poison: an untouched slot stays NaN, so equal_nan checks that nothing else was written.
    torch.testing.assert_close(k_cache.view(-1, kv_heads, dim), expected_k, atol=1e-5, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(v_cache.view(-1, kv_heads, dim), expected_v, atol=0, rtol=0, equal_nan=True)


def test_silu_and_mul():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 2 * 1536, generator=gen).to(DEVICE)
    gate, up = x.split(1536, dim=-1)
    torch.testing.assert_close(silu_and_mul(x), F.silu(gate) * up, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("m,n,k,block_n", [(1, 40, 96, None), (5, 40, 96, 32), (16, 72, 128, 16), (3, 100, 64, 64)])
def test_small_gemm_matches_linear(dtype, m, n, k, block_n):
    """Ragged N (masked columns), K not a multiple of BLOCK_K (masked tail), M below 16 (masked rows)."""
    gen = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    w = torch.randn(n, k, generator=gen).to(DEVICE, dtype)
    expected = (x.double() @ w.double().T).to(dtype)
    tol = {"atol": 1e-4, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2**-7}
    torch.testing.assert_close(small_gemm(x, w, block_n=block_n), expected, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_gated_small_gemm_is_gate_up_then_silu_and_mul(dtype):
    """The fused SwiGLU epilogue rounds like the two-kernel path: equal results, bit for bit."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 64, generator=gen).to(DEVICE, dtype)
    w = torch.randn(2 * 40, 64, generator=gen).to(DEVICE, dtype)
    fused = small_gemm(x, w, gated=True, block_n=16)
    assert fused.shape == (3, 40)
    assert torch.equal(fused, silu_and_mul(small_gemm(x, w, block_n=16)))
    gate, up = (x.double() @ w.double().T).split(40, dim=-1)
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 2**-6}
    torch.testing.assert_close(fused.double(), F.silu(gate) * up, **tol)


def test_small_gemm_refuses_large_batches():
    x, w = torch.zeros(SMALL_M_MAX + 1, 8, device=DEVICE), torch.zeros(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="at most 16 rows"):
        small_gemm(x, w)


def test_small_gemm_rule_follows_the_measurements():
    assert worth_it(1, 960, 576) and worth_it(16, 3072, 576), "135M qkv and gate_up take the small kernel"
    assert not worth_it(1, 576, 1536), "a long reduction (135M down) stays on cuBLAS"
    assert not worth_it(1, 16384, 2048), "1.7B projections stay on cuBLAS"
    assert not worth_it(17, 960, 576), "beyond 16 rows: cuBLAS"
