"""Merge split-KV partial attention outputs (the second stage of flash-decoding).

Split ``j`` of a (sequence, head) saw a slice of the context and left its normalised
output ``o_j`` and its base-2 log-sum-exp ``lse_j``. The full softmax weights each split
by its share of the normaliser: ``o = sum_j 2^(lse_j - M) o_j / sum_j 2^(lse_j - M)``
with ``M = max_j lse_j`` for stability. Empty splits carry ``lse = -inf``: weight 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NUM_SPLITS
    row = (seq * NUM_HEADS + head) * NUM_SPLITS + offs_s
    lse = tl.load(part_lse_ptr + row, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # a padding lane: every split empty
    w = tl.exp2(lse - m)
    o = tl.load(part_out_ptr + row[:, None] * BLOCK_D + offs_d[None, :], mask=s_mask[:, None], other=0.0)
    total = tl.sum(w, 0)
    res = tl.sum(o * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + offs_d, res.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


def merge_splits(part_out: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``part_out`` ``[B, H, S, BLOCK_D]`` float32 and ``part_lse`` ``[B, H, S]`` -> ``out`` ``[B, H, head_dim]``."""
    num_seqs, num_heads, num_splits, block_d = part_out.shape
    _merge_splits_kernel[(num_seqs, num_heads)](
        part_out, part_lse, out, out.stride(0), out.stride(1),
        NUM_HEADS=num_heads, NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits),
        HEAD_DIM=out.shape[2], BLOCK_D=block_d,
    )
    return out
