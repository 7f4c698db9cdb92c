# Exercise stub generated from solutions/load_balancer.py by scripts/make_exercises.py.
# Fill in every `raise NotImplementedError` below; keep the signatures.
"""Part 7a: a load balancer for N replicas of one model (the policy the router runs).

The router (``servinglab router``) forwards each request to one backend server. Which
one is this module's decision, in plain Python: no HTTP, no clock unless you pass one.
The router calls, per request, ``select_instance(prompt)``, ``start_request(url)`` and,
when the response has ended, ``finish_request(url)``. Its health checker calls
``report_success(url)`` / ``report_failure(url)`` after every probe of ``/health``.

Policies, chosen by name (``POLICIES``):

* ``round_robin``: the next healthy backend in a fixed cycle.
* ``least_outstanding``: the fewest requests in flight (the seed's "least loaded",
  counted by the router itself; Envoy's LEAST_REQUEST counts the same way); a tie goes
  to the backend started least recently, so idle backends take turns.
* ``power_of_two``: two random healthy backends, the less loaded wins (Azar et al.,
  STOC 1994; Mitzenmacher, IEEE TPDS 2001): the maximum load falls from about
  ln n / ln ln n (one random choice) to ln ln n / ln 2, with no global scan.
* ``cache_aware``: SGLang's sgl-router (``policies/cache_aware.rs``): send a prompt where
  its prefix is most likely still in the KV cache, unless that would overload a backend.

Health is a small state machine per backend: ``healthy`` (in the pool) -> one failure ->
``unhealthy`` (out of the pool; back after ``recovery_successes`` successful probes in a
row) -> ``failure_threshold`` failures in a row -> ``open`` (circuit breaker: successes
are ignored for ``cooldown_s`` seconds after the last failure, then it recovers like an
unhealthy one). A backend that failed also loses its prefix tree: its cache may be gone.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .prefix_tree import PrefixTree, Prompt

POLICIES: tuple[str, ...] = ("round_robin", "least_outstanding", "power_of_two", "cache_aware")


class NoHealthyBackendError(RuntimeError):
    """No backend is in the pool (all failed, or all excluded by the caller)."""


@dataclass
class Backend:
    """One replica as the balancer sees it (the seed's ``{"url": ..., "load": ...}``)."""

    url: str
    load: int = 0  # requests started and not finished (outstanding)
    state: str = "healthy"  # "healthy" | "unhealthy" | "open"
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    last_failure: float = 0.0
    last_started: int = 0  # when start_request last ran for it (the balancer's count of starts; 0: never)

    @property
    def healthy(self) -> bool:
        return self.state == "healthy"


class LLMLoadBalancer:
    """Pick a backend for each request with one of ``POLICIES`` and keep the accounting.

    Args:
        instances: backend URLs (or the seed's dicts with a ``"url"`` key); non-empty, unique.
        policy: one of ``POLICIES``.
        seed: seeds ``power_of_two``'s random choices (same seed, same choices).
        cache_threshold: ``cache_aware`` follows the best prefix match only when the
            matched fraction of the prompt is *greater* than this (in [0, 1]; SGLang 0.3).
        balance_abs_threshold, balance_rel_threshold: the load is imbalanced when
            ``max - min > abs`` **and** ``max > rel * min`` (loads of healthy backends;
            SGLang 64 and 1.5; abs >= 0, rel >= 1).
        max_tree_size: most elements a backend's prefix tree keeps (>= 1); after every
            insert the tree is evicted (LRU leaves first) down to it.
        failure_threshold: failures in a row that open the circuit breaker (>= 1).
        recovery_successes: successes in a row that bring a failed backend back (>= 1).
        cooldown_s: seconds after the last failure during which an open circuit ignores
            successes (>= 0).
        clock: returns seconds (``time.monotonic`` by default; tests pass a fake one).

    Raises ``ValueError`` naming the parameter for any value outside these ranges.
    """

    def __init__(self, instances: Sequence[str | dict], policy: str = "least_outstanding", *, seed: int = 0,
                 cache_threshold: float = 0.3, balance_abs_threshold: int = 64, balance_rel_threshold: float = 1.5,
                 max_tree_size: int = 1 << 20, failure_threshold: int = 3, recovery_successes: int = 2,
                 cooldown_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        urls = [i["url"] if isinstance(i, dict) else i for i in instances]
        if not urls or not all(isinstance(u, str) and u for u in urls):
            raise ValueError(f"instances must be a non-empty list of backend URLs, got {instances!r}")
        if len(set(urls)) != len(urls):
            raise ValueError(f"instances must be unique, got {urls}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        checks = {"cache_threshold": 0 <= cache_threshold <= 1, "balance_abs_threshold": balance_abs_threshold >= 0,
                  "balance_rel_threshold": balance_rel_threshold >= 1, "max_tree_size": max_tree_size >= 1,
                  "failure_threshold": failure_threshold >= 1, "recovery_successes": recovery_successes >= 1,
                  "cooldown_s": cooldown_s >= 0}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name} is out of range, got {locals()[name]!r} (see LLMLoadBalancer's docstring)")
        self.instances = [Backend(u) for u in urls]
        self.policy = policy
        self.cache_threshold, self.max_tree_size = cache_threshold, max_tree_size
        self.balance_abs_threshold, self.balance_rel_threshold = balance_abs_threshold, balance_rel_threshold
        self.failure_threshold, self.recovery_successes, self.cooldown_s = failure_threshold, recovery_successes, cooldown_s
        self.clock = clock
        self.rng = random.Random(seed)
        self.trees = {u: PrefixTree() for u in urls}
        self._by_url = {b.url: b for b in self.instances}
        self._next = 0  # round robin: index to try first
        self._starts = 0  # start_request calls so far (stamps Backend.last_started)
        self._stamp = 0  # logical clock of tree inserts

    def backend(self, url: str) -> Backend:
        """The backend with this URL; ``KeyError`` naming it when unknown."""
        if url not in self._by_url:
            raise KeyError(f"unknown backend {url!r}; known: {list(self._by_url)}")
        return self._by_url[url]

    def loads(self) -> dict[str, int]:
        """Outstanding requests per backend URL."""
        return {b.url: b.load for b in self.instances}

    def select_instance(self, prompt: Prompt | None = None, exclude: Sequence[str] = ()) -> Backend:
        """Choose a healthy backend not in ``exclude`` with ``self.policy``; does not change loads.

        ``prompt`` (text or token ids) matters only to ``cache_aware``, which also records it in
        the chosen backend's tree. Raises :class:`NoHealthyBackendError` ("no healthy backend")
        when no backend is eligible.
        """
        # The pool: healthy backends not in `exclude`, in instance order. Then dispatch:
        # round_robin, power_of_two and cache_aware to their methods below (given the pool);
        # least_outstanding: the pool's backend with the fewest outstanding requests (its
        # `load`); on a tie the one whose `last_started` is oldest (never started counts as
        # oldest), then the first in instance order. Without that rule, traffic that never
        # overlaps (every load 0 at each pick) would all go to the first backend. One scan,
        # and exact: the router counts every request it starts and finishes (Envoy's
        # LEAST_REQUEST samples two instead).
        raise NotImplementedError("select_instance: your code here")

    # round_robin: walk the instance list cyclically from the one after the last pick and
    # take the first eligible backend. With a fixed healthy pool every backend gets exactly
    # one request per cycle; a backend out of the pool is skipped, not given a double turn later.
    def _round_robin(self, pool: list[Backend]) -> Backend:
        raise NotImplementedError("_round_robin: your code here")

    # power_of_two: draw two distinct backends of the pool uniformly with self.rng
    # (rng.sample(pool, 2)); the one with fewer outstanding requests wins, the first drawn
    # on a tie. A pool of one is returned as is (no draw).
    def _power_of_two(self, pool: list[Backend]) -> Backend:
        raise NotImplementedError("_power_of_two: your code here")

    # cache_aware (SGLang sgl-router): 1. Loads of the pool: imbalanced when
    # max - min > balance_abs_threshold AND max > balance_rel_threshold * min. Then take
    # the least loaded backend (first in instance order on a tie): the cache cannot help a
    # replica that is drowning. 2. Otherwise match the prompt against every pool backend's
    # tree; the best match (first in order on a tie) wins if matched / len(prompt) >
    # cache_threshold (its KV cache probably still holds that prefix). 3. Otherwise take the
    # least loaded backend, and among equally loaded ones the smallest tree (most room for
    # new prefixes; first in order on a tie). SGLang takes the smallest tree alone; but a
    # backend that just came back has an empty tree, and would then get every new prompt
    # until its tree caught up with the others', however busy it became. In every case insert the prompt into the chosen backend's tree with the next stamp and evict
    # it down to max_tree_size. An empty or missing prompt matches nothing (rate 0).
    def _cache_aware(self, pool: list[Backend], prompt: Prompt | None) -> Backend:
        raise NotImplementedError("_cache_aware: your code here")

    def start_request(self, url: str) -> None:
        """A request was sent to ``url``: its load grows by one and ``last_started`` becomes the
        number of starts so far, this one included (``KeyError`` if unknown)."""
        raise NotImplementedError("start_request: your code here")

    def finish_request(self, url: str) -> None:
        """A request to ``url`` ended (done, failed or cancelled): its load falls by one.

        Raises ``KeyError`` for an unknown URL and ``ValueError`` ("no outstanding request")
        when its load is already 0: a finish without a start is a router bug.
        """
        raise NotImplementedError("finish_request: your code here")

    def report_failure(self, url: str) -> None:
        """A probe or request to ``url`` failed: it leaves the pool at once (``unhealthy``),
        its prefix tree is cleared, and after ``failure_threshold`` failures in a row its
        circuit opens (``open``); ``last_failure`` becomes ``clock()``."""
        raise NotImplementedError("report_failure: your code here")

    def report_success(self, url: str) -> None:
        """A probe of ``url`` succeeded. A healthy backend forgets its failures; an open one
        ignores it until ``cooldown_s`` has passed since ``last_failure``; otherwise, after
        ``recovery_successes`` successes in a row, the backend is healthy again (failures 0)."""
        raise NotImplementedError("report_success: your code here")
