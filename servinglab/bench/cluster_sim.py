"""A discrete-event model of N serving replicas behind a load balancer (no HTTP, no model).

Each replica is a tiny continuous-batching engine: every *step* it runs the prefill of
newly admitted requests (only their uncached prompt tokens) and one decode token for each
running request, and the step lasts ``step_s + token_s x tokens in the step`` (the cost
model of a memory-bound decode plus a compute-bound prefill). A replica keeps an LRU
prefix cache of ``cache_tokens`` tokens holding whole shared prefixes. Requests arrive as
a Poisson process and are routed *at arrival* by a real ``LLMLoadBalancer`` (Part 7a),
with ``start_request`` / ``finish_request`` accounting, exactly as the router does.

Events (arrivals, step ends) are taken from one heap in time order, so simulated seconds
cost microseconds: thousands of requests run in well under a second.
"""

from __future__ import annotations

import heapq
import random
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from servinglab.bench.router_workloads import RoutedPrompt

TOKENS_PER_WORD = 1.3  # SmolLM2's tokenizer on the workload's word list, roughly


@dataclass
class SimRequest:
    prompt: RoutedPrompt
    arrival: float
    output_tokens: int
    server: int = -1
    cached_tokens: int = 0
    first_token: float | None = None
    finish: float | None = None
    generated: int = 0
    prefilled: bool = False

    @property
    def prompt_tokens(self) -> int:
        return round((self.prompt.prefix_words + self.prompt.question_words) * TOKENS_PER_WORD)


@dataclass
class SimServer:
    cache_tokens: int
    waiting: deque = field(default_factory=deque)
    running: list = field(default_factory=list)
    cache: OrderedDict = field(default_factory=OrderedDict)  # prefix id -> tokens, LRU first
    busy: bool = False

    def lookup(self, req: SimRequest) -> int:
        """Tokens of ``req``'s prefix already cached here; caches it (LRU) otherwise."""
        pid = req.prompt.prefix_id
        if pid < 0:
            return 0
        size = round(req.prompt.prefix_words * TOKENS_PER_WORD)
        if pid in self.cache:
            self.cache.move_to_end(pid)
            return size
        self.cache[pid] = size
        while sum(self.cache.values()) > self.cache_tokens and len(self.cache) > 1:
            self.cache.popitem(last=False)
        return 0


def simulate(balancer: Any, prompts: list[RoutedPrompt], rate: float, *, mean_output: int = 32, max_batch: int = 16,
             step_s: float = 0.02, token_s: float = 0.0004, cache_tokens: int = 1200, seed: int = 0) -> dict[str, Any]:
    """Run ``prompts`` through ``balancer``'s replicas at ``rate`` requests/s (Poisson).

    Output lengths are exponential with mean ``mean_output`` (at least 1). Returns
    ``requests`` (finished :class:`SimRequest` s), ``trace`` (time, outstanding per
    replica) after every event, and ``duration``.
    """
    if rate <= 0 or mean_output < 1 or max_batch < 1:
        raise ValueError(f"rate must be > 0, mean_output and max_batch >= 1; got {rate}, {mean_output}, {max_batch}")
    rng = random.Random(seed)
    urls = [b.url for b in balancer.instances]
    servers = [SimServer(cache_tokens) for _ in urls]
    events: list[tuple[float, int, str, Any]] = []
    order = 0
    t = 0.0
    for p in prompts:
        t += rng.expovariate(rate)
        events.append((t, order, "arrive", SimRequest(p, t, max(1, round(rng.expovariate(1 / mean_output))))))
        order += 1
    heapq.heapify(events)
    trace: list[tuple[float, list[int]]] = []
    done: list[SimRequest] = []

    def start_step(i: int, now: float) -> None:
        nonlocal order
        s = servers[i]
        while s.waiting and len(s.running) < max_batch:
            s.running.append(s.waiting.popleft())
        if not s.running:
            s.busy = False
            return
        tokens = sum(1 if r.prefilled else r.prompt_tokens - r.cached_tokens for r in s.running)
        s.busy = True
        heapq.heappush(events, (now + step_s + token_s * tokens, order, "step", i))
        order += 1

    while events:
        now, _, kind, item = heapq.heappop(events)
        if kind == "arrive":
            req: SimRequest = item
            url = balancer.select_instance(req.prompt.text).url
            balancer.start_request(url)
            req.server = urls.index(url)
            s = servers[req.server]
            req.cached_tokens = s.lookup(req)
            s.waiting.append(req)
            if not s.busy:
                start_step(req.server, now)
        else:
            s = servers[item]
            for r in list(s.running):
                if not r.prefilled:
                    r.prefilled, r.first_token = True, now
                r.generated += 1
                if r.generated >= r.output_tokens:
                    r.finish = now
                    s.running.remove(r)
                    balancer.finish_request(urls[item])
                    done.append(r)
            start_step(item, now)
        trace.append((now, [len(x.waiting) + len(x.running) for x in servers]))
    return {"requests": done, "trace": trace, "duration": trace[-1][0] if trace else 0.0}


def summarize(result: dict[str, Any]) -> dict[str, float]:
    """Mean and p99 TTFT, mean E2E latency (s), cache hit rate (prompt tokens) and peak queue."""
    reqs = result["requests"]
    ttft = sorted(r.first_token - r.arrival for r in reqs)
    e2e = [r.finish - r.arrival for r in reqs]
    cached = sum(r.cached_tokens for r in reqs)
    prompt = sum(r.prompt_tokens for r in reqs)
    return {"ttft_mean": sum(ttft) / len(ttft), "ttft_p99": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
            "e2e_mean": sum(e2e) / len(e2e), "hit_rate": cached / prompt if prompt else 0.0,
            "peak_outstanding": max(max(loads) for _, loads in result["trace"])}
