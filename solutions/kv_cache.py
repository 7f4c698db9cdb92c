"""Part 1: KV-cache memory math - how many bytes a request's cache takes, and how many fit.

During decoding every layer keeps the key and value vector of every past token, so the
cache grows with ``layers x kv_heads x head_dim`` per token. With grouped-query attention
(GQA, Llama-2-70B, Llama-3) several query heads share one KV head, so the cache is
``num_attention_heads / num_kv_heads`` times smaller than a formula based on
``hidden_size`` claims. The KV cache, not compute, is what limits how many requests a
serving engine runs at once (Kwon et al., "Efficient Memory Management for Large Language
Model Serving with PagedAttention", SOSP 2023, arXiv 2309.06180, section 3).

Every function accepts ``shape`` as a :class:`ModelShape` (or, for the KV functions, any
object with ``num_layers``, ``num_kv_heads`` and ``head_dim``, such as
``servinglab.cache.KVCacheSpec``) and a ``dtype`` as a torch dtype or a name such as
``"bf16"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

from .model_shape import CONFIG_KEYS, ModelShape, positive_int

__all__ = ["CONFIG_KEYS", "DTYPE_ALIASES", "DTYPE_BYTES", "GIB", "KVCacheMemory", "KVShape", "ModelShape", "calculate_kv_cache_memory",
           "dtype_bytes", "dtype_name", "kv_bytes_per_token", "max_concurrent_sequences", "num_kv_blocks", "seed_formula_kv_bytes"]

GIB = 1024**3
# Bytes per element. "fp8" means e4m3, as in vLLM's ``kv_cache_dtype="fp8"``.
DTYPE_BYTES: dict[str, int] = {
    "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1,
}
DTYPE_ALIASES: dict[str, str] = {
    "fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16",
    "fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2",
}


class KVShape(Protocol):
    """What the KV-cache size depends on (``ModelShape`` and ``KVCacheSpec`` both qualify)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int


def dtype_name(dtype: Any) -> str:
    """Canonical name (``"bfloat16"``, ...) of a torch dtype or a dtype name/alias."""
    name = str(dtype).lower().removeprefix("torch.")
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPE_BYTES:
        allowed = sorted(set(DTYPE_BYTES) | set(DTYPE_ALIASES))
        raise ValueError(f"dtype must be one of {allowed} (or the matching torch dtype), got {dtype!r}")
    return name


def dtype_bytes(dtype: Any) -> int:
    """Bytes per element of ``dtype``; raises ValueError naming the allowed values."""
    return DTYPE_BYTES[dtype_name(dtype)]


@dataclass(frozen=True)
class KVCacheMemory:
    """KV-cache bytes for ``batch_size`` sequences of ``seq_len`` tokens each."""

    bytes_per_token: int
    bytes_per_sequence: int
    total_bytes: int
    seq_len: int
    batch_size: int
    dtype: str

    @property
    def total_gib(self) -> float:
        """``total_bytes`` in GiB (2**30 bytes)."""
        return self.total_bytes / GIB

    def __str__(self) -> str:
        return (
            f"{self.bytes_per_token / 1024:g} KiB/token x {self.seq_len} tokens x {self.batch_size} seqs "
            f"({self.dtype}) = {self.total_gib:.3f} GiB"
        )


def kv_bytes_per_token(shape: KVShape, dtype: Any = "float16") -> int:
    """Bytes one token's keys and values take across all layers."""
    elem = dtype_bytes(dtype)
    # K and V (2) for every layer, each num_kv_heads x head_dim elements: with GQA the
    # width is kv_heads x head_dim, not hidden_size (docs/references.md, vLLM paper section 3).
    ### BEGIN SOLUTION
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * elem
    ### END SOLUTION


def calculate_kv_cache_memory(shape: KVShape, seq_len: int, batch_size: int = 1, dtype: Any = "float16") -> KVCacheMemory:
    """KV-cache memory for ``batch_size`` sequences of ``seq_len`` tokens each.

    Llama-2-13B in fp16 needs 800 KiB per token (docs/references.md); a 4,096-token sequence
    then takes 3.125 GiB.
    """
    positive_int("seq_len", seq_len)
    positive_int("batch_size", batch_size)
    name = dtype_name(dtype)
    # Per token, then per sequence, then per batch.
    ### BEGIN SOLUTION
    per_token = kv_bytes_per_token(shape, name)
    per_sequence = per_token * seq_len
    return KVCacheMemory(per_token, per_sequence, per_sequence * batch_size, seq_len, batch_size, name)
    ### END SOLUTION


def seed_formula_kv_bytes(shape: ModelShape, seq_len: int, batch_size: int = 1, dtype: Any = "float16") -> int:
    """The course's original guide's estimate: 2 x layers x hidden_size x bytes per token.

    It counts a full hidden-size K and V per layer, which is right only without GQA: it
    overstates by ``num_attention_heads / num_kv_heads`` (8x for Llama-2-70B, 4x for
    Llama-3.1-8B). Kept to compare against, not to use.
    """
    positive_int("seq_len", seq_len)
    positive_int("batch_size", batch_size)
    elem = dtype_bytes(dtype)
    ### BEGIN SOLUTION
    return 2 * shape.num_layers * shape.hidden_size * elem * seq_len * batch_size
    ### END SOLUTION


def _check_budget_args(
    shape: KVShape, gpu_memory_bytes: int, gpu_memory_utilization: float, block_size: int,
    weight_bytes: int | None, activation_bytes: int, tensor_parallel_size: int,
) -> None:
    """Validate the arguments of :func:`num_kv_blocks` (ValueError names the parameter)."""
    positive_int("gpu_memory_bytes", gpu_memory_bytes)
    positive_int("block_size", block_size)
    positive_int("tensor_parallel_size", tensor_parallel_size)
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
    if isinstance(activation_bytes, bool) or not isinstance(activation_bytes, int) or activation_bytes < 0:
        raise ValueError(f"activation_bytes must be an integer >= 0, got {activation_bytes!r}")
    if weight_bytes is not None and (isinstance(weight_bytes, bool) or not isinstance(weight_bytes, int) or weight_bytes < 0):
        raise ValueError(f"weight_bytes must be None or an integer >= 0, got {weight_bytes!r}")
    if shape.num_kv_heads % tensor_parallel_size:
        raise ValueError(
            f"tensor_parallel_size ({tensor_parallel_size}) must divide num_kv_heads ({shape.num_kv_heads}): "
            "each GPU holds a whole number of KV heads"
        )


def num_kv_blocks(
    shape: ModelShape,
    gpu_memory_bytes: int,
    gpu_memory_utilization: float = 0.9,
    block_size: int = 16,
    dtype: Any = "float16",
    kv_cache_dtype: Any = None,
    weight_bytes: int | None = None,
    activation_bytes: int = 0,
    tensor_parallel_size: int = 1,
) -> int:
    """How many KV blocks of ``block_size`` tokens fit on each GPU (vLLM's start-up profile).

    The budget per GPU is ``gpu_memory_bytes x gpu_memory_utilization`` minus this GPU's
    share of the weights (``weight_bytes``, default parameters x ``dtype`` bytes, split
    over ``tensor_parallel_size`` GPUs) minus ``activation_bytes`` (peak activations per
    GPU). Tensor parallelism also splits the KV heads, so a block per GPU holds
    ``num_kv_heads / tensor_parallel_size`` heads. ``kv_cache_dtype`` None (or "auto")
    means the same as ``dtype``. Raises ValueError when not even one block fits.

    ``shape`` may be any :class:`KVShape` when ``weight_bytes`` is given (then the
    parameter count is not needed): the lab engine sizes its pool with
    ``num_kv_blocks(kv_spec, kv_cache_memory_gib x 2**30, gpu_memory_utilization=1.0,
    block_size=..., dtype=..., weight_bytes=0)``.
    """
    _check_budget_args(shape, gpu_memory_bytes, gpu_memory_utilization, block_size, weight_bytes,
                       activation_bytes, tensor_parallel_size)
    dtype_name(dtype)  # the weights' dtype must be known too
    kv_dtype = dtype_name(dtype if kv_cache_dtype in (None, "auto") else kv_cache_dtype)
    # vLLM reserves total x utilization, loads the weights, profiles peak activations and
    # gives the rest to KV blocks; each block is block_size tokens of this GPU's KV heads.
    ### BEGIN SOLUTION
    if weight_bytes is None:
        weight_bytes = shape.num_parameters() * dtype_bytes(dtype)
    tp = tensor_parallel_size
    budget = int(gpu_memory_bytes * gpu_memory_utilization) - math.ceil(weight_bytes / tp) - activation_bytes
    block_bytes = block_size * kv_bytes_per_token(shape, kv_dtype) // tp
    if budget < block_bytes:
        raise ValueError(
            f"gpu_memory_bytes x gpu_memory_utilization ({int(gpu_memory_bytes * gpu_memory_utilization)} B) leaves "
            f"{budget} B after weights ({math.ceil(weight_bytes / tp)} B per GPU) and activations ({activation_bytes} B), "
            f"less than one KV block ({block_bytes} B): use more memory, a larger tensor_parallel_size or a smaller dtype"
        )
    return budget // block_bytes
    ### END SOLUTION


def max_concurrent_sequences(
    shape: ModelShape,
    gpu_memory_bytes: int,
    seq_len: int,
    gpu_memory_utilization: float = 0.9,
    block_size: int = 16,
    dtype: Any = "float16",
    kv_cache_dtype: Any = None,
    weight_bytes: int | None = None,
    activation_bytes: int = 0,
    tensor_parallel_size: int = 1,
) -> int:
    """How many sequences of ``seq_len`` tokens fit in the KV blocks at once.

    Each sequence takes ``ceil(seq_len / block_size)`` whole blocks (paging wastes only the
    tail of the last block, vLLM paper section 4.2). The other arguments are those of
    :func:`num_kv_blocks`. The answer is 0 when one sequence needs more blocks than fit.
    """
    positive_int("seq_len", seq_len)
    ### BEGIN SOLUTION
    blocks = num_kv_blocks(shape, gpu_memory_bytes, gpu_memory_utilization, block_size, dtype, kv_cache_dtype,
                           weight_bytes, activation_bytes, tensor_parallel_size)
    return blocks // math.ceil(seq_len / block_size)
    ### END SOLUTION
