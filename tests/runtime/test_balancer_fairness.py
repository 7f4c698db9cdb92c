"""The router's policies (Part 7a, reference parts) under traffic that used to treat one backend unfairly.

- ``least_outstanding``: requests that never overlap see every load at 0; ties used to go
  to the first backend every time. They now go to the backend started least recently.
- ``cache_aware``: a backend that comes back after a failure has an empty prefix tree. On
  a prompt that matches nothing, the smallest tree used to win outright, so the restarted
  backend took every new prompt however busy it became; load now comes first.
"""

from __future__ import annotations

import random
from collections import Counter, deque

from servinglab import impl

URLS = ["http://a", "http://b", "http://c"]


def balancer(policy: str, **kwargs):
    return impl.load_part("load_balancer").LLMLoadBalancer(URLS, policy=policy, recovery_successes=1, **kwargs)


def drive(lb, prompts: list[str], in_flight: int) -> Counter:
    """Route ``prompts`` with ``in_flight`` requests outstanding (the oldest finishes first); count picks."""
    window: deque[str] = deque()
    picks: Counter = Counter()
    for prompt in prompts:
        if len(window) == in_flight:
            lb.finish_request(window.popleft())
        url = lb.select_instance(prompt).url
        lb.start_request(url)
        window.append(url)
        picks[url] += 1
    while window:
        lb.finish_request(window.popleft())
    return picks


def unique_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefghij") for _ in range(40)) for _ in range(n)]


def test_least_outstanding_ties_take_turns():
    lb = balancer("least_outstanding")
    picks = []
    for _ in range(9):  # one request at a time: every load is 0 at every pick
        url = lb.select_instance().url
        lb.start_request(url)
        lb.finish_request(url)
        picks.append(url)
    assert picks == URLS * 3, f"ties must rotate, not always go to the first backend: {picks}"
    lb.start_request("http://a")  # the fewest outstanding still wins outright
    assert lb.select_instance().url != "http://a"


def test_cache_aware_does_not_send_everything_to_a_restarted_backend():
    lb = balancer("cache_aware")
    drive(lb, unique_prompts(300, seed=0), in_flight=6)  # every tree fills up
    lb.report_failure("http://c")  # restarted: back in the pool with an empty tree
    lb.report_success("http://c")
    assert lb.backend("http://c").healthy and lb.trees["http://c"].size == 0
    picks = drive(lb, unique_prompts(60, seed=1), in_flight=6)
    assert picks["http://c"] <= 30, f"the restarted backend took {picks['http://c']} of 60 new prompts: {dict(picks)}"
    assert min(picks.values()) >= 10, f"every backend keeps its share: {dict(picks)}"


def test_cache_aware_still_follows_a_shared_prefix():
    lb = balancer("cache_aware")
    system = "You are a helpful assistant. Answer in one word. "
    home = lb.select_instance(system + "Q0").url
    lb.start_request(home)
    assert all(lb.select_instance(system + f"Q{i}").url == home for i in range(1, 5)), "a hit follows its cache while balanced"
