"""Part 7b graded tests: histogram quantiles, parsing real /metrics text, the GPU-absent path.

The expected quantiles are worked by hand below with Prometheus' rule (``promql/quantile.go``):
find the bucket holding rank q * total, interpolate linearly inside it, lower edge 0 for
the first bucket, the largest finite bound when the rank falls in ``+Inf``. The /metrics
text is produced by ``prometheus_client`` itself, under vLLM v1's metric names.

Bugs these tests guard against, each caught by at least two of them
(``scripts/mutation_check.py`` plants them, with the balancer's in
``test_part7_load_balancer.py``): a histogram quantile that returns the bucket's upper
bound instead of interpolating; histograms of several label sets not summed.
"""

from __future__ import annotations

import math
import types

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

pytestmark = pytest.mark.part(7)
PROPERTY = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
INF = math.inf
# Cumulative counts: 2 observations <= 0.1, 6 <= 0.5, 8 <= 1.0, 10 in all.
BUCKETS = [(0.1, 2), (0.5, 6), (1.0, 8), (INF, 10)]


@pytest.mark.points(2)
def test_quantiles_match_hand_computed_values(monitoring):
    hq = monitoring.histogram_quantile
    # rank 5 lies in (0.1, 0.5], which holds observations 3..6: 0.1 + 0.4 * (5 - 2) / 4
    assert hq(0.5, BUCKETS) == pytest.approx(0.4), "interpolate linearly inside the bucket holding the rank"
    assert hq(0.1, BUCKETS) == pytest.approx(0.05), "the first bucket's lower edge is 0: 0.1 * 1 / 2"
    assert hq(0.2, BUCKETS) == pytest.approx(0.1), "rank 2 is the first bucket's last observation"
    assert hq(0.8, BUCKETS) == pytest.approx(1.0), "rank 8: 0.5 + 0.5 * (8 - 6) / 2"
    assert hq(0.5, [(0.1, 2), (0.5, 2), (1.0, 4), (INF, 4)]) == pytest.approx(0.1), \
        "the *first* bucket with cumulative count >= rank holds it (not the next non-empty one)"
    assert hq(0.9, BUCKETS) == 1.0, "a rank in the +Inf bucket gives the largest finite bound"
    assert hq(0.99, list(reversed(BUCKETS))) == 1.0, "buckets may come in any order"
    assert hq(0.5, list(reversed(BUCKETS))) == pytest.approx(0.4)
    assert math.isnan(hq(0.5, [(0.1, 0), (INF, 0)])), "no observations: NaN, as Prometheus"
    assert hq(0.25, [(-1.0, 1), (0.0, 2), (INF, 2)]) == -1.0, "a first bucket with bound <= 0 returns its bound"


@pytest.mark.points(1)
def test_quantile_bad_input(monitoring):
    hq = monitoring.histogram_quantile
    for q in (-0.1, 1.5):
        with pytest.raises(ValueError, match="q"):
            hq(q, BUCKETS)
    with pytest.raises(ValueError, match="Inf"):
        hq(0.5, [(0.1, 2), (0.5, 6)])
    with pytest.raises(ValueError, match="cumulative"):
        hq(0.5, [(0.1, 5), (0.5, 3), (INF, 6)])
    with pytest.raises(ValueError):
        hq(0.5, [(INF, 3)])


@PROPERTY
@given(st.lists(st.integers(0, 20), min_size=1, max_size=6), st.floats(0.01, 1.0), st.floats(0.01, 1.0))
@pytest.mark.points(1)
def test_quantiles_are_monotone_and_bounded(monitoring, counts, q1, q2):
    bounds = [0.5 * (i + 1) for i in range(len(counts))]
    cumulative = [sum(counts[: i + 1]) for i in range(len(counts))]
    buckets = list(zip(bounds, cumulative)) + [(INF, cumulative[-1] + 1)]
    lo, hi = sorted((q1, q2))
    a, b = monitoring.histogram_quantile(lo, buckets), monitoring.histogram_quantile(hi, buckets)
    assert 0 <= a <= b <= bounds[-1], f"quantiles must grow with q and stay in [0, {bounds[-1]}]: q={lo}->{a}, q={hi}->{b}"


def exposition() -> bytes:
    """A /metrics text as the lab server writes it: vLLM names, two label sets (two models)."""
    r = CollectorRegistry()
    label = ["model_name"]
    running = Gauge("vllm:num_requests_running", "running", label, registry=r)
    waiting = Gauge("vllm:num_requests_waiting", "waiting", label, registry=r)
    kv = Gauge("vllm:kv_cache_usage_perc", "kv", label, registry=r)
    queries = Counter("vllm:prefix_cache_queries", "q", label, registry=r)
    hits = Counter("vllm:prefix_cache_hits", "h", label, registry=r)
    pre = Counter("vllm:num_preemptions", "p", label, registry=r)
    prompt = Counter("vllm:prompt_tokens", "p", label, registry=r)
    gen = Counter("vllm:generation_tokens", "g", label, registry=r)
    ttft = Histogram("vllm:time_to_first_token_seconds", "t", label, buckets=(0.1, 0.5, 1.0), registry=r)
    itl = Histogram("vllm:inter_token_latency_seconds", "i", label, buckets=(0.01, 0.025, 0.05), registry=r)
    Histogram("vllm:e2e_request_latency_seconds", "e", label, buckets=(1.0, 2.0), registry=r).labels("m1")
    running.labels("m1").set(3), running.labels("m2").set(2), waiting.labels("m1").set(1)
    kv.labels("m1").set(0.25), kv.labels("m2").set(0.5)
    queries.labels("m1").inc(100), queries.labels("m2").inc(50), hits.labels("m1").inc(30), hits.labels("m2").inc(15)
    pre.labels("m1").inc(2), prompt.labels("m1").inc(150), gen.labels("m2").inc(40)
    for v in (0.05, 0.3, 0.3, 0.7):
        ttft.labels("m1").observe(v)
    for v in (0.2, 2.0):
        ttft.labels("m2").observe(v)
    itl.labels("m1").observe(0.02)
    return generate_latest(r)


@pytest.mark.points(3)
def test_parse_real_exposition(monitoring):
    m = monitoring.parse_metrics(exposition().decode())
    assert (m["running"], m["waiting"]) == (5, 1), "gauges are summed over label sets"
    assert m["kv_cache_usage"] == 0.5, "KV usage is the largest series (a fraction in [0, 1])"
    assert (m["prefix_cache_queries"], m["prefix_cache_hits"]) == (150, 45), "counters are exposed as <name>_total"
    assert m["prefix_cache_hit_rate"] == pytest.approx(0.3)
    assert (m["num_preemptions"], m["prompt_tokens"], m["generation_tokens"]) == (2, 150, 40)
    ttft = m["ttft"]
    # Merged cumulative buckets: <=0.1: 1, <=0.5: 4, <=1.0: 5, +Inf: 6.
    assert ttft["count"] == 6 and ttft["sum"] == pytest.approx(3.55) and ttft["mean"] == pytest.approx(3.55 / 6)
    assert ttft["p50"] == pytest.approx(0.1 + 0.4 * 2 / 3), "rank 3 in (0.1, 0.5], which holds observations 2..4"
    assert ttft["p90"] == 1.0 and ttft["p99"] == 1.0, "rank 5.4 and 5.94 fall in +Inf: the largest finite bound"
    assert m["itl"]["p50"] == pytest.approx(0.0175) and m["itl"]["count"] == 1
    e2e = m["e2e"]
    assert e2e["count"] == 0 and all(math.isnan(e2e[k]) for k in ("mean", "p50", "p90", "p99")), "no observations: NaN"


@pytest.mark.points(1)
def test_parse_reads_older_vllm_names_and_missing_ones(monitoring):
    text = ('# TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc{model_name="m"} 0.75\n'
            '# TYPE vllm:gpu_prefix_cache_queries counter\nvllm:gpu_prefix_cache_queries_total{model_name="m"} 10\n'
            '# TYPE vllm:gpu_prefix_cache_hits counter\nvllm:gpu_prefix_cache_hits_total{model_name="m"} 4\n')
    m = monitoring.parse_metrics(text)
    assert m["kv_cache_usage"] == 0.75 and m["prefix_cache_hit_rate"] == pytest.approx(0.4), "fall back to LEGACY names"
    assert m["running"] == 0.0 and m["ttft"]["count"] == 0, "an absent metric reads as 0 / no observations"


@pytest.mark.points(1)
def test_parse_sums_label_sets_by_hand(monitoring):
    # Two engines (label sets) of one server. TTFT buckets le 0.1 / 0.5 / +Inf: engine 0 has 2 / 6 / 8,
    # engine 1 has 2 / 2 / 2, so the server's histogram is 4 / 8 / 10. p50: rank 5 lies in (0.1, 0.5]
    # with 4 below and 4 inside: 0.1 + 0.4 * (5 - 4) / 4 = 0.2. p90: rank 9 lies in +Inf: 0.5. mean 2.1 / 10.
    h = "vllm:time_to_first_token_seconds"
    text = f"# TYPE {h} histogram\n"
    for engine, counts, total in (("0", (2, 6, 8), 2.0), ("1", (2, 2, 2), 0.1)):
        for le, c in zip(("0.1", "0.5", "+Inf"), counts):
            text += f'{h}_bucket{{engine="{engine}",le="{le}"}} {c}\n'
        text += f'{h}_count{{engine="{engine}"}} {counts[-1]}\n{h}_sum{{engine="{engine}"}} {total}\n'
    text += ('# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{engine="0"} 3\nvllm:num_requests_running{engine="1"} 1\n'
             '# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{engine="0"} 0.5\nvllm:kv_cache_usage_perc{engine="1"} 0.25\n')
    m = monitoring.parse_metrics(text)
    ttft = m["ttft"]
    assert (ttft["count"], ttft["p50"], ttft["p90"]) == (10, pytest.approx(0.2), 0.5), (
        f"label sets must be added bucket by bucket before the quantile: got count {ttft['count']}, p50 {ttft['p50']}, p90 {ttft['p90']}"
    )
    assert ttft["mean"] == pytest.approx(0.21)
    assert m["running"] == 4 and m["kv_cache_usage"] == 0.5, "gauges: running is summed over label sets, kv_cache_usage takes the largest"


class NVMLError(Exception):
    pass


def fake_nvml(fail: str | None = None) -> types.SimpleNamespace:
    """A stand-in for pynvml: one device, or an init that fails like a machine without a driver."""
    calls: list[str] = []

    def init() -> None:
        calls.append("init")
        if fail:
            raise NVMLError(fail)

    mem = types.SimpleNamespace(used=3 * 2**30, total=80 * 2**30)
    return types.SimpleNamespace(
        NVMLError=NVMLError, NVML_TEMPERATURE_GPU=0, calls=calls, nvmlInit=init,
        nvmlShutdown=lambda: calls.append("shutdown"), nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: f"h{i}", nvmlDeviceGetName=lambda h: b"NVIDIA H100",
        nvmlDeviceGetMemoryInfo=lambda h: mem, nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=37),
        nvmlDeviceGetTemperature=lambda h, kind: 61, nvmlDeviceGetPowerUsage=lambda h: 250_500)


@pytest.mark.points(1)
def test_gpu_absent_is_reported_not_raised(monitoring):
    status, devices = monitoring.gpu_metrics(fake_nvml(fail="NVML Shared Library Not Found"))
    assert status.startswith("no NVIDIA device") and "Library Not Found" in status and devices == []
    status, devices = monitoring.gpu_metrics()  # the real NVML of this machine
    assert status == "ok" or status.startswith("no NVIDIA device"), status
    assert (status == "ok") == bool(devices)
    snap = monitoring.PerformanceMonitor(nvml=fake_nvml(fail="Driver Not Loaded")).collect_metrics()
    assert snap["gpu_status"].startswith("no NVIDIA device") and snap["gpu_metrics"] == []


@pytest.mark.points(1)
def test_gpu_device_fields_and_units(monitoring):
    nvml = fake_nvml()
    status, devices = monitoring.gpu_metrics(nvml)
    assert status == "ok" and len(devices) == 1
    d = devices[0]
    assert (d["id"], d["name"], d["utilization"], d["temperature"]) == (0, "NVIDIA H100", 37.0, 61.0)
    assert (d["memory_used"], d["memory_total"]) == (3 * 1024, 80 * 1024), "memory in MiB"
    assert d["power_watts"] == pytest.approx(250.5), "NVML reports milliwatts"
    assert nvml.calls == ["init", "shutdown"], "shut NVML down after reading"


@pytest.mark.points(2)
def test_collect_metrics_snapshot_and_history(monitoring):
    text = exposition().decode()

    def fetch(url: str) -> str:
        if url == "http://dead":
            raise ConnectionError("connection refused")
        return text

    mon = monitoring.PerformanceMonitor(["http://a", "http://dead"], fetch=fetch, nvml=fake_nvml(fail="no driver"), max_history=2)
    snaps = [mon.collect_metrics() for _ in range(3)]
    assert len(mon.metrics) == 2 and mon.metrics == snaps[1:], "keep only the newest max_history snapshots"
    s = snaps[-1]
    assert 0 <= s["cpu_percent"] <= 100 and 0 < s["memory_percent"] <= 100
    assert 0 < s["memory_used_bytes"] <= s["memory_total_bytes"] and s["timestamp"] > 1e9
    assert s["backends"]["http://a"]["running"] == 5
    assert "connection refused" in s["backends"]["http://dead"]["error"], "a dead backend is reported, not raised"
    with pytest.raises(ValueError, match="max_history"):
        monitoring.PerformanceMonitor(max_history=0)


@pytest.mark.points(1)
def test_collect_scrapes_a_real_http_endpoint(monitoring):
    registry = CollectorRegistry()
    Gauge("vllm:num_requests_waiting", "waiting", ["model_name"], registry=registry).labels("m").set(7)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        snap = monitoring.PerformanceMonitor([url], nvml=fake_nvml(fail="no driver")).collect_metrics()
        assert snap["backends"][url]["waiting"] == 7
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
