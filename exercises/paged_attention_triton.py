# Exercise stub generated from solutions/paged_attention_triton.py by scripts/make_exercises.py.
# Fill in every `raise NotImplementedError` below; keep the signatures.
"""Part 3b: the paged decode attention kernel, in Triton.

Part 3's ``batched_decode_attention`` gathers every sequence's keys and values out of
the paged cache into a contiguous copy, then runs SDPA on the copy. On a GPU that
copy *is* the cost: decode attention is bound by reading K/V from memory, and the
gather reads them, writes them and reads them again. A kernel can instead follow the
block table itself and read each K/V row once, where it lies (PagedAttention, Kwon et
al., 2023, section 4.1; vLLM's ``paged_attention_v1`` kernel).

The kernel here is the teaching shape (the lab engine's tuned version, with grouped
heads packed into one tile, tiles spanning several blocks and split-KV, lives in
``servinglab/model/triton/decode_attention.py``; read it after this one):

- one program per (sequence, query head): ``grid = (num_seqs, num_heads)``;
- it walks the sequence's blocks in order: block ``j`` of sequence ``b`` is physical
  block ``block_tables[b, j]``, holding positions ``j * BLOCK_SIZE ..`` of the
  sequence; only the last block can be partly filled (mask positions
  ``>= context_len``);
- online softmax (Milakov & Gimelshein, 2018; FlashAttention, Dao et al., 2022): keep
  a running maximum ``m``, the running sum ``l`` of ``exp(score - m)`` and the
  un-normalised output ``acc``; when a block raises the maximum to ``m_new``, rescale
  ``l`` and ``acc`` by ``exp(m - m_new)``. At the end ``out = acc / l``. Every score is
  seen once and never stored;
- grouped-query attention: query head ``h`` reads KV head ``h // (num_heads // num_kv_heads)``.

On a machine without CUDA the kernel runs through Triton's interpreter (NumPy on the
CPU): the environment variable ``TRITON_INTERPRET=1`` must be set before triton is
first imported (the course's test suite does it in ``tests/conftest.py``; in a notebook,
set ``os.environ["TRITON_INTERPRET"] = "1"`` in the first cell). The interpreter runs
the same code on small shapes, so your kernel is graded on a laptop too; only the speed
checks need a GPU.

Triton reminders: ``tl.program_id(axis)``; ``tl.arange(0, N)`` needs ``N`` a power of
two and a compile-time constant (``tl.constexpr``); ``tl.load(ptr + offsets,
mask=..., other=0.0)``; ``tl.store``; ``tl.sum(x, axis)``, ``tl.max(x, axis)``,
``tl.exp``; ``x[:, None]`` broadcasts; ``.to(tl.float32)`` casts. Pointers are
element pointers: offset them by ``index * stride``. Loop bounds may be run-time
values: ``for j in range(0, num_blocks):``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def paged_decode_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    scale,
    stride_q_seq, stride_q_head,
    stride_o_seq, stride_o_head,
    stride_cache_block, stride_cache_slot, stride_cache_head,
    stride_table_seq,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    """Decode attention of one (sequence, query head): ``out[b, h] = softmax(q k^T * scale) v``.

    Args:
        out_ptr: ``[num_seqs, num_heads, HEAD_DIM]`` output, in the query's dtype.
        q_ptr: ``[num_seqs, num_heads, HEAD_DIM]`` queries (strides given; last dim contiguous).
        k_cache_ptr, v_cache_ptr: ``[num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM]``
            (both caches share the strides ``stride_cache_*``; last dim contiguous).
        block_tables_ptr: ``[num_seqs, max_blocks]`` int32 physical block ids.
        context_lens_ptr: ``[num_seqs]`` int32 positions in cache per sequence (>= 1).
        scale: score multiplier (``head_dim ** -0.5``).
        GROUP: query heads per KV head (``num_heads // num_kv_heads``).
        HEAD_DIM, BLOCK_SIZE: powers of two.

    Program ``(b, h)`` = ``(tl.program_id(0), tl.program_id(1))`` loads its query row,
    walks blocks ``0 .. ceil(context_len / BLOCK_SIZE) - 1`` with an online softmax in
    float32, and stores ``acc / l`` cast to the output's dtype.
    """
    # Hint: offs_d = tl.arange(0, HEAD_DIM), offs_s = tl.arange(0, BLOCK_SIZE). For block j
    # the physical id is tl.load(block_tables_ptr + b * stride_table_seq + j); K rows are at
    # k_cache_ptr + block * stride_cache_block + offs_s[:, None] * stride_cache_slot
    #   + kv_head * stride_cache_head + offs_d[None, :]   (a [BLOCK_SIZE, HEAD_DIM] tile).
    # Scores: tl.sum(k * q[None, :], 1); give masked positions -inf before the max.
    # Start with m = -inf (a scalar float32) and l = 0: exp(-inf - m_new) = 0 rescales nothing.
    raise NotImplementedError("paged_decode_kernel: your code here")


def paged_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode attention of ``B`` sequences (one new row each) over the paged cache, in one launch.

    The same function as Part 3's ``batched_decode_attention`` without its gather copy.

    Args:
        query: ``[B, num_heads, head_dim]``; may be a strided view (e.g. of a fused QKV
            tensor) as long as its last dimension is contiguous.
        k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``, contiguous,
            on the query's device.
        block_tables: ``[B, max_blocks]`` int32 block ids (padding past the used blocks
            is never read).
        context_lens: ``[B]`` int32, each ``>= 1``.
        scale: score multiplier.

    Returns:
        A new ``[B, num_heads, head_dim]`` tensor in the query's dtype and device. The
        inputs are not modified; no copy of the keys or values is made.

    Raises:
        ValueError: ``head_dim`` or ``block_size`` not a power of two, or ``num_heads``
            not a multiple of ``num_kv_heads`` (the message names the parameter).
    """
    num_seqs, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    for name, value in (("head_dim", head_dim), ("block_size", block_size)):
        if value & (value - 1):
            raise ValueError(f"{name} must be a power of two for this kernel (tl.arange), got {value}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if query.stride(-1) != 1 or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("query needs a contiguous last dimension and the caches must be contiguous")
    # Hint: allocate the output with torch.empty, launch paged_decode_kernel[grid](...) with
    # grid = (num_seqs, num_heads), pass every stride the kernel asks for (tensor.stride(i)),
    # and the constexprs by keyword: GROUP=..., HEAD_DIM=..., BLOCK_SIZE=.... Add num_warps=1:
    # a program's tile is one block (BLOCK_SIZE x HEAD_DIM, about 1000 elements), which one
    # warp of 32 threads covers; the default 4 warps only add synchronisation to every
    # reduction, and one-warp programs let more of them share an SM (on an H200 that made
    # 256 sequences x 1024 positions about 4x faster).
    raise NotImplementedError("paged_decode_attention: your code here")
