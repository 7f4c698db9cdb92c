# Exercise stub generated from solutions/serving_stats.py by scripts/make_exercises.py.
# Fill in every `raise NotImplementedError` below; keep the signatures.
"""Part 6 (statistics): the latency numbers a serving system is judged by.

The latency numbers a serving system is judged by come from per-token timestamps
(the definitions of vLLM's ``benchmark_serving``). For a request sent at ``s`` whose
``n`` output tokens arrive at ``t_1 <= ... <= t_n``:

- TTFT (time to first token) = ``t_1 - s``: queueing plus prefill;
- TPOT (time per output token) = ``(t_n - t_1) / (n - 1)``, defined for ``n >= 2``: the
  decode rate this request saw (one value per request);
- ITL (inter-token latency) = every gap ``t_{i+1} - t_i`` (one value per gap, pooled
  over all requests): it shows the stalls a mean hides;
- E2E latency = ``t_n - s``;
- output throughput = all output tokens / (last token of any request - first send).

Percentiles use linear interpolation between order statistics (numpy's default): for
sorted values ``x_0..x_{m-1}``, ``p``-th percentile at rank ``h = (m - 1) p / 100`` is
``x_floor(h) + (h - floor(h)) (x_ceil(h) - x_floor(h))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

STATS = ("ttft", "tpot", "itl", "e2e")
PERCENTILES = (50, 90, 99)


@dataclass
class RequestTimestamps:
    """When one request was sent and when each of its output tokens arrived (perf_counter s)."""

    start: float
    token_times: list[float] = field(default_factory=list)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0 <= q <= 100) with linear interpolation (see the module docstring).

    Raises:
        ValueError: ``values`` is empty, or ``q`` is outside [0, 100].
    """
    # Hint: sort a copy; rank h = (len - 1) * q / 100; interpolate between floor(h) and ceil(h).
    raise NotImplementedError("percentile: your code here")


def compute_latency_stats(request_timestamps: Sequence[RequestTimestamps]) -> dict[str, float]:
    """Latency and throughput of a set of requests from their per-token timestamps.

    Args:
        request_timestamps: one :class:`RequestTimestamps` per request (a ``(start,
            token_times)`` tuple works too); a token that arrived with another repeats its time.

    Returns:
        ``num_requests``, ``total_output_tokens``, ``duration_s``, ``avg_throughput_tps``
        (output tokens/s), ``request_throughput`` (requests/s), and for each of ``ttft``,
        ``tpot``, ``itl``, ``e2e`` the keys ``avg_<name>_ms``, ``p50_<name>_ms``,
        ``p90_<name>_ms``, ``p99_<name>_ms`` in milliseconds (``nan`` when no request has
        that quantity, e.g. TPOT when every request made one token).

    Raises:
        ValueError: naming ``request_timestamps``, when it is empty, a request has no token
        times, its times decrease or come before its start, or the duration is zero.
    """
    # Hints: collect seconds per metric in lists (TTFT, TPOT, E2E: one per request; ITL: every
    # gap), then mean and percentile() of each, times 1000. duration = latest token - earliest start.
    raise NotImplementedError("compute_latency_stats: your code here")
