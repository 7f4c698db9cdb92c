"""The lab server at its edges, on a tiny random model served for real (in-process uvicorn).

- A seed outside vLLM's range is a 400 naming ``seed``; it used to overflow inside a step
  and end every stream on the server.
- A failure that belongs to one request (its sampling, its forks) ends that request alone,
  with an error; its neighbours finish normally.
- Tokenizing a large prompt runs off the event loop: ``/health`` answers meanwhile.
- ``/health`` is 503 once the engine loop has died (as vLLM's), and new requests get 503.
"""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
from serving_helpers import InProcessServer, completion, metric, read_stream, tiny_state, wait_idle

from servinglab.engine import engine as engine_module
NEIGHBOURS = 3
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # vLLM's range: torch.iinfo(torch.long)


async def neighbours_and_one(base_url: str, odd: dict, stream_odd: bool) -> tuple[list, object]:
    """Start NEIGHBOURS long streams, send ``odd`` once all of them stream; return both outcomes."""
    async with httpx.AsyncClient(timeout=120) as client:
        started = [asyncio.Event() for _ in range(NEIGHBOURS)]
        tasks = [asyncio.create_task(read_stream(client, f"{base_url}/v1/completions", completion(f"neighbour {i}", 300), started[i]))
                 for i in range(NEIGHBOURS)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
        if stream_odd:
            odd_result = await read_stream(client, f"{base_url}/v1/completions", odd)
        else:
            odd_result = await client.post(f"{base_url}/v1/completions", json=odd)
        return await asyncio.gather(*tasks), odd_result


def test_seed_out_of_range_is_a_400_and_neighbours_finish():
    with InProcessServer(tiny_state()) as srv:
        bad = completion("Hi", 4, stream=False, temperature=0.8, seed=18446744073709551615, n=2)
        streams, resp = asyncio.run(neighbours_and_one(srv.base_url, bad, stream_odd=False))
        assert resp.status_code == 400, resp.text
        err = resp.json()["error"]
        assert err["param"] == "seed" and str(SEED_MAX) in err["message"] and str(SEED_MIN) in err["message"], err
        assert all(s.complete and s.finish == ["length"] for s in streams), [vars(s) for s in streams]
        for seed in (SEED_MIN, SEED_MAX):  # the ends of the range are served, n > 1 included
            ok = httpx.post(f"{srv.base_url}/v1/completions", json=completion("Hi", 4, stream=False, temperature=0.8, seed=seed, n=2), timeout=60)
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 8, ok.text
        wait_idle(srv.base_url)


def test_a_failure_of_one_request_ends_only_that_request(monkeypatch):
    """A fault injected into one request's forks (its second completion's generator)."""
    real = engine_module.make_generator

    def poisoned(params, index, device="cpu"):
        if params.seed == 4242 and index == 1:
            raise RuntimeError("injected fault in one request's sampler")
        return real(params, index, device)

    monkeypatch.setattr(engine_module, "make_generator", poisoned)
    with InProcessServer(tiny_state()) as srv:
        odd = completion("poison", 8, temperature=0.8, seed=4242, n=2)
        streams, rec = asyncio.run(neighbours_and_one(srv.base_url, odd, stream_odd=True))
        assert rec.status == 200 and rec.errors and "injected fault" in rec.errors[0]["message"] and not rec.finish, vars(rec)
        assert all(s.complete and s.finish == ["length"] for s in streams), [vars(s) for s in streams]
        streams, resp = asyncio.run(neighbours_and_one(srv.base_url, {**odd, "stream": False}, stream_odd=False))
        assert resp.status_code == 500 and "injected fault" in resp.json()["error"]["message"], resp.text
        assert all(s.complete for s in streams), [vars(s) for s in streams]
        wait_idle(srv.base_url)
        assert httpx.get(f"{srv.base_url}/health", timeout=10).status_code == 200


class BlockingTokenizer:
    """The engine's tokenizer, except that a prompt starting with "BIG" waits for ``release``."""

    def __init__(self, inner) -> None:
        self.inner, self.entered, self.release = inner, threading.Event(), threading.Event()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def __call__(self, text, *args, **kwargs):
        if isinstance(text, str) and text.startswith("BIG"):
            self.entered.set()
            self.release.wait(60)
        return self.inner(text, *args, **kwargs)


def test_health_answers_while_a_large_prompt_tokenizes():
    state = tiny_state()
    tok = state.engine.tokenizer = BlockingTokenizer(state.engine.tokenizer)
    with InProcessServer(state) as srv:
        big = threading.Thread(target=lambda: httpx.post(f"{srv.base_url}/v1/completions", timeout=120,
                                                         json=completion("BIG" + "x" * 200_000, 1, stream=False)))
        big.start()
        try:
            assert tok.entered.wait(60), "the large prompt never reached the tokenizer"
            try:  # the tokenizer is busy with the large prompt (held there until released)
                health = httpx.get(f"{srv.base_url}/health", timeout=10).status_code
            except httpx.TimeoutException:
                health = None
        finally:
            tok.release.set()
            big.join(120)
        assert health == 200, "/health must answer while a prompt is being tokenized (tokenize off the event loop)"


def test_health_is_503_once_the_engine_loop_died():
    state = tiny_state()
    engine = state.engine

    def broken(*args, **kwargs):
        raise RuntimeError("engine state corrupted")

    with InProcessServer(state) as srv:
        engine.step = broken  # every step fails, and so does the clean-up after it: the loop cannot go on
        engine.abort_request = broken
        rec = asyncio.run(_one_stream(srv.base_url))
        assert rec.errors and not rec.finish, vars(rec)
        health = httpx.get(f"{srv.base_url}/health", timeout=10)
        assert health.status_code == 503 and "engine loop has died" in health.json()["error"]["message"], health.text
        after = httpx.post(f"{srv.base_url}/v1/completions", json=completion("Hi", 2, stream=False), timeout=30)
        assert after.status_code == 503 and after.json()["error"]["type"] == "ServiceUnavailableError", after.text
        assert metric(srv.base_url, "vllm:num_requests_running") >= 0  # /metrics still answers


async def _one_stream(base_url: str):
    async with httpx.AsyncClient(timeout=60) as client:
        return await read_stream(client, f"{base_url}/v1/completions", completion("Hi", 8))


@pytest.mark.parametrize("seed", [-(2**63) - 1, 2**63, 18446744073709551615])
def test_sampling_params_refuse_a_seed_outside_the_range(seed):
    from servinglab.engine.sampling import SamplingParams

    with pytest.raises(ValueError, match=r"seed must be an integer in \["):
        SamplingParams(seed=seed)
