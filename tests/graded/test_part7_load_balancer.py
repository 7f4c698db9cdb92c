"""Part 7a graded tests: the load balancer's policies, accounting and health.

Plain Python, no HTTP: the tests play the router (``select_instance`` -> ``start_request``
-> ``finish_request``) and the health checker (``report_failure`` / ``report_success``),
with a fake clock for the circuit breaker. SGLang's defaults (cache threshold 0.3,
imbalance thresholds 64 / 1.5) come from sgl-router's Python launcher.

Bugs these tests guard against, each caught by at least two of them (a hand-computed
choice under stated loads or a hand-worked state trace, and a property or reference
comparison; ``scripts/mutation_check.py`` plants them): the cache-aware overload escape
taken when either threshold is exceeded instead of both, or never taken; power of two
keeping the more loaded of its two draws, or always the first drawn; the circuit breaker
re-admitting a backend after one success whatever ``recovery_successes`` says, ignoring
its cooldown, or opening one failure late; a prefix match that keeps counting equal
elements after the first mismatch; an insert that adds the whole key to ``size`` instead
of the new elements; an eviction that removes the most recently used leaf first.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.part(7)

URLS = ["http://a", "http://b", "http://c"]
# The fixture is a module (no state), so reusing it across generated examples is safe.
PROPERTY = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def route(lb, prompt=None) -> str:
    """Select and start one request, as the router does; return the chosen URL."""
    b = lb.select_instance(prompt)
    lb.start_request(b.url)
    return b.url


def common(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ---- the prefix tree -------------------------------------------------------------------

@pytest.mark.points(2)
def test_prefix_tree_match_insert_split(load_balancer):
    t = load_balancer.PrefixTree()
    assert t.match("anything") == 0 and t.size == 0
    t.insert("hello world", 1)
    assert t.size == 11, "size counts the elements stored"
    assert t.match("hello world") == 11 and t.match("hello there") == 6 and t.match("help") == 3
    assert t.match("hello world, again") == 11, "a match stops where the stored text ends"
    t.insert("hello there", 2)  # splits the edge after "hello "
    assert t.size == 16, "a split must not change size: only the 5 new characters are added"
    assert (t.match("hello world"), t.match("hello there"), t.match("hello"), t.match("x")) == (11, 11, 5, 0)
    assert t.match("hello_world") == 5 and t.match("hello thorn") == 8, "a match ends at the first mismatch, later equal characters do not count"
    t.insert("hello", 3)  # already stored: nothing new
    assert t.size == 16
    ids = load_balancer.PrefixTree()
    ids.insert((1, 2, 3, 4), 1)
    assert ids.match([1, 2, 9]) == 2 and ids.match((1, 2, 3, 4, 5)) == 4, "token ids work like characters"


@pytest.mark.points(2)
def test_prefix_tree_evicts_least_recently_used_leaf(load_balancer):
    t = load_balancer.PrefixTree()
    t.insert("abcdef", 1)
    t.insert("abcxyz", 2)
    t.insert("q", 3)
    assert t.size == 10
    t.evict(10)
    assert t.size == 10, "evict must do nothing while size <= max_size"
    t.evict(7)  # the oldest leaf is "def" (stamp 1)
    assert t.size == 7 and t.match("abcdef") == 3 and t.match("abcxyz") == 6 and t.match("q") == 1
    t.insert("abcxyz", 4)  # touch it: "q" (stamp 3) is now the oldest leaf
    t.evict(6)
    assert t.match("q") == 0 and t.match("abcxyz") == 6 and t.size == 6


@PROPERTY
@given(st.lists(st.text("ab", max_size=8), max_size=12), st.text("ab", max_size=8))
@pytest.mark.points(1)
def test_prefix_tree_matches_like_the_longest_common_prefix(load_balancer, keys, probe):
    t = load_balancer.PrefixTree()
    for i, k in enumerate(keys):
        t.insert(k, i + 1)
    assert t.match(probe) == max((common(k, probe) for k in keys), default=0)
    assert t.size == len({k[:i] for k in keys for i in range(1, len(k) + 1)}), "size must count distinct prefixes"


@PROPERTY
@given(st.lists(st.text("abc", min_size=1, max_size=10), min_size=1, max_size=30), st.integers(10, 25))
@pytest.mark.points(1)
def test_eviction_bounds_memory_and_keeps_the_newest(load_balancer, keys, cap):
    t = load_balancer.PrefixTree()
    for i, k in enumerate(keys):
        t.insert(k, i + 1)
        t.evict(cap)
        assert t.size <= cap, f"tree holds {t.size} elements after evict({cap})"
        assert t.match(k) == len(k), "the prompt inserted last is the most recently used: it must survive"


# ---- policies --------------------------------------------------------------------------

@pytest.mark.points(1)
def test_round_robin_cycles_and_skips_unhealthy(load_balancer):
    lb = load_balancer.LLMLoadBalancer(URLS, policy="round_robin")
    assert [lb.select_instance().url for _ in range(6)] == URLS * 2
    assert lb.loads() == dict.fromkeys(URLS, 0), "select_instance must not change loads (start_request does)"
    lb.report_failure("http://b")
    assert [lb.select_instance().url for _ in range(4)] == ["http://a", "http://c"] * 2


@pytest.mark.points(1)
def test_least_outstanding_counts_starts_and_finishes(load_balancer):
    lb = load_balancer.LLMLoadBalancer(URLS, policy="least_outstanding")
    assert [route(lb) for _ in range(3)] == URLS, "ties go to the first backend in order"
    lb.start_request("http://a")
    lb.finish_request("http://b")
    assert lb.loads() == {"http://a": 2, "http://b": 0, "http://c": 1}
    assert lb.select_instance().url == "http://b"


@pytest.mark.points(1)
def test_power_of_two_never_picks_the_worse_of_two(load_balancer):
    lb = load_balancer.LLMLoadBalancer(URLS, policy="power_of_two", seed=7)
    for url, n in zip(URLS, (0, 5, 10)):
        for _ in range(n):
            lb.start_request(url)
    picks = [lb.select_instance().url for _ in range(300)]
    counts = {u: picks.count(u) for u in URLS}
    # a wins whenever it is drawn (2 of 3 pairs), b only for the pair (b, c), c never.
    assert counts["http://c"] == 0, f"the most loaded backend was chosen: {counts}"
    assert counts["http://a"] > counts["http://b"] > 0, f"expected about 200 / 100 / 0, got {counts}"
    again = load_balancer.LLMLoadBalancer(URLS, policy="power_of_two", seed=7)
    for url, n in zip(URLS, (0, 5, 10)):
        for _ in range(n):
            again.start_request(url)
    assert [again.select_instance().url for _ in range(300)] == picks, "the same seed must give the same choices"


@pytest.mark.points(1)
def test_power_of_two_between_two_candidates_takes_the_less_loaded(load_balancer):
    # With two backends in the pool both are drawn, so the choice is exact: the less loaded one.
    lb = load_balancer.LLMLoadBalancer(URLS, policy="power_of_two", seed=3)
    for url, n in zip(URLS, (4, 1, 0)):
        for _ in range(n):
            lb.start_request(url)  # a: 4, b: 1, c: 0
    assert [lb.select_instance(exclude=["http://c"]).url for _ in range(20)] == ["http://b"] * 20, (
        "pool {a: 4, b: 1}: both are drawn, b (fewer outstanding requests) must win every time"
    )
    assert [lb.select_instance(exclude=["http://a"]).url for _ in range(20)] == ["http://c"] * 20, "pool {b: 1, c: 0}: c must win"
    assert lb.select_instance(exclude=["http://a", "http://b"]).url == "http://c", "a pool of one is returned as is"
    assert lb.loads() == {"http://a": 4, "http://b": 1, "http://c": 0}, "select_instance must not change loads"


@pytest.mark.points(2)
def test_cache_aware_sends_a_repeated_prefix_home(load_balancer):
    lb = load_balancer.LLMLoadBalancer(URLS, policy="cache_aware")
    system = "You are a helpful assistant. Answer briefly. "
    first = lb.select_instance(system + "What is 2+2?").url
    assert first == "http://a", "with empty trees, the smallest tree (first on a tie) gets it"
    other = lb.select_instance("Translate 'cat' into French.").url
    assert other == "http://b", "a prompt matching nothing goes to the smallest tree"
    for q in ("What is 3+3?", "Name a colour.", "Who wrote Hamlet?"):
        assert lb.select_instance(system + q).url == first, "a shared prefix must follow its cache"
    assert lb.select_instance("Translate 'dog' into French.").url == other


@pytest.mark.points(1)
def test_cache_aware_threshold_is_strict(load_balancer):
    lb = load_balancer.LLMLoadBalancer(URLS, policy="cache_aware", cache_threshold=0.5)
    assert lb.select_instance("aaaa").url == "http://a"
    # "aabb" matches 2 of 4 = 0.5, not more than the threshold: smallest tree (b).
    assert lb.select_instance("aabb").url == "http://b"
    assert lb.select_instance("aaab").url == "http://a", "3 of 4 > 0.5 follows the match"
    assert lb.loads() == dict.fromkeys(URLS, 0)
    # "aXcdefgh" shares 1 leading character with "abcdefgh": the 6 equal characters after the
    # mismatch are not a prefix. 1 / 8 <= 0.5: the smallest tree (b, still empty) gets it.
    fresh = load_balancer.LLMLoadBalancer(URLS, policy="cache_aware", cache_threshold=0.5)
    assert fresh.select_instance("abcdefgh").url == "http://a"
    assert fresh.select_instance("aXcdefgh").url == "http://b", "the matched prefix ends at the first mismatch (1 of 8)"


@pytest.mark.points(2)
def test_cache_aware_imbalance_needs_both_thresholds(load_balancer):
    lb = load_balancer.LLMLoadBalancer(URLS, policy="cache_aware", balance_abs_threshold=4, balance_rel_threshold=1.5)
    assert route(lb, "shared prefix, question 1") == "http://a"
    for _ in range(9):
        lb.start_request("http://a")  # a: 10, b: 0, c: 0
    lb.start_request("http://b")
    lb.start_request("http://c")
    for _ in range(6):
        lb.start_request("http://b")
        lb.start_request("http://c")  # a: 10, b: 7, c: 7: max - min = 3, not > 4: balanced
    assert lb.select_instance("shared prefix, question 2").url == "http://a"
    for _ in range(7):
        lb.finish_request("http://c")  # a: 10, b: 7, c: 0: 10 - 0 > 4 and 10 > 1.5 * 0
    assert lb.select_instance("shared prefix, question 3").url == "http://c", "imbalanced: the least loaded wins"
    for _ in range(14):
        lb.start_request("http://c")  # a: 10, b: 7, c: 14: 14 - 7 > 4 and 14 > 1.5 * 7
    assert lb.select_instance("shared prefix, question 4").url == "http://b"
    rel = load_balancer.LLMLoadBalancer(URLS, policy="cache_aware", balance_abs_threshold=4, balance_rel_threshold=3.0)
    assert route(rel, "shared prefix, question 1") == "http://a"
    for url, n in zip(URLS, (19, 10, 10)):
        for _ in range(n):
            rel.start_request(url)  # a: 20, b: 10, c: 10: abs 10 > 4 but 20 <= 3 * 10: balanced
    assert rel.select_instance("shared prefix, question 5").url == "http://a", "only abs was exceeded: follow the cache"


# ---- health ----------------------------------------------------------------------------

@pytest.mark.points(2)
def test_failed_backend_leaves_and_returns_after_probes(load_balancer):
    lb = load_balancer.LLMLoadBalancer(URLS, policy="least_outstanding", recovery_successes=2)
    lb.report_failure("http://a")
    assert not lb.backend("http://a").healthy and lb.backend("http://a").state == "unhealthy"
    assert {lb.select_instance().url for _ in range(5)} == {"http://b"}
    lb.report_success("http://a")
    assert lb.select_instance().url == "http://b", "one success is not enough with recovery_successes=2"
    lb.report_success("http://a")
    assert lb.backend("http://a").healthy and lb.select_instance().url == "http://a"
    for _ in range(2):
        lb.report_failure("http://a")
        lb.report_success("http://a")
    assert not lb.backend("http://a").healthy, "successes count only in a row: a failure resets them"
    for url in URLS:
        lb.report_failure(url)
    with pytest.raises(load_balancer.NoHealthyBackendError, match="no healthy backend"):
        lb.select_instance()
    lb2 = load_balancer.LLMLoadBalancer(URLS)
    with pytest.raises(load_balancer.NoHealthyBackendError):
        lb2.select_instance(exclude=URLS)
    assert lb2.select_instance(exclude=["http://a"]).url == "http://b", "exclude removes backends from the pool"


@pytest.mark.points(2)
def test_circuit_breaker_opens_after_repeated_failures(load_balancer):
    clock = FakeClock()
    lb = load_balancer.LLMLoadBalancer(URLS, failure_threshold=3, recovery_successes=1, cooldown_s=10, clock=clock)
    for _ in range(2):
        lb.report_failure("http://a")
    assert lb.backend("http://a").state == "unhealthy"
    lb.report_success("http://a")
    assert lb.backend("http://a").healthy, "below the threshold one success brings it back"
    for _ in range(3):
        lb.report_failure("http://a")
    assert lb.backend("http://a").state == "open", "3 failures in a row open the circuit"
    clock.now += 9.9
    lb.report_success("http://a")
    assert lb.backend("http://a").state == "open", "an open circuit ignores successes during the cooldown"
    clock.now += 0.2
    lb.report_success("http://a")
    assert lb.backend("http://a").healthy and lb.backend("http://a").consecutive_failures == 0


@pytest.mark.points(1)
def test_health_state_machine_trace(load_balancer):
    # failure_threshold 2, recovery_successes 2, cooldown 5 s; states worked out by hand from the module docstring.
    clock = FakeClock()
    lb = load_balancer.LLMLoadBalancer(URLS, failure_threshold=2, recovery_successes=2, cooldown_s=5, clock=clock)
    trace = [  # (seconds to advance, event on http://a, state after it)
        (0, "fail", "unhealthy"),   # 1 failure: out of the pool
        (0, "ok", "unhealthy"),     # 1 success of 2
        (0, "ok", "healthy"),       # 2 in a row: back
        (1, "fail", "unhealthy"),
        (1, "fail", "open"),        # 2 failures in a row: the circuit opens at t = 102
        (2, "ok", "open"),          # t = 104: inside the cooldown, ignored
        (2.9, "ok", "open"),        # t = 106.9: still inside (4.9 s < 5 s)
        (0.2, "ok", "open"),        # t = 107.1: cooldown over, 1 success of 2
        (0, "ok", "healthy"),       # 2 in a row: back, failures forgotten
        (0, "fail", "unhealthy"),   # 1 failure (the count restarted): not open
    ]
    for step, (dt, event, want) in enumerate(trace):
        clock.now += dt
        (lb.report_failure if event == "fail" else lb.report_success)("http://a")
        got = lb.backend("http://a").state
        assert got == want, f"step {step} ({event} at t = {clock.now:.1f}): state {got!r}, expected {want!r}"
        in_pool = "http://a" in {lb.select_instance(exclude=[u]).url for u in ("http://b", "http://c")}
        assert in_pool == (want == "healthy"), f"step {step}: a backend is in the pool exactly when it is healthy"


@pytest.mark.points(1)
def test_cache_aware_escapes_only_when_both_thresholds_are_exceeded(load_balancer):
    # Reference comparison over 200 seeded load patterns: a's tree holds the prompt, so a balanced
    # pool follows the cache to a; an imbalanced one (max - min > 3 AND max > 2 * min) takes the least loaded.
    import random

    rng = random.Random(7)
    for case in range(200):
        lb = load_balancer.LLMLoadBalancer(URLS, policy="cache_aware", balance_abs_threshold=3, balance_rel_threshold=2.0)
        assert lb.select_instance("the shared system prompt").url == "http://a"
        loads = [rng.randint(0, 12) for _ in URLS]
        for url, n in zip(URLS, loads):
            for _ in range(n):
                lb.start_request(url)
        hi, lo = max(loads), min(loads)
        imbalanced = hi - lo > 3 and hi > 2.0 * lo
        want = URLS[loads.index(lo)] if imbalanced else "http://a"
        got = lb.select_instance("the shared system prompt, question 2").url
        assert got == want, f"case {case}: loads {loads} ({'imbalanced' if imbalanced else 'balanced'}): chose {got}, expected {want}"


@pytest.mark.points(1)
def test_failure_clears_the_prefix_tree(load_balancer):
    lb = load_balancer.LLMLoadBalancer(URLS, policy="cache_aware", recovery_successes=1)
    assert lb.select_instance("a long shared system prompt").url == "http://a"
    lb.report_failure("http://a")
    assert lb.trees["http://a"].size == 0, "a failed backend's cache may be gone: forget its tree"
    lb.report_success("http://a")
    assert lb.select_instance("a long shared system prompt").url == "http://a"


@pytest.mark.points(1)
def test_bad_input_errors_name_the_parameter(load_balancer):
    LB = load_balancer.LLMLoadBalancer
    bad = [({"instances": []}, "instances"), ({"instances": ["http://a", "http://a"]}, "unique"),
           ({"policy": "random"}, "policy"), ({"cache_threshold": 1.5}, "cache_threshold"),
           ({"balance_abs_threshold": -1}, "balance_abs_threshold"), ({"balance_rel_threshold": 0.5}, "balance_rel_threshold"),
           ({"max_tree_size": 0}, "max_tree_size"), ({"failure_threshold": 0}, "failure_threshold"),
           ({"recovery_successes": 0}, "recovery_successes"), ({"cooldown_s": -1}, "cooldown_s")]
    for kwargs, word in bad:
        with pytest.raises(ValueError, match=word):
            LB(**{"instances": URLS, **kwargs})
    lb = LB([{"url": "http://a", "load": 0}, {"url": "http://b", "load": 0}])  # the seed's dicts work too
    assert route(lb) == "http://a"
    with pytest.raises(KeyError, match="http://zz"):
        lb.start_request("http://zz")
    with pytest.raises(ValueError, match="no outstanding request"):
        lb.finish_request("http://b")
    lb.finish_request("http://a")
    assert lb.loads() == {"http://a": 0, "http://b": 0}


# ---- properties over random traffic ------------------------------------------------------

OPS = st.lists(st.one_of(st.tuples(st.just("send"), st.text("abc", max_size=10)), st.tuples(st.just("finish"), st.integers(0, 50)),
                         st.tuples(st.just("fail"), st.integers(0, 2)), st.tuples(st.just("probe"), st.integers(0, 2))), max_size=60)


@PROPERTY
@given(st.sampled_from(["round_robin", "least_outstanding", "power_of_two", "cache_aware"]), OPS)
@pytest.mark.points(2)
def test_property_never_unhealthy_and_loads_return_to_zero(load_balancer, policy, ops):
    lb = load_balancer.LLMLoadBalancer(URLS, policy=policy, balance_abs_threshold=2, recovery_successes=2, clock=FakeClock())
    outstanding: list[str] = []
    for op, arg in ops:
        if op == "send":
            healthy = {b.url for b in lb.instances if b.healthy}
            if not healthy:
                with pytest.raises(load_balancer.NoHealthyBackendError):
                    lb.select_instance(arg)
                continue
            url = lb.select_instance(arg).url
            assert url in healthy, f"{policy} selected {url}, which is not healthy"
            lb.start_request(url)
            outstanding.append(url)
        elif op == "finish" and outstanding:
            lb.finish_request(outstanding.pop(arg % len(outstanding)))
        elif op == "fail":
            lb.report_failure(URLS[arg])
        elif op == "probe":
            lb.report_success(URLS[arg])
        assert lb.loads() == {u: outstanding.count(u) for u in URLS}, "load must equal started minus finished requests"
    while outstanding:
        lb.finish_request(outstanding.pop())
    assert lb.loads() == dict.fromkeys(URLS, 0), "every finished request must give its load back"


@PROPERTY
@given(st.integers(1, 6), st.sets(st.integers(0, 2), max_size=2))
@pytest.mark.points(1)
def test_property_round_robin_is_fair(load_balancer, rounds, failed):
    lb = load_balancer.LLMLoadBalancer(URLS, policy="round_robin")
    for i in failed:
        lb.report_failure(URLS[i])
    healthy = [u for i, u in enumerate(URLS) if i not in failed]
    picks = [route(lb) for _ in range(rounds * len(healthy))]
    assert all(picks.count(u) == rounds for u in healthy), f"each healthy backend must get {rounds}: {picks}"


@PROPERTY
@given(st.lists(st.sampled_from(["sys A: ", "sys B: ", "other ", ""]), min_size=1, max_size=25),
       st.lists(st.text("xy", max_size=4), min_size=25, max_size=25))
@pytest.mark.points(2)
def test_property_cache_aware_follows_the_best_match_while_balanced(load_balancer, heads, tails):
    lb = load_balancer.LLMLoadBalancer(URLS, policy="cache_aware")
    seen: dict[str, set[str]] = {}
    for head, tail in zip(heads, tails):
        prompt = head + tail
        before = {u: lb.trees[u].match(prompt) for u in URLS}
        url = lb.select_instance(prompt).url  # loads stay 0: always balanced
        if prompt in seen:
            assert before[url] == len(prompt), f"{prompt!r} was routed before; it went to {url}, which never saw it"
        if prompt and max(before.values()) / len(prompt) > 0.3:
            assert before[url] == max(before.values()), "balanced: the best prefix match must win"
        seen.setdefault(prompt, set()).add(url)
    assert lb.loads() == dict.fromkeys(URLS, 0)
