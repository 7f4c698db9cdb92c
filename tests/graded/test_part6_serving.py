"""Graded tests for Part 6: the serving engine's API, async streaming and latency statistics.

The statistics are checked on hand-made timestamps whose TTFT, TPOT, ITL, E2E and
percentiles were worked out by hand (definitions in the module docstring of
``solutions/serving.py``: vLLM's ``benchmark_serving`` definitions, numpy's linear
percentiles). The engine tests drive a tiny random Llama through the lab backend; the
runtime under it (Parts 2-4) is the reference, so only Part 6 is graded here.

Bugs these tests guard against, each caught by at least two of them (hand-made
timestamps, a numpy reference on random requests, the real engine;
``scripts/mutation_check.py`` plants them): percentiles by nearest rank instead of linear
interpolation; TPOT that includes the time to the first token; throughput over the sum of
request latencies instead of the run's duration; a closed or cancelled stream whose
requests keep running to ``max_tokens``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math

import numpy as np
import pytest
import torch

from servinglab import impl as impl_mod
from servinglab import LLM, SamplingParams
from servinglab.model.weights import random_model, tiny_llama_config

pytestmark = pytest.mark.part(6)


@contextlib.contextmanager
def reference_runtime():
    """Build engines on the reference Parts 2-4 whatever --impl says (Part 6 alone is under test)."""
    previous = impl_mod._override
    impl_mod.set_impl("solutions")
    try:
        yield
    finally:
        impl_mod.set_impl(previous)


@pytest.fixture(scope="module")
def tiny():
    with reference_runtime():  # the model binds its attention part when it is built
        config = tiny_llama_config()
        model = random_model(config, dtype=torch.float32, seed=0)
    gen = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, config.vocab_size, (n,), generator=gen).tolist() for n in (5, 11, 7, 3)]
    return config, model, prompts


@pytest.fixture
def make_engine(serving, tiny):
    """A factory of lab-backend engines on the tiny model, shut down after the test."""
    config, model, _ = tiny
    made = []

    def make(**overrides):
        cfg = {"model_obj": model, "hf_config": config, "dtype": "float32", "block_size": 4, "num_kv_blocks": 96, **overrides}
        eng = serving.vLLMServingEngine(None, cfg, backend="lab")
        with reference_runtime():
            eng.initialize_engine()
        made.append(eng)
        return eng

    yield make
    for eng in made:
        eng.shutdown()


def offline_greedy(tiny, prompts, max_tokens):
    config, model, _ = tiny
    with reference_runtime():
        llm = LLM(model_obj=model, hf_config=config, dtype="float32", block_size=4)
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def blocks_all_free(eng) -> bool:
    stats = eng.engine.block_manager.get_stats()
    return not eng.engine.has_unfinished_requests() and stats.num_free_blocks == stats.num_blocks


@pytest.mark.points(2)
def test_percentile_interpolates_linearly(serving):
    xs = [40, 15, 50, 20, 35]  # sorted: 15 20 35 40 50
    assert serving.percentile(xs, 0) == 15 and serving.percentile(xs, 100) == 50, "percentile 0 is the minimum, 100 the maximum"
    assert serving.percentile(xs, 50) == 35, "linear interpolation: rank h = (n - 1) q / 100 on the sorted values"
    assert serving.percentile(xs, 90) == pytest.approx(46.0), "linear interpolation: rank h = (n - 1) q / 100 on the sorted values"  # rank 3.6: 40 + 0.6 * 10
    assert serving.percentile(xs, 99) == pytest.approx(49.6), "linear interpolation: rank h = (n - 1) q / 100 on the sorted values"  # rank 3.96
    assert serving.percentile([7.0], 99) == 7.0, "a single value is every percentile"
    assert xs == [40, 15, 50, 20, 35], "percentile must not sort its input in place"
    data = np.random.default_rng(0).exponential(size=101)
    for q in (1, 37.5, 50, 90, 99):
        assert serving.percentile(list(data), q) == pytest.approx(np.percentile(data, q)), "percentile must agree with numpy's default (linear) percentile"
    for bad in (-1, 100.5):
        with pytest.raises(ValueError, match="q"):
            serving.percentile(xs, bad)
    with pytest.raises(ValueError, match="values"):
        serving.percentile([], 50)


# start, token arrival times (s): TTFT 100/250/300 ms, TPOT 30/10 ms (C has one token), ITL 20 30 40 | 10.
HAND_MADE = [(0.00, [0.10, 0.12, 0.15, 0.19]), (0.05, [0.30, 0.31]), (0.10, [0.40])]
EXPECTED = {
    "num_requests": 3, "total_output_tokens": 7, "duration_s": 0.40, "avg_throughput_tps": 17.5, "request_throughput": 7.5,
    "avg_ttft_ms": 650 / 3, "p50_ttft_ms": 250, "p90_ttft_ms": 290, "p99_ttft_ms": 299,
    "avg_tpot_ms": 20, "p50_tpot_ms": 20, "p90_tpot_ms": 28, "p99_tpot_ms": 29.8,
    "avg_itl_ms": 25, "p50_itl_ms": 25, "p90_itl_ms": 37, "p99_itl_ms": 39.7,
    "avg_e2e_ms": 250, "p50_e2e_ms": 260, "p90_e2e_ms": 292, "p99_e2e_ms": 299.2,
}


@pytest.mark.points(4)
def test_latency_stats_on_hand_made_timestamps(serving):
    records = [serving.RequestTimestamps(s, list(t)) for s, t in HAND_MADE]
    stats = serving.compute_latency_stats(records)
    for key, value in EXPECTED.items():
        assert stats[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key
    assert serving.compute_latency_stats(HAND_MADE) == pytest.approx(stats), "(start, token_times) tuples work too"
    # Two tokens that arrive together (one streamed chunk) repeat a timestamp: an ITL of 0.
    burst = serving.compute_latency_stats([(0.0, [0.1, 0.3, 0.3])])
    assert burst["p50_itl_ms"] == pytest.approx(100) and burst["avg_tpot_ms"] == pytest.approx(100), "tokens that arrive together repeat their time: ITL and TPOT count them"


@pytest.mark.points(2)
def test_latency_stats_match_numpy_on_random_requests(serving):
    # Reference comparison: 40 seeded random requests, every statistic recomputed here with numpy from
    # the definitions (TTFT = first - start, TPOT = (last - first) / (n - 1), ITL = gaps, E2E = last - start).
    rng = np.random.default_rng(6)
    records = []
    for _ in range(40):
        start = float(rng.uniform(0, 5))
        times = start + float(rng.uniform(0.05, 0.5)) + np.cumsum(rng.exponential(0.03, int(rng.integers(1, 12))))
        records.append((start, times.tolist()))
    stats = serving.compute_latency_stats(records)
    ref = {"ttft": [t[0] - s for s, t in records], "e2e": [t[-1] - s for s, t in records],
           "tpot": [(t[-1] - t[0]) / (len(t) - 1) for s, t in records if len(t) > 1],
           "itl": [b - a for s, t in records for a, b in zip(t, t[1:])]}
    for name, xs in ref.items():
        assert stats[f"avg_{name}_ms"] == pytest.approx(1000 * np.mean(xs)), f"avg_{name}_ms"
        for q in (50, 90, 99):
            assert stats[f"p{q}_{name}_ms"] == pytest.approx(1000 * np.percentile(xs, q)), f"p{q}_{name}_ms"
    tokens = sum(len(t) for _, t in records)
    span = max(t[-1] for _, t in records) - min(s for s, _ in records)
    assert stats["total_output_tokens"] == tokens and stats["duration_s"] == pytest.approx(span), "duration = last token - first start"
    assert stats["avg_throughput_tps"] == pytest.approx(tokens / span), "throughput = output tokens / duration (first start to last token)"
    assert stats["request_throughput"] == pytest.approx(40 / span), "request throughput = requests / duration"


@pytest.mark.points(1)
def test_latency_stats_edge_cases(serving):
    one_token = serving.compute_latency_stats([(0.0, [0.2]), (0.1, [0.3])])
    assert one_token["avg_ttft_ms"] == pytest.approx(200), "TTFT of a one-token request is its token time - start"
    assert math.isnan(one_token["avg_tpot_ms"]) and math.isnan(one_token["p99_itl_ms"]), "TPOT and ITL are nan when no request has two tokens"
    for bad in ([], [(0.0, [])], [(0.0, [0.2, 0.1])], [(0.5, [0.2])]):
        with pytest.raises(ValueError, match="request_timestamps"):
            serving.compute_latency_stats(bad)


@pytest.mark.points(3)
def test_create_sampling_params_validates(serving):
    eng = serving.vLLMServingEngine("unused-folder", backend="lab")
    p = eng.create_sampling_params(temperature=0.0, top_p=0.9, max_tokens=7, seed=3, ignore_eos=True)
    assert isinstance(p, SamplingParams), "create_sampling_params returns a SamplingParams"
    assert (p.temperature, p.top_p, p.max_tokens, p.seed, p.ignore_eos) == (0.0, 0.9, 7, 3, True), "create_sampling_params must pass temperature, top_p, max_tokens, seed and ignore_eos through"
    cases = {"temperature": [-0.5, float("nan")], "top_p": [0.0, 1.5, float("nan")], "max_tokens": [0, -3, 2.5, True]}
    for field, values in cases.items():
        for value in values:
            kwargs = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 4, field: value}
            with pytest.raises(ValueError, match=field):
                eng.create_sampling_params(**kwargs)
    with pytest.raises(ValueError, match="lab.*vllm"):
        serving.vLLMServingEngine("m", backend="tensorrt")


@pytest.mark.points(4)
def test_generate_async_streams_tokens_in_order(serving, tiny, make_engine):
    _, _, prompts = tiny
    max_tokens = [5, 8, 3, 6]
    expected = offline_greedy(tiny, prompts, max_tokens)
    eng = make_engine()
    params = [eng.create_sampling_params(temperature=0.0, max_tokens=m, ignore_eos=True) for m in max_tokens]

    async def collect(prompts_arg, params_arg):
        return [ev async for ev in eng.generate_async(prompts_arg, params_arg)]

    events = asyncio.run(collect(prompts, params))
    assert all(isinstance(ev, serving.StreamEvent) for ev in events), "generate_async yields StreamEvent objects"
    stamps = [ev.timestamp for ev in events]
    assert stamps == sorted(stamps), "events come in arrival order, stamped when received"
    for i, want in enumerate(expected):
        mine = [ev for ev in events if ev.index == i]
        assert [t for ev in mine for t in ev.token_ids] == want, f"prompt {i}: tokens differ from offline greedy"
        assert len(mine) == len(want), "the lab engine makes one token per step: one event per token"
        assert [ev.finish_reason for ev in mine] == [None] * (len(mine) - 1) + ["length"], "finish_reason is None until the last event of a completion"
    assert blocks_all_free(eng), "every KV block must be free after the stream finished"
    single = asyncio.run(collect(prompts[1], params[0]))  # one prompt, one params object
    assert {ev.index for ev in single} == {0} and [t for ev in single for t in ev.token_ids] == expected[1][:5], "a single prompt streams as index 0 with the greedy tokens"
    with pytest.raises(ValueError, match="sampling_params"):
        asyncio.run(collect(prompts, params[:2]))


@pytest.mark.points(3)
def test_closing_the_stream_aborts_and_frees_blocks(serving, tiny, make_engine):
    _, _, prompts = tiny
    eng = make_engine()
    params = eng.create_sampling_params(temperature=0.0, max_tokens=60, ignore_eos=True)

    async def take_three():
        agen = eng.generate_async(prompts[:2], params)
        seen = [await agen.__anext__() for _ in range(3)]
        assert eng.engine.has_unfinished_requests(), "the request is still running before the stream is closed"
        await agen.aclose()
        return seen

    seen = asyncio.run(take_three())
    assert len(seen) == 3, "closing the stream early: only the events before close"
    assert blocks_all_free(eng), "closing generate_async early must abort both requests and free their blocks"
    assert eng.engine.num_steps < 60, (
        f"the engine ran {eng.engine.num_steps} steps: the requests ran to max_tokens=60 instead of being aborted "
        "when the stream closed (cancel the tasks that pump each request)"
    )


@pytest.mark.points(2)
def test_cancelling_the_consumer_aborts_the_requests(serving, tiny, make_engine):
    _, _, prompts = tiny
    eng = make_engine()
    params = eng.create_sampling_params(temperature=0.0, max_tokens=60, ignore_eos=True)

    async def main():
        got = []

        async def consume():
            async for ev in eng.generate_async(prompts[2:4], params):
                got.append(ev)
                if len(got) == 2:
                    await asyncio.sleep(3600)  # a client that stops reading: it gets cancelled below

        task = asyncio.create_task(consume())
        while len(got) < 2 and not task.done():
            await asyncio.sleep(0.001)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for _ in range(3000):  # while this loop still runs: wait until the engine is idle (aborted, or done)
            if not eng.engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)
        return got, eng.engine.num_steps

    got, steps = asyncio.run(main())
    assert len(got) == 2
    assert blocks_all_free(eng), "cancelling the task that iterates generate_async must abort both requests and free their blocks"
    assert steps < 60, f"the engine ran {steps} steps: a cancelled consumer's requests must be aborted, not run to max_tokens=60"


@pytest.mark.points(3)
def test_benchmark_performance_reports_sane_stats(serving, tiny, make_engine):
    _, _, prompts = tiny
    eng = make_engine()
    params = eng.create_sampling_params(temperature=0.0, max_tokens=6, ignore_eos=True)
    stats = eng.benchmark_performance(prompts, num_runs=2, sampling_params=params)
    assert stats["num_runs"] == 2 and stats["num_requests"] == 2 * len(prompts), "num_runs and num_requests = num_runs x prompts"
    assert stats["total_output_tokens"] == 2 * len(prompts) * 6, "one timestamp per output token"
    for name in ("ttft", "tpot", "itl", "e2e"):
        assert 0 <= stats[f"p50_{name}_ms"] <= stats[f"p90_{name}_ms"] <= stats[f"p99_{name}_ms"], name
        assert stats[f"avg_{name}_ms"] >= 0, "latencies must be >= 0"
    assert stats["avg_throughput_tps"] > 0 and stats["request_throughput"] > 0, "throughputs must be positive"
    assert 0 < stats["avg_ttft_ms"] <= stats["avg_e2e_ms"], "TTFT must be positive and at most E2E"
    assert blocks_all_free(eng), "every KV block must be free after the benchmark"
    for kwargs, field in (({"prompts": []}, "prompts"), ({"prompts": prompts, "num_runs": 0}, "num_runs")):
        with pytest.raises(ValueError, match=field):
            eng.benchmark_performance(**kwargs)
