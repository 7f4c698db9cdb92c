# Exercise stub generated from solutions/monitoring.py by scripts/make_exercises.py.
# Fill in every `raise NotImplementedError` below; keep the signatures.
"""Part 7b: watch the machine and every backend server (the seed's ``PerformanceMonitor``).

Three sources, each read the way production tools read it:

* The host: ``psutil`` (CPU percent since the last call, memory).
* NVIDIA GPUs: NVML through ``nvidia-ml-py`` (``import pynvml``), the library
  ``nvidia-smi`` itself is built on: utilization, memory, temperature, power. (GPUtil,
  the seed's choice, shells out to nvidia-smi and has not been released since 2018.) A
  machine without an NVIDIA driver is normal: the GPU section then says
  ``"no NVIDIA device"`` with NVML's reason instead of failing.
* Each backend's ``GET /metrics`` in Prometheus' text format, parsed with
  ``prometheus_client.parser.text_string_to_metric_families``. The names are vLLM v1's
  (``vllm/v1/metrics/loggers.py``), so one monitor reads the lab server and a real vLLM:
  gauges ``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
  ``vllm:kv_cache_usage_perc`` (a fraction in [0, 1]); counters
  ``vllm:prefix_cache_queries`` / ``vllm:prefix_cache_hits`` (prompt tokens),
  ``vllm:num_preemptions``, ``vllm:prompt_tokens``, ``vllm:generation_tokens``;
  histograms ``vllm:time_to_first_token_seconds``, ``vllm:inter_token_latency_seconds``,
  ``vllm:e2e_request_latency_seconds``. Older vLLM names (``gpu_cache_usage_perc``,
  ``gpu_prefix_cache_*``, ``time_per_output_token_seconds``) are read when the new
  ones are absent.

A histogram has no percentiles, only cumulative bucket counts; :func:`histogram_quantile`
estimates them exactly as Prometheus' ``histogram_quantile`` does (``promql/quantile.go``).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

GAUGES = {"running": "vllm:num_requests_running", "waiting": "vllm:num_requests_waiting",
          "kv_cache_usage": "vllm:kv_cache_usage_perc"}
COUNTERS = {"prefix_cache_queries": "vllm:prefix_cache_queries", "prefix_cache_hits": "vllm:prefix_cache_hits",
            "num_preemptions": "vllm:num_preemptions", "prompt_tokens": "vllm:prompt_tokens",
            "generation_tokens": "vllm:generation_tokens"}
HISTOGRAMS = {"ttft": "vllm:time_to_first_token_seconds", "itl": "vllm:inter_token_latency_seconds",
              "e2e": "vllm:e2e_request_latency_seconds"}
LEGACY = {"vllm:kv_cache_usage_perc": "vllm:gpu_cache_usage_perc", "vllm:prefix_cache_queries": "vllm:gpu_prefix_cache_queries",
          "vllm:prefix_cache_hits": "vllm:gpu_prefix_cache_hits",
          "vllm:inter_token_latency_seconds": "vllm:time_per_output_token_seconds"}
QUANTILES = (0.5, 0.9, 0.99)


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float:
    """The ``q``-quantile of a histogram, as Prometheus' ``histogram_quantile`` computes it.

    ``buckets`` are ``(upper_bound, cumulative_count)`` pairs in any order; the largest
    bound must be ``math.inf`` (the ``le="+Inf"`` bucket, whose count is the total).

    1. Sort by upper bound; ``rank = q * total``.
    2. Take the first bucket whose cumulative count is ``>= rank``.
    3. If it is the ``+Inf`` bucket, return the largest finite bound (nothing better is known).
    4. Otherwise interpolate linearly inside it: ``lower + (upper - lower) * (rank - count
       below) / (count in bucket)``, where ``lower`` is the previous bound, or 0 for the
       first bucket (if that bucket's bound is <= 0, return the bound itself).

    Returns ``math.nan`` when there are no observations (total 0), and, as Prometheus (0/0),
    for ``q = 0`` when the first bucket is empty.

    Raises:
        ValueError: ``q`` is not in [0, 1]; fewer than 2 buckets; no ``+Inf`` bucket; or the
            cumulative counts decrease (not a cumulative histogram).
    """
    raise NotImplementedError("histogram_quantile: your code here")


def parse_metrics(text: str) -> dict[str, Any]:
    """Read one ``/metrics`` text into plain numbers (every label set of a name summed).

    Returns a dict with, for each key of ``GAUGES`` and ``COUNTERS``, the value (0.0 when the
    server does not export it; ``kv_cache_usage`` takes the *largest* series, the others the
    sum); ``prefix_cache_hit_rate`` = hits / queries (0.0 without queries); and for each key
    of ``HISTOGRAMS`` a dict ``{"count", "sum", "mean", "p50", "p90", "p99"}`` (``mean`` and
    the quantiles are ``nan`` without observations). A name missing from ``text`` is looked
    up under its ``LEGACY`` name. Buckets of the same ``le`` are summed over label sets.
    """
    raise NotImplementedError("parse_metrics: your code here")


def gpu_metrics(nvml: ModuleType | None = None) -> tuple[str, list[dict[str, Any]]]:
    """``(status, devices)`` from NVML: status ``"ok"``, or ``"no NVIDIA device: <reason>"``.

    ``nvml`` is the ``pynvml`` module (imported when ``None``; tests pass a stand-in). When
    the import fails or ``nvmlInit()`` raises ``nvml.NVMLError`` (no driver, no library),
    return ``("no NVIDIA device: <reason>", [])``. Otherwise one dict per device:
    ``id``, ``name``, ``utilization`` (percent), ``memory_used`` and ``memory_total`` (MiB),
    ``temperature`` (degrees C), ``power_watts`` (NVML reports milliwatts); always call
    ``nvmlShutdown()`` after a successful init.
    """
    raise NotImplementedError("gpu_metrics: your code here")


def fetch_metrics_text(url: str, timeout: float = 5.0) -> str:
    """``GET {url}/metrics`` and return the text (raises ``httpx.HTTPError`` on failure)."""
    response = httpx.get(f"{url.rstrip('/')}/metrics", timeout=timeout)
    response.raise_for_status()
    return response.text


class PerformanceMonitor:
    """Collect host, GPU and backend metrics into ``self.metrics`` (one dict per call).

    Args:
        backends: base URLs whose ``/metrics`` to scrape (may be empty).
        fetch: ``url -> /metrics text``; :func:`fetch_metrics_text` by default.
        nvml: the NVML module for :func:`gpu_metrics` (``None``: import ``pynvml``).
        max_history: most snapshots kept in ``self.metrics`` (>= 1; the oldest go first).
    """

    def __init__(self, backends: Sequence[str] = (), *, fetch: Callable[[str], str] = fetch_metrics_text,
                 nvml: ModuleType | None = None, max_history: int = 1000) -> None:
        if max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {max_history}")
        self.backends, self.fetch, self.nvml, self.max_history = list(backends), fetch, nvml, max_history
        self.metrics: list[dict[str, Any]] = []
        psutil.cpu_percent(interval=None)  # the first call only starts psutil's measuring window

    def collect_metrics(self) -> dict[str, Any]:
        """Take one snapshot, append it to ``self.metrics`` (dropping the oldest past
        ``max_history``) and return it.

        Keys: ``timestamp`` (``time.time()``), ``cpu_percent``, ``memory_percent``,
        ``memory_used_bytes``, ``memory_total_bytes`` (psutil), ``gpu_status`` and
        ``gpu_metrics`` (:func:`gpu_metrics`), and ``backends``: for each URL,
        :func:`parse_metrics` of its text, or ``{"error": "<message>"}`` when fetching or
        parsing raised (one dead backend must not stop the monitor).
        """
        raise NotImplementedError("collect_metrics: your code here")
