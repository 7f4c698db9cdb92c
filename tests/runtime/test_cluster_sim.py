"""The cluster simulator behind notebook 07: every request finishes, the balancer's loads
return to zero, and the cache effect points the right way (deterministic, seeded)."""

from __future__ import annotations

import pytest

from servinglab import impl
from servinglab.bench.cluster_sim import simulate, summarize
from servinglab.bench.router_workloads import shared_prefix_workload, unique_workload


def run(policy: str, prompts, rate: float = 18.0):
    lb = impl.load_part("load_balancer").LLMLoadBalancer(["s0", "s1", "s2"], policy=policy, balance_abs_threshold=8)
    res = simulate(lb, prompts, rate)
    assert len(res["requests"]) == len(prompts), "every request must finish"
    assert lb.loads() == dict.fromkeys(["s0", "s1", "s2"], 0), "start/finish accounting must balance"
    assert all(r.first_token <= r.finish and r.arrival <= r.first_token for r in res["requests"])
    return summarize(res)


@pytest.mark.parametrize("policy", ["round_robin", "least_outstanding", "power_of_two", "cache_aware"])
def test_every_policy_finishes_and_unique_prompts_never_hit(policy):
    assert run(policy, unique_workload(200, seed=3))["hit_rate"] == 0.0


def test_cache_aware_hits_more_than_round_robin_on_shared_prefixes():
    prompts = shared_prefix_workload(300, seed=3)
    rr, ca = run("round_robin", prompts), run("cache_aware", prompts)
    assert ca["hit_rate"] > rr["hit_rate"] + 0.1, (rr, ca)
    assert ca["ttft_mean"] < rr["ttft_mean"], "fewer prefill tokens must mean a shorter TTFT in the model"


def test_bad_arguments():
    lb = impl.load_part("load_balancer").LLMLoadBalancer(["s0"])
    with pytest.raises(ValueError, match="rate"):
        simulate(lb, unique_workload(3), rate=0)
    with pytest.raises(ValueError, match="num"):
        shared_prefix_workload(0)
