"""The router over three real lab servers (real model, child processes, loopback only).

Checks: streams pass through byte for byte, errors have OpenAI bodies, round robin
spreads requests evenly, "no healthy backend" is a 503, and the fault test: one of three
backends is killed under load; no request that had not started streaming fails, the dead
one leaves the pool within the health interval, comes back when restarted, and every
backend ends with all KV blocks free.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import json
import os
import re
import subprocess
import time
import types

import httpx
import pytest
from test_deploy import dashboard_metric_names, exported_series

from servinglab import impl
from servinglab.bench.servers import ServerProcess, free_port, lab_server_command
from servinglab.model.prepare import default_model_dir, is_prepared
from servinglab.serving.router import router_command

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not is_prepared(), reason="model not prepared: run `servinglab prepare-model`"),
]

NAME, INTERVAL = "smol", 0.5
ENV = {"SERVINGLAB_IMPL": "solutions", "OMP_NUM_THREADS": "1"}


def backend_command(port: int) -> list[str]:
    # max_num_seqs 4: under load most requests wait in the queue, before their first byte.
    return lab_server_command(str(default_model_dir()), port, NAME, max_model_len=512, max_num_seqs=4, extra=("--num-kv-blocks", "256"))


def start_router(backends: list[str], policy: str, *options: str) -> ServerProcess:
    cmd = lambda port: router_command(backends, port, policy, "--health-interval", str(INTERVAL), *options)
    return ServerProcess(cmd, env=ENV, startup_timeout=60, name=f"router-{policy}").__enter__()


@pytest.fixture(scope="module")
def backends():
    """Three lab servers started side by side; a test may replace one (restart), all stop at the end."""
    procs = [ServerProcess(backend_command, env=ENV, startup_timeout=300, name=f"backend-{i}") for i in range(3)]
    try:
        with cf.ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda p: p.__enter__(), procs))
        yield procs
    finally:
        for p in procs:
            p.stop()


def metric(base_url: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when absent)."""
    total = 0.0
    for line in httpx.get(f"{base_url}/metrics", timeout=30).text.splitlines():
        m = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def wait_idle(base_url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(metric(base_url, n) == 0 for n in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")):
            return
        time.sleep(0.25)
    raise AssertionError(f"{base_url} did not go idle: requests or KV blocks left over")


def router_health(router: str) -> dict:
    return httpx.get(f"{router}/health", timeout=10).json()


def wait_probes(router: str, rounds: int, timeout: float = 30.0) -> dict:
    """Wait until the router has run ``rounds`` more health-check rounds; return its /health body."""
    start = router_health(router).get("probes", 0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = router_health(router)
        if body.get("probes", 0) >= start + rounds:
            return body
        time.sleep(INTERVAL / 4)
    raise AssertionError(f"the router ran fewer than {rounds} health rounds in {timeout} s")


def test_stream_passes_through_and_errors_are_openai_shaped(backends):
    router = start_router([b.base_url for b in backends], "round_robin")
    try:
        body = {"model": NAME, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "ignore_eos": True, "stream": True}
        direct = httpx.post(f"{backends[0].base_url}/v1/completions", json=body, timeout=120)
        via = httpx.post(f"{router.base_url}/v1/completions", json=body, timeout=120)
        assert via.status_code == 200 and via.headers["content-type"].startswith("text/event-stream")
        texts = [[json.loads(line[5:])["choices"][0]["text"] for line in r.text.splitlines() if line.startswith("data: {")] for r in (direct, via)]
        assert texts[0] == texts[1] and via.text.rstrip().endswith("data: [DONE]"), "the SSE chunks must pass through unchanged"
        chat = httpx.post(f"{router.base_url}/v1/chat/completions", timeout=120,
                          json={"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"
        assert NAME in [m["id"] for m in httpx.get(f"{router.base_url}/v1/models", timeout=30).json()["data"]]
        for content, status in ((b"{not json", 400), (b"[1, 2]", 400), (b"x" * (2 << 20), 413)):
            r = httpx.post(f"{router.base_url}/v1/completions", content=content, timeout=30)
            assert r.status_code == status and r.json()["error"]["code"] == status, r.text
        r = httpx.post(f"{router.base_url}/v1/completions", json={**body, "model": "nope"}, timeout=30)
        assert r.status_code == 404 and r.json()["error"]["param"] == "model", "a backend's 4xx passes through"
        assert httpx.get(f"{router.base_url}/nothing", timeout=10).json()["error"]["code"] == 404
        # Six sequential requests under round robin: two per backend.
        before = [metric(router.base_url, "router_requests_total", backend=b.base_url) for b in backends]
        for i in range(6):
            assert httpx.post(f"{router.base_url}/v1/completions", json={**body, "stream": False, "prompt": f"Count {i}"}, timeout=120).status_code == 200
        after = [metric(router.base_url, "router_requests_total", backend=b.base_url) for b in backends]
        assert [a - b for a, b in zip(after, before)] == [2, 2, 2]
        live = exported_series(httpx.get(f"{backends[0].base_url}/metrics", timeout=30).text)
        live |= exported_series(httpx.get(f"{router.base_url}/metrics", timeout=30).text)
        assert not dashboard_metric_names() - live, "deploy/grafana-dashboard.json queries series the live servers lack"
        snap = impl.load_part("monitoring").PerformanceMonitor([b.base_url for b in backends]).collect_metrics()
        assert all(snap["backends"][b.base_url]["ttft"]["count"] >= 2 for b in backends), "the Part 7b monitor reads the lab server"
    finally:
        router.stop()
    for b in backends:
        wait_idle(b.base_url)


def test_no_healthy_backend_is_a_503():
    dead, port = f"http://127.0.0.1:{free_port()}", free_port()  # nothing listens on `dead`
    proc = subprocess.Popen(router_command([dead], port, "least_outstanding"), env={**os.environ, **ENV},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    router = types.SimpleNamespace(base_url=f"http://127.0.0.1:{port}", stop=lambda: (proc.terminate(), proc.wait(30)))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:  # up once /health answers at all (503 here)
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(f"{router.base_url}/health", timeout=2)
                break
            time.sleep(0.5)
        r = httpx.post(f"{router.base_url}/v1/completions", json={"model": NAME, "prompt": "hi"}, timeout=30)
        assert r.status_code == 503 and "no healthy backend" in r.json()["error"]["message"]
        assert r.json()["error"]["type"] == "ServiceUnavailableError"
        assert httpx.get(f"{router.base_url}/health", timeout=10).status_code == 503
    finally:
        router.stop()


async def one_request(client: httpx.AsyncClient, router: str, i: int) -> dict:
    """Stream one completion; record whether any data arrived before it failed."""
    body = {"model": NAME, "prompt": f"Request {i}: tell me a story about the sea.", "max_tokens": 24,
            "temperature": 0, "ignore_eos": True, "stream": True}
    rec = {"i": i, "started": False, "done": False, "error": ""}
    try:
        async with client.stream("POST", f"{router}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                rec["error"] = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return rec
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    rec["started"] = True
                elif line.strip() == "data: [DONE]":
                    rec["done"] = True
    except httpx.HTTPError as exc:
        rec["error"] = f"{type(exc).__name__}: {exc}"
    if not rec["done"] and not rec["error"]:
        rec["error"] = "stream ended without [DONE]"
    return rec


async def load_then_kill(router: str, victim: ServerProcess, num: int, concurrency: int) -> list[dict]:
    """``num`` streaming requests, ``concurrency`` at a time; kill ``victim`` once 6 have started streaming."""
    sem, records = asyncio.Semaphore(concurrency), []
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as client:

        async def guarded(i: int) -> None:
            async with sem:
                records.append(await one_request(client, router, i))

        tasks = [asyncio.create_task(guarded(i)) for i in range(num)]
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and metric(router, "router_requests_total") < 6:
            await asyncio.sleep(0.2)
        victim.proc.kill()  # SIGKILL: no goodbye, connections just die
        await asyncio.gather(*tasks)
    return records


def test_fault_kill_one_backend_under_load(backends):
    urls = [b.base_url for b in backends]
    router = start_router(urls, "round_robin", "--failure-threshold", "3", "--recovery-successes", "2", "--cooldown", "2")
    try:
        records = asyncio.run(load_then_kill(router.base_url, backends[1], num=36, concurrency=15))
        failed = [r for r in records if r["error"]]
        retried = metric(router.base_url, "router_retries_total")
        print(f"\nfault test: sent {len(records)}, failed {len(failed)} (all had started streaming), retried {retried:.0f}")
        assert len(records) == 36
        assert all(r["started"] for r in failed), f"requests failed before their first byte: {[r for r in failed if not r['started']]}"
        body = wait_probes(router.base_url, 2)  # the dead one leaves within one health round (two, to be safe from a round in flight)
        assert body["backends"][urls[1]]["state"] != "healthy", body
        after = [asyncio.run(one_request_sync(router.base_url, i)) for i in range(3)]
        assert all(r["done"] for r in after), f"requests after the failure must all succeed: {after}"
        # Restart on the same port: it returns after the cooldown and two good probes.
        port = backends[1].port
        backends[1].stop()  # already dead: this only removes its log
        restarted = ServerProcess(lambda _p: backend_command(port), env=ENV, startup_timeout=300, name="backend-1b")
        restarted.port = port
        backends[1] = restarted.__enter__()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and router_health(router.base_url)["backends"][urls[1]]["state"] != "healthy":
            time.sleep(INTERVAL)
        assert router_health(router.base_url)["backends"][urls[1]]["state"] == "healthy", "the restarted backend must come back"
        before = metric(router.base_url, "router_requests_total", backend=urls[1])
        assert all(asyncio.run(one_request_sync(router.base_url, 100 + i))["done"] for i in range(3))
        assert metric(router.base_url, "router_requests_total", backend=urls[1]) == before + 1, "round robin sends it its share again"
        assert metric(router.base_url, "router_outstanding_requests") == 0, "the router's loads must return to zero"
    finally:
        router.stop()
    for b in backends:
        wait_idle(b.base_url)  # every KV block free, nothing running or waiting


async def one_request_sync(router: str, i: int) -> dict:
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as client:
        return await one_request(client, router, i)
