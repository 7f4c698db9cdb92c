"""Rotary position embedding applied in place to the q and k heads of the fused QKV rows.

transformers' rotate-half layout (pairs ``(i, i + head_dim/2)``, see
:class:`servinglab.model.llama.RotaryEmbedding`). ``cos``/``sin`` come from a float32
table indexed by position (vLLM's ``cos_sin_cache``), so the kernel does no
transcendental math; one program rotates every q and k head of one token, computing in
float32 and rounding once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(
    qkv_ptr, positions_ptr, cos_ptr, sin_ptr, stride_t,
    NUM_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_mask = offs_d < HALF
    mask = (offs_h[:, None] < NUM_HEADS) & d_mask[None, :]
    cos = tl.load(cos_ptr + pos * HALF + offs_d, mask=d_mask, other=0.0)[None, :]
    sin = tl.load(sin_ptr + pos * HALF + offs_d, mask=d_mask, other=0.0)[None, :]
    first = qkv_ptr + token * stride_t + offs_h[:, None] * (2 * HALF) + offs_d[None, :]
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(first + HALF, mask=mask, other=0.0)
    y1 = x1.to(tl.float32) * cos - x2.to(tl.float32) * sin
    y2 = x2.to(tl.float32) * cos + x1.to(tl.float32) * sin
    tl.store(first, y1.to(x1.dtype), mask=mask)
    tl.store(first + HALF, y2.to(x1.dtype), mask=mask)


def rope_cos_sin_cache(head_dim: int, theta: float, max_positions: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``cos`` and ``sin`` tables ``[max_positions, head_dim/2]`` of ``p * theta^(-2i/d)``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return freqs.cos().contiguous().to(device), freqs.sin().contiguous().to(device)


def apply_rope_(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_rotated_heads: int, head_dim: int) -> None:
    """Rotate, in place, the first ``num_rotated_heads`` heads of each ``qkv`` row ``[T, width]``.

    ``qkv`` holds q heads, then k heads, then v heads (``head_dim`` each); pass
    ``num_rotated_heads = num_heads + num_kv_heads`` to rotate q and k and leave v.
    """
    if qkv.dim() != 2 or qkv.stride(-1) != 1 or qkv.shape[1] < num_rotated_heads * head_dim:
        raise ValueError(f"qkv must be [T, >= {num_rotated_heads * head_dim}] with contiguous rows, got {tuple(qkv.shape)}")
    if qkv.shape[0] == 0:
        return
    half = head_dim // 2
    _rope_kernel[(qkv.shape[0],)](
        qkv, positions, cos, sin, qkv.stride(0),
        NUM_HEADS=num_rotated_heads, BLOCK_H=triton.next_power_of_2(num_rotated_heads),
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half), num_warps=4,
    )
