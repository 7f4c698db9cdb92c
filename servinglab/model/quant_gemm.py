"""Quantized projections on CUDA through the student's fused kernel (Part 8b), tuned per shape.

On CUDA, :mod:`servinglab.model.gpu_ops` sends every ``QuantLinear`` (Part 8a's codes and
scales) here instead of calling its ``forward``, which would dequantize the whole
weight: :func:`quant_linear` runs ``quant_matmul`` of the implementation under test
(``solutions`` or ``exercises``.quant_gemm_triton), so no dequantized weight is ever
written and the step's bytes are the codes' bytes.

For one row (batch-1 decode) the candidates also include a GEMV without tensor cores
(:mod:`servinglab.model.triton.quant_gemv`). The launch configuration (kernel, tile
sizes, split-K count, warps, pipeline stages) is picked
per ``(format, N, K, row bucket)`` the first time a shape is seen, by timing a handful
of candidates (what ``triton.autotune`` does, but with the split-K count among the
choices and the workspace sized to it). Each timed run starts from a cold L2 cache, as a
layer's weights are in a decode step; the buffer written to evict it is twice the L2
size, not ``triton.testing.do_bench``'s fixed 256 MB, which would show up in the peak
memory of a quantized model whose whole point is its footprint. The engine's CUDA
graph runner runs every captured batch size once before capturing it, so tuning happens
there, never inside a capture (a shape first seen during capture takes
``default_config``). ``SERVINGLAB_QUANT_TUNE=0`` skips the timing (default configs).
"""

from __future__ import annotations

import os

import torch
import triton

from servinglab import impl

ROW_BUCKETS = (1, 16, 64, 256)  # one row (a GEMV candidate too), the split-K decode shape, then tiles
_tuned: dict[tuple, dict[str, int]] = {}
_gemv_counters: dict[torch.device, torch.Tensor] = {}


def row_bucket(m: int) -> int:
    """The tuning bucket of ``m`` rows: 1, 16, 64, 256 or 0 (more than 256)."""
    return next((b for b in ROW_BUCKETS if m <= b), 0)


def candidates(m: int, n: int, k: int, group_size: int | None) -> list[dict[str, int]]:
    """Launch configurations worth timing for ``[m, k] x [n, k]^T``.

    Decode rows (<= 16): one 16-row block, 32..128 columns a program, the split count
    chosen so about 2 or 4 programs per SM of an H200 (132) stream the weight; longer
    K blocks (more bytes in flight per program) for INT8, the group (at most 128) for INT4.
    Up to 256 rows: 32- or 64-row tiles, split-K again so the tiles fill the SMs; beyond,
    64..128-row tiles, no split.
    """
    kmax = 256 if group_size is None else group_size
    block_ks = sorted({bk for bk in (64, 128, kmax) if bk <= kmax and k % bk == 0})
    if m <= ROW_BUCKETS[1]:
        out = []
        for block_n, block_k, programs, stages in ((32, block_ks[-1], 264, 4), (64, block_ks[-1], 264, 4),
                                                   (32, block_ks[0], 528, 6), (128, block_ks[0], 528, 6),
                                                   (64, block_ks[-1], 528, 3)):
            tiles = triton.cdiv(n, block_n)
            split = max(1, min(programs // tiles, k // (2 * block_k)))
            out.append(dict(block_m=16, block_n=block_n, block_k=block_k, split_k=split, num_warps=4, num_stages=stages))
        if m == 1:  # the tensor-core-free GEMV (servinglab.model.triton.quant_gemv); INT4 also with one scale per group
            shapes = [(bn, bk) for bn, bk in ((32, 256), (16, 512), (64, 128)) if k % bk == 0]
            for block_n, block_k in shapes or [(32, 64), (64, 32)]:  # e.g. K = 576 (SmolLM2-135M): 64 | K
                if k % block_k == 0:
                    split = max(1, min(528 // triton.cdiv(n, block_n), k // (2 * block_k)))
                    out.append(dict(kernel=1, block_n=block_n, block_k=block_k, split_k=split, num_warps=4, num_stages=3))
                    if group_size is not None and block_k % group_size == 0:
                        out.append({**out[-1], "grouped": 1})
        return out
    bk = 64 if 64 in block_ks else block_ks[0]
    if m <= 256:  # few row blocks: split K as well, or N = 2048 gives 16-32 programs for 132 SMs
        block_m = 32 if m <= 32 else 64
        out = []
        for block_n, programs, warps in ((64, 264, 4), (128, 264, 4), (64, 528, 4), (128, 132, 8)):
            tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
            split = max(1, min(programs // tiles, k // (2 * bk)))
            out.append(dict(block_m=block_m, block_n=block_n, block_k=bk, split_k=split, num_warps=warps, num_stages=3))
        return out
    shapes = ((64, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4))
    return [dict(block_m=bm, block_n=bn, block_k=bk, split_k=1, num_warps=w, num_stages=s) for bm, bn, w, s in shapes]


def tuned_config(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int | None) -> dict[str, int]:
    """The fastest candidate for this shape (timed once per bucket), or the default inside a capture."""
    kernel = impl.load_part("quant_gemm_triton")
    m, k = x.shape
    n = qweight.shape[0]
    key = (impl.current_impl(), x.dtype, qweight.dtype, group_size, n, k, row_bucket(m))
    if key in _tuned:
        return _tuned[key]
    # e4m3 codes (servinglab.model.fp8_linear) take the one-row GEMV only: Part 8b's kernel is INT8/INT4.
    fp8 = qweight.dtype == torch.float8_e4m3fn
    choices = [cfg for cfg in candidates(m, n, k, group_size) if cfg.get("kernel") or not fp8]
    if x.device.type != "cuda" or torch.cuda.is_current_stream_capturing() or os.environ.get("SERVINGLAB_QUANT_TUNE", "1") == "0":
        return choices[0] if fp8 else kernel.default_config(m, n, k, group_size)
    best, best_ms = None, float("inf")
    flush = torch.empty(2 * _l2_bytes(x.device), dtype=torch.int8, device=x.device)
    for cfg in choices:
        try:
            ms = _cold_ms(lambda: _launch(x, qweight, scales, group_size, cfg), flush)
        except Exception:  # noqa: BLE001 - a candidate that does not compile or fit (shared memory) is skipped
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    _tuned[key] = best or (choices[0] if fp8 else kernel.default_config(m, n, k, group_size))
    return _tuned[key]


def _l2_bytes(device: torch.device) -> int:
    """The GPU's L2 cache size (50 MB on an H100, 60 MB on an H200; 64 MiB if torch does not say)."""
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 << 20)


def _cold_ms(fn, flush: torch.Tensor, warmup: int = 5, reps: int = 15) -> float:
    """Median milliseconds of ``fn`` on the current stream, the L2 cache evicted (``flush`` written) before each run."""
    for _ in range(warmup):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return sorted(start.elapsed_time(end) for start, end in events)[reps // 2]


def _launch(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int | None, cfg: dict[str, int]) -> torch.Tensor:
    """Run the configuration ``cfg``: Part 8b's ``quant_matmul``, or the GEMV when ``cfg["kernel"]`` is set."""
    if not cfg.get("kernel"):
        return impl.load_part("quant_gemm_triton").quant_matmul(x, qweight, scales, group_size, **cfg)
    from servinglab.model.triton.quant_gemv import quant_gemv

    counters = _gemv_counters.get(x.device)
    if counters is None:
        counters = _gemv_counters[x.device] = torch.zeros(1 << 16, dtype=torch.int32, device=x.device)
    params = {key: value for key, value in cfg.items() if key != "kernel"}
    return quant_gemv(x, qweight, scales, group_size, counters, **params)


def quant_linear(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for a ``QuantLinear`` on CUDA, through the fused kernel (``[..., K]`` -> ``[..., N]``)."""
    group = layer.group_size if layer.method == "int4" else None
    flat = x.reshape(-1, x.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    out = _launch(flat, layer.qweight, layer.scales, group, tuned_config(flat, layer.qweight, layer.scales, group))
    if layer.bias is not None:
        out = out + layer.bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def is_quantized(layer: torch.nn.Module) -> bool:
    """Whether ``layer`` carries Part 8a codes (``qweight``, ``scales``, ``method``) the fused kernel can run."""
    return getattr(layer, "method", None) in ("int8", "int4") and hasattr(layer, "qweight")
