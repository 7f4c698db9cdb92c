"""The real vLLM behind the same code as the lab: Part 6's ``vllm`` backend, and vLLM's own
OpenAI server answering the very client code the lab server is tested with.

Slow on a CPU (vLLM's engine start-up): the ``AsyncLLM`` test runs first and shuts its
engine down, then one vLLM server is started for the module and reused.
"""

from __future__ import annotations

import importlib.util

import pytest

from servinglab import impl
from servinglab.bench.servers import ServerProcess, vllm_server_command
from servinglab.model.prepare import default_model_dir, is_prepared
from test_server import PROMPT, check_openai_client

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
    pytest.mark.skipif(not is_prepared(), reason="model not prepared: run `servinglab prepare-model`"),
]


def test_serving_engine_vllm_backend():
    """vLLMServingEngine(backend="vllm"): AsyncLLM streams greedy tokens; the benchmark works on it too."""
    serving = impl.load_part("serving", "solutions")
    eng = serving.vLLMServingEngine(str(default_model_dir()), {"max_model_len": 512}, backend="vllm")
    eng.initialize_engine()
    try:
        params = eng.create_sampling_params(temperature=0.0, max_tokens=8, ignore_eos=True)
        assert type(params).__module__.startswith("vllm")

        async def scenario():  # one event loop for the AsyncLLM's whole life
            events = [ev async for ev in eng.generate_async([PROMPT, [504, 3458, 314]], params)]
            agen = eng.generate_async(PROMPT, eng.create_sampling_params(temperature=0.0, max_tokens=200, ignore_eos=True))
            await agen.__anext__()
            await agen.aclose()  # aborts inside vLLM
            return events

        events = serving.run_sync(scenario())
        first = [ev for ev in events if ev.index == 0]
        assert "".join(ev.text for ev in first).startswith(" Paris")
        for i in (0, 1):
            assert sum(len(ev.token_ids) for ev in events if ev.index == i) == 8
            assert [ev for ev in events if ev.index == i][-1].finish_reason == "length"
        stamps = [ev.timestamp for ev in events]
        assert stamps == sorted(stamps)
        stats = eng.benchmark_performance([PROMPT, "Hello"], num_runs=1, sampling_params=params)  # another event loop
        assert stats["total_output_tokens"] == 16 and stats["avg_throughput_tps"] > 0
        assert stats["p50_ttft_ms"] <= stats["p90_ttft_ms"] <= stats["p99_ttft_ms"]
    finally:
        eng.shutdown()


@pytest.fixture(scope="module")
def vllm_server():
    cmd = lambda port: vllm_server_command(str(default_model_dir()), port, "smol", max_model_len=1024)  # noqa: E731
    with ServerProcess(cmd, startup_timeout=600, name="vllm-server") as srv:
        yield srv.base_url


def test_openai_client_against_vllm_server(vllm_server):
    check_openai_client(vllm_server, "smol", "no-key-needed")
