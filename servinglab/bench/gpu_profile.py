"""A decode step on a GPU under ``torch.profiler``: wall time, GPU busy share, launches per step.

- *GPU busy* is the union of the device intervals of kernels and copies (overlaps
  counted once, recorded under the profiler) divided by the wall-clock time of the same
  number of steps run *without* the profiler: the profiler adds host work of its own
  to every launch and copy (a 0.94 ms CUDA-graph step took about 1.6 ms under it on an
  H200), which would count as GPU idle time. Under 100% the GPU waits for the host
  (launch overhead, Python, synchronisation). ``gpu_busy_share_profiled`` keeps the
  share against the profiled wall time, a lower bound.
- *launches* counts the host's CUDA runtime/driver launch calls (``cudaLaunchKernel``,
  ``cuLaunchKernel*``, ``cudaGraphLaunch``, ``cudaMemcpyAsync``...): a CUDA-graph step is
  one ``cudaGraphLaunch`` plus the few eager kernels around it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq

import torch
from torch.profiler import ProfilerActivity, profile

from servinglab.engine.sampling import SamplingParams

LAUNCH_NAMES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch", "cudaMemcpyAsync", "cudaLaunchKernelExC",
                "cudaMemsetAsync")


def _busy_ms(events) -> float:
    """Union of device intervals (microseconds in, milliseconds out)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events)
    total, end = 0.0, float("-inf")
    for start, stop in spans:
        if start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total / 1000


def profile_gpu_decode(engine, prompts: Seq[list[int]], steps: int = 10) -> dict[str, float]:
    """Profile ``steps`` decode steps of ``engine`` (idle, on CUDA) with ``prompts`` all decoding.

    Returns:
        ``wall_ms`` per step (measured outside the profiler), ``gpu_busy_ms`` per step
        (inside it), ``gpu_busy_share`` (busy / ``wall_ms``, at most 1),
        ``gpu_busy_share_profiled`` (busy / wall inside the profiler) and ``launches`` per step.
    """
    if engine.has_unfinished_requests():
        raise ValueError("profile_gpu_decode needs an idle engine (it has unfinished requests)")
    params = SamplingParams(temperature=0.0, max_tokens=3 * steps + 8, ignore_eos=True)
    ids = [engine.add_request(list(p), params) for p in prompts]
    try:
        while any(s.is_prefill for s in [*engine.scheduler.waiting, *engine.scheduler.running]):
            engine.step()
        for _ in range(3):
            engine.step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / steps
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                engine.step()
            torch.cuda.synchronize()
            prof_wall = time.perf_counter() - t0
    finally:
        for request_id in ids:
            engine.abort_request(request_id)
        while engine.has_unfinished_requests():  # overlap scheduling: commit (discard) the step still in flight
            engine.step()
    events = prof.events()
    device = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    launches = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith(LAUNCH_NAMES))
    busy = _busy_ms(device)
    return {
        "wall_ms": 1000 * wall,
        "gpu_busy_ms": busy / steps,
        "gpu_busy_share": min(1.0, busy / steps / (1000 * wall)),
        "gpu_busy_share_profiled": busy / (1000 * prof_wall),
        "launches": launches / steps,
    }


def copy_bandwidth_gbs(device: torch.device | str = "cuda", nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Device-memory copy bandwidth in GB/s: the best of ``repeats`` copies of ``nbytes`` (bytes read + written).

    The floor of a batch-1 decode step is its weight bytes over this (each weight read once);
    ``bench throughput --device cuda`` reports the share of it a step reaches.
    """
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1000)
    del src, dst
    return 2 * nbytes / best / 1e9
