"""The router's state besides its routes: the balancer, the health checker and the metrics.

The policy itself is the student's Part 7a (``load_part("load_balancer")``): this module
only calls its public face (``select_instance``, ``start_request``, ``finish_request``,
``report_success``, ``report_failure``). The health checker probes every backend's
``GET /health`` each ``health_interval`` seconds, so a dead backend leaves the pool within
one interval (or at once, when a request to it fails) and comes back after the balancer's
``recovery_successes`` good probes (once its circuit breaker's cooldown has passed).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Metric,
    generate_latest,
)
from prometheus_client.parser import text_string_to_metric_families

from servinglab import impl

SCRAPE_TIMEOUT_S = 2.0  # a frozen backend must not hold the router's /metrics for long
TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
# The router's own series; the dashboards in deploy/ read these names (a test checks they exist).
ROUTER_METRICS = ("router_requests_total", "router_retries_total", "router_no_healthy_backend_total",
                  "router_outstanding_requests", "router_backend_healthy", "router_time_to_first_byte_seconds")


class RouterMetrics:
    """Prometheus series of one router (its own registry, as each lab server has)."""

    def __init__(self, urls: list[str]) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("router_requests", "Requests answered, by backend and HTTP status.", ["backend", "status"], registry=r)
        self.retries = Counter("router_retries", "Attempts that failed before the first byte and were retried.", ["backend"], registry=r)
        self.no_backend = Counter("router_no_healthy_backend", "Requests refused with no healthy backend.", registry=r)
        self.outstanding = Gauge("router_outstanding_requests", "Requests in flight per backend.", ["backend"], registry=r)
        self.healthy = Gauge("router_backend_healthy", "1 while the backend is in the pool.", ["backend"], registry=r)
        self.ttfb = Histogram("router_time_to_first_byte_seconds", "Request arrival to the backend's first byte.", ["backend"],
                              buckets=TTFB_BUCKETS, registry=r)
        for url in urls:
            self.requests.labels(url, "200"), self.retries.labels(url), self.outstanding.labels(url), self.healthy.labels(url).set(1), self.ttfb.labels(url)

    def render(self, balancer: Any) -> bytes:
        """Refresh the gauges from the balancer and return the text exposition format."""
        for b in balancer.instances:
            self.outstanding.labels(b.url).set(b.load)
            self.healthy.labels(b.url).set(1 if b.healthy else 0)
        return generate_latest(self.registry)


class BackendSeries:
    """A collector of families read from the backends' ``/metrics`` (one scrape, relabelled)."""

    def __init__(self) -> None:
        self.families: dict[str, Metric] = {}

    def add(self, url: str, text: str) -> None:
        """Keep the ``vllm:*`` families of one backend's exposition, each sample labelled ``backend=url``."""
        for fam in text_string_to_metric_families(text):
            if fam.name.startswith("vllm:"):
                out = self.families.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type))
                for sample in fam.samples:
                    out.add_sample(sample.name, {**sample.labels, "backend": url}, sample.value, sample.timestamp)

    def collect(self) -> list[Metric]:
        return list(self.families.values())


@dataclass
class RouterState:
    """Everything the routes share. ``balancer`` is an ``LLMLoadBalancer`` (Part 7a)."""

    balancer: Any
    health_interval: float = 1.0
    max_body_bytes: int = 1 << 20
    read_timeout: float = 60.0  # seconds without a byte mid-stream before the stream ends (servinglab.serving.upstream)
    client: httpx.AsyncClient = field(default_factory=lambda: httpx.AsyncClient(
        timeout=httpx.Timeout(None, connect=5.0), limits=httpx.Limits(max_connections=2000, max_keepalive_connections=200)))
    metrics: RouterMetrics = field(init=False)
    probes: int = 0  # health-check rounds done (tests wait on it instead of sleeping blindly)

    def __post_init__(self) -> None:
        self.metrics = RouterMetrics([b.url for b in self.balancer.instances])

    async def backend_series(self) -> bytes:
        """Every healthy backend's engine series (``vllm:*``), labelled by backend, in the text format."""
        async def scrape(url: str) -> tuple[str, str]:
            try:
                r = await self.client.get(f"{url}/metrics", timeout=SCRAPE_TIMEOUT_S)
                return url, r.text if r.status_code == 200 else ""
            except httpx.HTTPError:
                return url, ""

        series = BackendSeries()
        for url, text in await asyncio.gather(*(scrape(b.url) for b in self.balancer.instances if b.healthy)):
            with contextlib.suppress(ValueError):  # a backend that answers something else is left out
                series.add(url, text)
        return generate_latest(series)

    @property
    def urls(self) -> list[str]:
        return [b.url for b in self.balancer.instances]

    async def probe_all(self) -> None:
        """One round of ``GET /health`` on every backend, reported to the balancer."""
        timeout = max(0.5, min(self.health_interval, 5.0))

        async def probe(url: str) -> None:
            try:
                ok = (await self.client.get(f"{url}/health", timeout=timeout)).status_code == 200
            except httpx.HTTPError:
                ok = False
            (self.balancer.report_success if ok else self.balancer.report_failure)(url)

        await asyncio.gather(*(probe(u) for u in self.urls))
        self.probes += 1

    async def health_loop(self) -> None:
        """Probe forever, every ``health_interval`` seconds (cancelled at shutdown)."""
        while True:
            with contextlib.suppress(Exception):  # a checker that dies would freeze the pool
                await self.probe_all()
            await asyncio.sleep(self.health_interval)


def make_balancer(urls: list[str], policy: str, **options: Any) -> Any:
    """The student's ``LLMLoadBalancer`` over ``urls`` (``SERVINGLAB_IMPL`` picks whose)."""
    lb_module = impl.load_part("load_balancer")
    return lb_module.LLMLoadBalancer([u.rstrip("/") for u in urls], policy=policy, **options)


def no_backend_error() -> type[Exception]:
    """The balancer module's ``NoHealthyBackendError``."""
    return impl.load_part("load_balancer").NoHealthyBackendError
