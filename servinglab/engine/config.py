"""One validated configuration for the lab engine, with vLLM's names and meanings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from servinglab.model.cpu_gemm import CPU_GEMM_MODES

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class EngineConfig:
    """Engine settings (``vllm.EngineArgs`` names where the concept exists there).

    Attributes:
        model: a Hugging Face model folder (``servinglab prepare-model`` makes the course's).
        dtype: weights, activations and KV cache: ``float32``, ``bfloat16`` or ``float16``.
        max_model_len: longest sequence (prompt + output) served; default: the model's
            ``max_position_embeddings`` capped at 2048.
        block_size: tokens per KV block (vLLM's default 16; the paper's best range is 16-128).
        max_num_seqs: most sequences in one step.
        max_num_batched_tokens: the token budget of one step (prefill chunks + decodes).
        enable_chunked_prefill: split long prompts across steps (Sarathi-style).
        enable_prefix_caching: reuse KV blocks of identical prompt prefixes.
        num_kv_blocks: exact KV pool size; overrides ``kv_cache_memory_gib``.
        kv_cache_memory_gib: memory for the KV pool when ``num_kv_blocks`` is not set
            (like ``VLLM_CPU_KVCACHE_SPACE``).
        device: ``auto`` (cuda when present), ``cpu`` or ``cuda``.
        seed: seeds random weights (tiny configs) and unseeded sampling.
        speculative_config: ``{"method": "ngram" | "draft", "num_speculative_tokens": k, ...}``.
        cpu_gemm: matrix-product kernels for bfloat16/float16 on a CPU: ``auto`` (packed
            oneDNN weights, float32 sgemm for big batches without AMX), ``onednn`` (packed
            only) or ``torch`` (plain ``F.linear``); ``None`` reads ``SERVINGLAB_CPU_GEMM``,
            default ``auto``. See :mod:`servinglab.model.cpu_gemm`.
    """

    model: str | None = None
    dtype: str = "bfloat16"
    max_model_len: int | None = None
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    num_kv_blocks: int | None = None
    kv_cache_memory_gib: float = 1.0
    device: str = "auto"
    seed: int = 0
    speculative_config: dict[str, Any] | None = None
    cpu_gemm: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.cpu_gemm is not None and self.cpu_gemm not in CPU_GEMM_MODES:
            raise ValueError(f"cpu_gemm must be one of {CPU_GEMM_MODES} or None, got {self.cpu_gemm!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but no CUDA device is available; use 'auto' or 'cpu'")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"max_model_len must be an integer >= 2, got {self.max_model_len!r}")
        if self.num_kv_blocks is not None and (not isinstance(self.num_kv_blocks, int) or self.num_kv_blocks < 1):
            raise ValueError(f"num_kv_blocks must be a positive integer, got {self.num_kv_blocks!r}")
        if not self.kv_cache_memory_gib > 0:
            raise ValueError(f"kv_cache_memory_gib must be > 0, got {self.kv_cache_memory_gib!r}")
        if not self.enable_chunked_prefill and self.max_model_len is not None and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"without chunked prefill max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_model_len ({self.max_model_len}), or a long prompt could never be scheduled"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)
