"""The router at its edges, over lab servers on a tiny random model (child processes, loopback).

- A non-streaming request whose client has gone is cancelled at the backend (it used to
  generate to the end for nobody).
- A backend that dies mid-stream ends the stream with an OpenAI-style error event and no
  ``[DONE]``, counted as a 502, never a 200 (it used to be a silent truncation).
- A frozen backend (SIGSTOP) ends its streams with an error event after ``--read-timeout``
  (they used to hang as long as it was frozen), and once resumed it aborts what it held.
- The router's ``/metrics`` re-exports every healthy backend's ``vllm:*`` series, labelled
  ``backend``.
- End to end (``servinglab bench faults``, small): streaming clients through the router with
  one backend killed and one frozen all end complete or explicitly told, and no backend
  generates for a client that has gone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import signal

import httpx
import pytest
from serving_helpers import ENV, completion, metric, read_stream, tiny_backend, wait_idle

from servinglab.bench.router_faults import run_fault_load
from servinglab.bench.servers import ServerProcess
from servinglab.model.random_folder import write_random_model
from servinglab.serving.router import router_command

pytestmark = pytest.mark.slow
LONG = 1500  # tokens: far more than a test waits for, so only an abort can end such a request early


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    """Three tiny backends: one stays healthy, one is killed, one frozen (by the tests that own them)."""
    # Wider than the tiny default (about 10x slower a step): LONG tokens then take many seconds,
    # so a request that ends early can only have been aborted.
    folder = write_random_model(tmp_path_factory.mktemp("tiny") / "model", max_position_embeddings=4096, hidden_size=512,
                                intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)
    procs = {name: tiny_backend(folder, name) for name in ("healthy", "killed", "frozen")}
    try:
        with cf.ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda p: p.__enter__(), procs.values()))
        yield procs
    finally:
        frozen = procs["frozen"].proc
        if frozen is not None and frozen.poll() is None:
            os.kill(frozen.pid, signal.SIGCONT)
        for p in procs.values():
            p.stop()


def start_router(*backends: ServerProcess, options: tuple[str, ...] = ()) -> ServerProcess:
    urls = [b.base_url for b in backends]
    cmd = lambda port: router_command(urls, port, "least_outstanding", "--health-interval", "0.5", *options)  # noqa: E731
    return ServerProcess(cmd, env=ENV, startup_timeout=60, name="router").__enter__()


async def stream_then(router: str, on_first_chunk) -> object:
    """One long stream through the router; ``on_first_chunk()`` runs once it has started."""
    started = asyncio.Event()
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0)) as client:
        task = asyncio.create_task(read_stream(client, f"{router}/v1/completions", completion("Tell me about the sea.", LONG), started))
        await asyncio.wait_for(started.wait(), 60)
        on_first_chunk()
        return await task


def test_router_reexports_backend_engine_series(backends):
    router = start_router(backends["healthy"])
    try:
        text = httpx.get(f"{router.base_url}/metrics", timeout=30).text
        url = backends["healthy"].base_url
        for name in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:request_success_total"):
            assert any(line.startswith(f"{name}{{") and f'backend="{url}"' in line for line in text.splitlines()), name
        assert "# TYPE vllm:time_to_first_token_seconds histogram" in text
        assert "router_requests_total" in text, "the router's own series stay"
    finally:
        router.stop()


def test_router_cancels_non_streaming_requests_whose_client_left(backends):
    url = backends["healthy"].base_url
    router = start_router(backends["healthy"])
    try:
        aborted, finished = metric(url, "vllm:request_success_total", finished_reason="abort"), metric(url, "vllm:request_success_total", finished_reason="length")
        for i in range(3):
            with pytest.raises(httpx.TimeoutException):
                httpx.post(f"{router.base_url}/v1/completions", json=completion(f"Abandoned {i}", LONG, stream=False), timeout=1.0)
        wait_idle(url, timeout=30)
        assert metric(url, "vllm:request_success_total", finished_reason="abort") - aborted == 3, "each abandoned request must be aborted"
        assert metric(url, "vllm:request_success_total", finished_reason="length") == finished, "nothing may run to the end for nobody"
        assert metric(router.base_url, "router_requests_total", status="499") == 3
        assert metric(router.base_url, "router_outstanding_requests") == 0
    finally:
        router.stop()


def test_backend_dying_mid_stream_is_an_error_event_not_a_200(backends):
    victim = backends["killed"]
    router = start_router(victim)
    try:
        rec = asyncio.run(stream_then(router.base_url, victim.proc.kill))
        assert rec.status == 200 and rec.chunks > 0 and not rec.done and not rec.finish, vars(rec)
        assert not rec.transport and rec.errors and rec.errors[0]["code"] == 502, f"expected an SSE error event: {vars(rec)}"
        assert "incomplete" in rec.errors[0]["message"]
        assert metric(router.base_url, "router_requests_total", status="200") == 0, "a cut stream is not a 200"
        assert metric(router.base_url, "router_requests_total", status="502") == 1
    finally:
        router.stop()


def test_frozen_backend_stream_ends_after_the_read_timeout(backends):
    victim = backends["frozen"]
    router = start_router(victim, options=("--read-timeout", "2"))
    aborted = metric(victim.base_url, "vllm:request_success_total", finished_reason="abort")
    try:
        rec = asyncio.run(stream_then(router.base_url, lambda: os.kill(victim.proc.pid, signal.SIGSTOP)))
        assert rec.status == 200 and rec.chunks > 0 and not rec.done, vars(rec)
        assert not rec.transport and rec.errors and rec.errors[0]["code"] == 504 and "no data for 2 s" in rec.errors[0]["message"], vars(rec)
        assert metric(router.base_url, "router_requests_total", status="504") == 1
    finally:
        os.kill(victim.proc.pid, signal.SIGCONT)
        router.stop()
    wait_idle(victim.base_url, timeout=30)  # resumed, it finds its client gone and aborts
    assert metric(victim.base_url, "vllm:request_success_total", finished_reason="abort") == aborted + 1


def test_streaming_load_with_one_backend_killed_and_one_frozen():
    report = run_fault_load(clients=12, max_tokens=LONG // 3, read_timeout=2.0)
    print("\n" + report.table())
    assert not report.silent, f"clients cut without an error event: {report.silent}"
    assert report.complete + report.explicit_errors == 12 and report.complete > 0
    assert report.frozen_aborts >= report.frozen_cut > 0, "the frozen backend must abort every request the router ended or moved"
    assert all(report.idle.values()), report.idle
    assert report.ok
