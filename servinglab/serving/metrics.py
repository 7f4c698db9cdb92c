"""Prometheus metrics of the lab server, under vLLM's names so the same dashboards read both.

Every server owns its own :class:`~prometheus_client.CollectorRegistry` (two servers in
one process, as in tests, never share counters). Gauges (running and waiting requests, KV
usage) are read from the engine when ``/metrics`` is scraped; counters and histograms are
fed once per finished request from its :class:`~servinglab.outputs.RequestOutput`.

Names follow vLLM v1 (``vllm/v1/metrics/loggers.py``): ``vllm:num_requests_running``,
``vllm:kv_cache_usage_perc`` (a fraction in [0, 1] despite the name),
``vllm:prompt_tokens_total``, ``vllm:request_success_total{finished_reason=...}``,
``vllm:time_to_first_token_seconds`` and so on. Older vLLM releases called the
inter-token latency ``vllm:time_per_output_token_seconds``; both names are exported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from servinglab.engine.engine import LLMEngine
    from servinglab.engine.outputs import RequestOutput

# Bucket edges in seconds, close to vLLM's, stretched for a CPU where a step can take a second.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)
FINISH_REASONS = ("stop", "length", "abort")


class ServerMetrics:
    """The metric families of one server, labelled with ``model_name`` like vLLM's."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r, labels = self.registry, ["model_name"]
        self.running = Gauge("vllm:num_requests_running", "Requests in model execution batches.", labels, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be processed.", labels, registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage: 1 means 100 percent.", labels, registry=r)
        self.prefix_queries = Counter("vllm:prefix_cache_queries", "Prefix-cache queries, in prompt tokens.", labels, registry=r)
        self.prefix_hits = Counter("vllm:prefix_cache_hits", "Prefix-cache hits, in prompt tokens.", labels, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed.", labels, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generation tokens processed.", labels, registry=r)
        self.preemptions = Counter("vllm:num_preemptions", "Cumulative preemptions.", labels, registry=r)
        self.success = Counter("vllm:request_success", "Finished requests.", labels + ["finished_reason"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", labels, buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between output tokens.", labels, buckets=ITL_BUCKETS, registry=r)
        self.itl_legacy = Histogram(
            "vllm:time_per_output_token_seconds", "Time between output tokens (older vLLM name).", labels, buckets=ITL_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "vllm:request_time_per_output_token_seconds", "Mean time per output token of a request.", labels, buckets=ITL_BUCKETS, registry=r
        )
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency.", labels, buckets=E2E_BUCKETS, registry=r)
        self.queue = Histogram("vllm:request_queue_time_seconds", "Time in the waiting queue.", labels, buckets=E2E_BUCKETS, registry=r)
        # Export every series up front, as vLLM does, so dashboards and rate() work from the start.
        for metric in (self.running, self.waiting, self.kv_usage, self.prefix_queries, self.prefix_hits, self.prompt_tokens,
                       self.generation_tokens, self.preemptions, self.ttft, self.itl, self.itl_legacy, self.tpot, self.e2e, self.queue):
            metric.labels(model_name)
        for reason in FINISH_REASONS:
            self.success.labels(model_name, reason)

    def observe_finished(self, out: RequestOutput) -> None:
        """Record a finished request (every completion of it) into the counters and histograms."""
        name, m = self.model_name, out.metrics
        num_prompt = len(out.prompt_token_ids)
        self.prompt_tokens.labels(name).inc(num_prompt)
        self.prefix_queries.labels(name).inc(num_prompt)
        self.prefix_hits.labels(name).inc(m.num_cached_tokens)
        self.generation_tokens.labels(name).inc(sum(len(c.token_ids) for c in out.outputs))
        self.preemptions.labels(name).inc(m.num_preemptions)
        for c in out.outputs:
            self.success.labels(name, c.finish_reason or "abort").inc()
        if m.ttft is not None:
            self.ttft.labels(name).observe(m.ttft)
        if m.first_scheduled_time is not None:
            self.queue.labels(name).observe(m.first_scheduled_time - m.arrival_time)
        for earlier, later in zip(m.token_times, m.token_times[1:]):
            self.itl.labels(name).observe(later - earlier)
            self.itl_legacy.labels(name).observe(later - earlier)
        if m.tpot is not None:
            self.tpot.labels(name).observe(m.tpot)
        if m.e2e_latency is not None:
            self.e2e.labels(name).observe(m.e2e_latency)

    def observe_aborted(self, num_completions: int = 1) -> None:
        """A request cancelled before it finished (its client went away)."""
        self.success.labels(self.model_name, "abort").inc(num_completions)

    def render(self, engine: LLMEngine) -> bytes:
        """Refresh the gauges from the engine and return the text exposition format."""
        name = self.model_name
        self.running.labels(name).set(len(engine.scheduler.running))
        self.waiting.labels(name).set(len(engine.scheduler.waiting))
        # The engine thread may be mid-step; a snapshot that races a dict resize is simply retried.
        for _ in range(5):
            try:
                self.kv_usage.labels(name).set(engine.block_manager.get_stats().usage)
                break
            except RuntimeError:
                continue
        return generate_latest(self.registry)
