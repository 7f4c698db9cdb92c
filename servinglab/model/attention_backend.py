"""The GPU attention backend: Part 3's two functions, served by the Triton kernels.

The model calls ``write_to_kv_cache`` and ``paged_attention`` on whatever module it is
given (:class:`~servinglab.model.llama.LlamaForCausalLM`'s ``attention``). On CUDA the
engine hands it this module instead of the student's PyTorch Part 3, with the same
signatures and the same meaning, so nothing else changes:

- ``write_to_kv_cache`` -> :func:`servinglab.model.triton.kv_write.write_kv_cache`
  (slot ``-1`` skips a row: padded CUDA-graph lanes);
- ``paged_attention`` -> the decode kernel when every sequence brings the same small
  number of rows (1 for decode, ``1 + k`` for speculative verification; with the
  split-KV rule of :func:`~servinglab.model.triton.decode_attention.choose_num_splits`
  on ``metadata.max_context_len``), else the prefill/extend kernel for the whole ragged
  batch (prefills, chunks after a cached prefix and decodes in one launch). Both compute
  the same causal attention; the decode kernel splits long contexts across programs.

Neither function reads a tensor back to the host, so both can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from servinglab.interfaces import AttentionMetadata
from servinglab.model.triton.decode_attention import paged_decode_attention
from servinglab.model.triton.kv_write import write_kv_cache
from servinglab.model.triton.prefill_attention import paged_prefill_attention

MAX_DECODE_QUERY_LEN = 16  # rows per sequence the decode kernel takes (speculative k + 1 <= 16)


def write_to_kv_cache(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store this step's K/V rows at their slots (Part 3's contract; slot ``< 0`` is skipped)."""
    write_kv_cache(key, value, k_cache, v_cache, slot_mapping)


def paged_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, metadata: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Causal attention of the flattened batch over the paged cache (Part 3's contract)."""
    q_len = metadata.max_query_len
    # T == B * max_query_len means every sequence brings exactly max_query_len rows (none brings more).
    if q_len <= MAX_DECODE_QUERY_LEN and query.shape[0] == metadata.block_tables.shape[0] * q_len:
        return paged_decode_attention(
            query, k_cache, v_cache, metadata.block_tables, metadata.context_lens, scale,
            max_context_len=metadata.max_context_len, query_len=q_len,
        )
    return paged_prefill_attention(
        query, k_cache, v_cache, metadata.block_tables, metadata.context_lens, metadata.query_start_loc,
        metadata.max_query_len, scale,
    )
