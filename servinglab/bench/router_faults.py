"""``servinglab bench faults``: a streaming load through the router while one backend is
killed and another frozen, and what every client ends up holding.

Three lab servers (a tiny random model by default: this exercises the router, not the
model) sit behind one router with a short ``--read-timeout``. ``clients`` streaming
requests start at once; when ``kill_after`` of them have received a chunk, backend 0 is
killed (SIGKILL) and backend 1 frozen (SIGSTOP). The claims, each checked in the report:

- every client holds either a complete stream (a finish reason and ``[DONE]``) or an
  explicit error (an OpenAI-style error event or error body), never a silent cut;
- no backend generates for a client that has gone: once backend 1 is resumed (SIGCONT),
  every request it held ends as an abort (``vllm:request_success_total{finished_reason="abort"}``
  grows by at least the number of its streams the router ended), and every live backend
  goes idle (nothing running or waiting, no KV block held).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import json
import os
import signal
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from servinglab.bench.servers import ServerProcess, lab_server_command
from servinglab.serving.router import router_command

MODEL_NAME = "tiny"


@dataclass
class StreamRecord:
    """What one SSE client saw: chunks, finish reasons, error bodies, whether ``[DONE]`` came."""

    status: int = 0
    chunks: int = 0
    finish: list[str] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    done: bool = False
    transport: str = ""  # a connection that broke without an error event or body

    @property
    def complete(self) -> bool:
        return self.status == 200 and self.done and bool(self.finish) and not self.errors

    @property
    def explicit_error(self) -> bool:
        return bool(self.errors) and not self.transport

    def feed(self, line: str) -> None:
        """Take one line of the event stream."""
        if not line.startswith("data:"):
            return
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return
        event = json.loads(data)
        if "error" in event:
            self.errors.append(event["error"])
            return
        self.chunks += 1
        self.finish += [c["finish_reason"] for c in event["choices"] if c.get("finish_reason")]


async def read_stream(client: httpx.AsyncClient, url: str, body: dict[str, Any], started: asyncio.Event | None = None) -> StreamRecord:
    """POST ``body`` as a stream and record what arrives; ``started`` is set at the first chunk."""
    rec = StreamRecord()
    try:
        async with client.stream("POST", url, json=body) as resp:
            rec.status = resp.status_code
            if resp.status_code != 200:
                await resp.aread()
                rec.errors.append(resp.json().get("error") or {"message": resp.text})
                return rec
            async for line in resp.aiter_lines():
                rec.feed(line)
                if started is not None and rec.chunks:
                    started.set()
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        rec.transport = f"{type(exc).__name__}: {exc}"
    return rec


def samples(url: str, name: str) -> dict[tuple, float]:
    """The samples called ``name`` on ``url``/metrics, keyed by their sorted label pairs."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {tuple(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name}


def total(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(v for k, v in samples(url, name).items() if all((lk, lv) in k for lk, lv in labels.items()))


def wait_idle(url: str, timeout: float) -> bool:
    """Whether ``url`` has nothing running or waiting and no KV block held, within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(total(url, n) == 0 for n in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")):
            return True
        time.sleep(0.2)
    return False


@dataclass
class FaultReport:
    """The outcome of one run, as the clients, the router and the backends saw it."""

    clients: int
    complete: int
    explicit_errors: int
    silent: list[StreamRecord]  # neither complete nor an explicit error: must be empty
    error_codes: dict[int, int]
    router_status: dict[str, float]  # router_requests_total by status
    frozen_cut: int  # streams of the frozen backend the router ended (504) or moved (retried)
    frozen_aborts: float  # aborts the frozen backend counted once resumed
    idle: dict[str, bool]  # every live backend idle afterwards

    @property
    def ok(self) -> bool:
        return not self.silent and self.frozen_aborts >= self.frozen_cut and all(self.idle.values())

    def table(self) -> str:
        rows = [f"clients {self.clients}: complete {self.complete}, explicit errors {self.explicit_errors} "
                f"(codes {self.error_codes}), silent cuts {len(self.silent)}",
                f"router_requests_total by status: {self.router_status}",
                f"frozen backend: {self.frozen_cut} streams ended or moved by the router, {self.frozen_aborts:.0f} aborts after SIGCONT",
                f"live backends idle afterwards: {self.idle}", f"verdict: {'OK' if self.ok else 'FAILED'}"]
        return "\n".join(rows)


def start(procs: list[ServerProcess]) -> None:
    with cf.ThreadPoolExecutor(len(procs)) as pool:
        list(pool.map(lambda p: p.__enter__(), procs))


async def drive(router: str, victims: list[ServerProcess], clients: int, max_tokens: int, kill_after: int) -> tuple[list[StreamRecord], dict]:
    """Start every client; once ``kill_after`` stream, kill victims[0] and freeze victims[1]."""
    frozen = victims[1]
    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients + 10)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as client:
        started = [asyncio.Event() for _ in range(clients)]
        bodies = [{"model": MODEL_NAME, "prompt": f"Client {i}: tell me about the sea.", "max_tokens": max_tokens,
                   "ignore_eos": True, "stream": True} for i in range(clients)]
        tasks = [asyncio.create_task(read_stream(client, f"{router}/v1/completions", b, e)) for b, e in zip(bodies, started)]
        while sum(e.is_set() for e in started) < kill_after and not all(t.done() for t in tasks):
            await asyncio.sleep(0.05)
        before = await asyncio.to_thread(total, frozen.base_url, "vllm:request_success_total", finished_reason="abort")
        victims[0].proc.kill()
        os.kill(frozen.proc.pid, signal.SIGSTOP)
        return await asyncio.gather(*tasks), {"aborts_before": before}


def run_fault_load(clients: int = 120, max_tokens: int = 256, kill_after: int | None = None, read_timeout: float = 10.0,
                   policy: str = "least_outstanding", model_dir: str | None = None, max_num_seqs: int = 16,
                   health_interval: float = 1.0) -> FaultReport:
    """Three backends behind a router; kill one and freeze one under ``clients`` streams; report."""
    from servinglab.model.random_folder import write_random_model

    kill_after = kill_after if kill_after is not None else max(1, clients // 4)
    with tempfile.TemporaryDirectory(prefix="faults-") as tmp:
        folder = model_dir or str(write_random_model(Path(tmp) / "tiny", max_position_embeddings=4096))
        cmd = lambda port: lab_server_command(folder, port, MODEL_NAME, dtype="float32", max_model_len=2048,  # noqa: E731
                                              max_num_seqs=max_num_seqs, extra=("--num-kv-blocks", "4096"))
        env = {"OMP_NUM_THREADS": "1", "SERVINGLAB_IMPL": os.environ.get("SERVINGLAB_IMPL", "solutions")}
        backends = [ServerProcess(cmd, env=env, startup_timeout=300, name=f"faults-backend-{i}") for i in range(3)]
        router = None
        try:
            start(backends)
            urls = [b.base_url for b in backends]
            options = ("--health-interval", str(health_interval), "--read-timeout", str(read_timeout), "--cooldown", "1")
            router = ServerProcess(lambda port: router_command(urls, port, policy, *options), env=env, startup_timeout=60, name="faults-router")
            router.__enter__()
            records, info = asyncio.run(drive(router.base_url, backends[:2], clients, max_tokens, kill_after))
            frozen = urls[1]
            cut = total(router.base_url, "router_requests_total", backend=frozen, status="504") + \
                total(router.base_url, "router_retries_total", backend=frozen)
            os.kill(backends[1].proc.pid, signal.SIGCONT)
            idle = {u: wait_idle(u, 30.0) for u in urls[1:]}
            aborts = total(frozen, "vllm:request_success_total", finished_reason="abort") - info["aborts_before"]
            status = Counter()
            for k, v in samples(router.base_url, "router_requests_total").items():
                status[dict(k)["status"]] += v
            codes = Counter(int(e.get("code") or 0) for r in records for e in r.errors)
            return FaultReport(clients, sum(r.complete for r in records), sum(r.explicit_error for r in records),
                               [r for r in records if not (r.complete or r.explicit_error)], dict(codes),
                               {k: v for k, v in sorted(status.items()) if v}, int(cut), aborts, idle)
        finally:
            if backends[1].proc is not None and backends[1].proc.poll() is None:
                os.kill(backends[1].proc.pid, signal.SIGCONT)  # a frozen process ignores SIGTERM until resumed
            for p in ([router] if router else []) + backends:
                p.stop()


def add_bench_faults_arguments(p: argparse.ArgumentParser) -> None:
    """``servinglab bench faults`` options."""
    p.add_argument("--clients", type=int, default=120, help="streaming clients, all started at once")
    p.add_argument("--max-tokens", type=int, default=256, help="output tokens per stream")
    p.add_argument("--kill-after", type=int, default=None, help="streams that must have started before the faults (default clients / 4)")
    p.add_argument("--read-timeout", type=float, default=10.0, help="the router's --read-timeout (short, so the frozen backend shows quickly)")
    p.add_argument("--policy", default="least_outstanding")
    p.add_argument("--model", default=None, help="model folder (default: a tiny random model written to a temporary folder)")


def main_from_args(args: argparse.Namespace) -> int:
    """Run ``servinglab bench faults``; exit 1 when a claim fails."""
    report = run_fault_load(args.clients, args.max_tokens, args.kill_after, args.read_timeout, args.policy, args.model)
    print(report.table())
    for r in report.silent[:5]:
        print("silent:", r)
    return 0 if report.ok else 1
