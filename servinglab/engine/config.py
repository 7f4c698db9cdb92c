"""One validated configuration for the lab engine, with vLLM's names and meanings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from servinglab.model.cpu_gemm import CPU_GEMM_MODES
from servinglab.model.dtypes import DTYPE_CHOICES, DTYPES, resolve_dtype
from servinglab.model.quant import DEFAULT_GROUP_SIZE, check_method

DEVICES = ("auto", "cpu", "cuda")
PREEMPTION_MODES = ("recompute", "swap")


@dataclass
class EngineConfig:
    """Engine settings (``vllm.EngineArgs`` names where the concept exists there).

    Attributes:
        model: a Hugging Face model folder (``servinglab prepare-model`` makes the course's).
        dtype: weights, activations and KV cache: ``auto`` (vLLM's default: bfloat16 on GPUs
            and on CPUs with native bfloat16, float32 on other CPUs; see
            :mod:`servinglab.model.dtypes`), ``float32``, ``bfloat16`` or ``float16``.
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
        enforce_eager: on CUDA, run every step eagerly instead of replaying captured
            CUDA graphs for decode steps (vLLM's flag, default ``False``); no effect on a
            CPU. See :mod:`servinglab.engine.cuda_runner`.
        tensor_parallel_size: ranks the model is split over (Part 9, Megatron-style; vLLM's
            name): ``k`` worker processes, one per GPU on CUDA. It must divide the model's
            heads, KV heads, intermediate size and vocabulary (checked at start-up).
            ``kv_cache_memory_gib`` is per rank. See :mod:`servinglab.engine.tp_executor`.
        pipeline_parallel_size: pipeline stages (Part 9b, vLLM's name): the decoder's layers split into
            ``p`` contiguous stages on ``p`` ranks (``tensor_parallel_size x p`` ranks in all), with ``p``
            micro-batches in flight, one per virtual engine, each with ``1/p`` of the KV blocks. See
            :mod:`servinglab.engine.pp_driver`.
        quantization: quantization of the decoder's projections (vLLM's name; Part 8):
            ``None`` (default), ``"int8"`` (per output channel) or ``"int4"`` (group-wise),
            weight-only; or ``"fp8"`` (e4m3 weights per channel, per-token e4m3 activations
            from two rows up; CUDA with compute capability >= 8.9 and bfloat16 only, see
            :mod:`servinglab.model.fp8_linear`); the embedding / LM head stay in ``dtype``.
            See :mod:`servinglab.model.quant`.
        preemption_mode: how a sequence preempted for lack of KV blocks gives them back
            (vLLM's name): ``"recompute"`` (default; its K/V are recomputed when it resumes)
            or ``"swap"`` (copied to a host pool and back). See :mod:`solutions.preemption`.
        swap_space: GiB of host memory for swapped-out KV blocks (vLLM's name, default 4),
            pinned on CUDA; allocated only with ``preemption_mode="swap"``. When it is
            full, a preempted sequence is recomputed instead (counted).
        async_scheduling: overlap scheduling (vLLM's name; SGLang's overlap loop): the host
            schedules and prepares step ``n + 1`` while the device runs step ``n``, whose sampled
            tokens reach step ``n + 1``'s inputs on the device. Same outputs as the synchronous
            loop for greedy and seeded sampling; a sequence that finished at step ``n`` is dropped
            one step late (its extra token discarded). ``None`` (default): on for a CUDA device
            where it is supported, off on the CPU (a CPU step has no device to overlap with: the
            same cores would run both); ``True`` / ``False`` force it. With ``speculative_config``
            the plain steps overlap, and a speculative step first commits the step in flight
            (drafts need the real tokens). Not with ``tensor_parallel_size > 1`` or
            ``pipeline_parallel_size > 1`` (``None`` turns it off there). See
            :mod:`servinglab.engine.async_scheduling`.
        quantization_group_size: INT4 group size, 32, 64 (default: divides SmolLM2's 576
            and 1536) or 128; it must divide every projection's input width.
    """

    model: str | None = None
    dtype: str = "auto"
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
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    quantization: str | None = None
    quantization_group_size: int = DEFAULT_GROUP_SIZE
    preemption_mode: str = "recompute"
    swap_space: float = 4.0
    async_scheduling: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {list(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.cpu_gemm is not None and self.cpu_gemm not in CPU_GEMM_MODES:
            raise ValueError(f"cpu_gemm must be one of {CPU_GEMM_MODES} or None, got {self.cpu_gemm!r}")
        check_method(self.quantization, self.quantization_group_size)  # names the parameter and allowed values
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but no CUDA device is available; use 'auto' or 'cpu'")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        tp = self.tensor_parallel_size
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {tp!r}")
        if tp > 1 and self.speculative_config is not None:
            raise ValueError("speculative_config is not supported with tensor_parallel_size > 1")
        if tp > 1 and self.quantization is not None:
            raise ValueError("quantization is not supported with tensor_parallel_size > 1")
        if self.quantization == "fp8":
            from servinglab.model.fp8_linear import fp8_unsupported_reason

            if reason := fp8_unsupported_reason(self.torch_device, self.torch_dtype):
                raise ValueError(reason)
        pp = self.pipeline_parallel_size
        if isinstance(pp, bool) or not isinstance(pp, int) or pp < 1:
            raise ValueError(f"pipeline_parallel_size must be a positive integer, got {pp!r}")
        for name, on in (("speculative_config", self.speculative_config is not None), ("quantization", self.quantization is not None),
                         ("preemption_mode='swap'", self.preemption_mode == "swap")):
            if pp > 1 and on:
                raise ValueError(f"{name} is not supported with pipeline_parallel_size > 1")
        if self.async_scheduling is not None and not isinstance(self.async_scheduling, bool):
            raise ValueError(f"async_scheduling must be True, False or None (on for CUDA where supported), got {self.async_scheduling!r}")
        if self.async_scheduling and (blocker := self._overlap_blocker()):
            raise ValueError(f"async_scheduling=True is not supported with {blocker}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {PREEMPTION_MODES}, got {self.preemption_mode!r}")
        swap = self.swap_space
        if isinstance(swap, bool) or not isinstance(swap, (int, float)) or not swap >= 0:
            raise ValueError(f"swap_space must be a number of GiB >= 0, got {swap!r}")
        if self.preemption_mode == "swap" and self.speculative_config is not None:
            raise ValueError("preemption_mode='swap' is not supported with speculative_config; use 'recompute'")
        if self.preemption_mode == "swap" and tp > 1:
            raise ValueError("preemption_mode='swap' is not supported with tensor_parallel_size > 1; use 'recompute'")
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
    def resolved_dtype(self) -> str:
        """The concrete dtype name: ``dtype``, or what ``auto`` means on this device."""
        return resolve_dtype(self.dtype, self.torch_device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.resolved_dtype]

    @property
    def use_async_scheduling(self) -> bool:
        """Whether the engine overlaps scheduling with the device step: ``async_scheduling``, or
        for ``None``, on a CUDA device when nothing rules it out."""
        if self.async_scheduling is not None:
            return self.async_scheduling
        return self.torch_device.type == "cuda" and self._overlap_blocker() is None

    def _overlap_blocker(self) -> str | None:
        """The first setting overlap scheduling does not support, or ``None``."""
        for name, on in (("tensor_parallel_size > 1", self.tensor_parallel_size > 1),
                         ("pipeline_parallel_size > 1", self.pipeline_parallel_size > 1),
                         ("distributed_executor_backend='mp'", self.extra.get("distributed_executor_backend") == "mp")):
            if on:
                return name
        return None

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)
