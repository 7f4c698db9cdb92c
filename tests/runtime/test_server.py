"""The lab's OpenAI-compatible server on the real model, over real HTTP on loopback.

One server (reference parts, small engine settings) is started per test session in a
child process and shared; a second, tiny-queue server tests the 429 path. The official
``openai`` client talks to it unchanged, 200 concurrent streams all complete, a client
that disconnects gets its request aborted, and every bad request gets a 4xx with an
OpenAI error body while the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest

from servinglab.bench.servers import ServerProcess, lab_server_command
from servinglab.model.prepare import default_model_dir, is_prepared

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not is_prepared(), reason="model not prepared: run `servinglab prepare-model`"),
]

KEY, NAME, MAX_LEN, BODY_LIMIT = "test-key", "smol", 512, 65536
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "The capital of France is"


@pytest.fixture(scope="session")
def server():
    extra = ("--api-key", KEY, "--num-kv-blocks", "1024", "--max-body-bytes", str(BODY_LIMIT))
    cmd = lambda port: lab_server_command(str(default_model_dir()), port, NAME, max_model_len=MAX_LEN, max_num_seqs=64, extra=extra)  # noqa: E731
    with ServerProcess(cmd, env={"SERVINGLAB_IMPL": "solutions"}, startup_timeout=300, name="lab-server") as srv:
        yield srv.base_url


def metric(base_url: str, name: str, **labels: str) -> float:
    """One sample of the /metrics text (0 when absent)."""
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            return float(m.group(2))
    return 0.0


def wait_idle(base_url: str, timeout: float = 20.0) -> None:
    """Until no request runs or waits and the KV cache is empty."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (metric(base_url, "vllm:num_requests_running"), metric(base_url, "vllm:num_requests_waiting"),
                metric(base_url, "vllm:kv_cache_usage_perc")) == (0, 0, 0):
            return
        time.sleep(0.2)
    raise AssertionError("the server did not go idle: running/waiting requests or KV blocks left over")


def check_openai_client(base_url: str, model: str, api_key: str) -> None:
    """The official client, unchanged: completions and chat, streaming and not (shared with the vLLM test)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=120)
    assert model in [m.id for m in client.models.list()]
    full = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert full.choices[0].text.startswith(" Paris") and full.choices[0].finish_reason == "length"
    assert (full.usage.completion_tokens, full.usage.prompt_tokens) == (8, 5)
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == 8
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    streamed = list(client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0, stream=True))
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == chat.choices[0].message.content
    assert streamed[-1].choices[0].finish_reason == chat.choices[0].finish_reason


def test_openai_client_against_lab_server(server):
    check_openai_client(server, NAME, KEY)
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
    two = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=4, n=2, temperature=0.8, seed=1)
    assert sorted(c.index for c in two.choices) == [0, 1] and two.usage.completion_tokens == 8
    batch = client.completions.create(model=NAME, prompt=[PROMPT, "Hello"], max_tokens=3, temperature=0)
    assert sorted(c.index for c in batch.choices) == [0, 1]
    # A stop string ends the text, and streaming never leaks a prefix of it (held back until decided).
    stopped = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0, stop=[" answer"])
    assert stopped.choices[0].finish_reason == "stop" and "answer" not in stopped.choices[0].text
    chunks = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0, stop=[" answer"], stream=True)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == stopped.choices[0].text
    wait_idle(server)


def test_200_concurrent_streams_all_complete(server):
    num = 200
    wants = [4 + i % 5 for i in range(num)]  # 4..8 tokens each
    before = metric(server, "vllm:request_success_total", finished_reason="length")

    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, str | None, str]:
        body = {"model": NAME, "prompt": f"Request {i}: count to ten.", "max_tokens": wants[i], "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        tokens, reason, text = -1, None, ""
        async with client.stream("POST", f"{server}/v1/completions", json=body) as resp:
            assert resp.status_code == 200, await resp.aread()
            async for line in resp.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                chunk = json.loads(line[5:])
                for choice in chunk["choices"]:
                    text += choice["text"]
                    reason = choice["finish_reason"] or reason
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        return tokens, reason, text

    async def run_all():
        limits = httpx.Limits(max_connections=num + 10, max_keepalive_connections=num + 10)
        async with httpx.AsyncClient(headers=AUTH, timeout=300, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(num)))

    results = asyncio.run(run_all())
    assert [r[0] for r in results] == wants, "every stream must deliver exactly max_tokens tokens"
    assert all(r[1] == "length" and r[2] for r in results)
    wait_idle(server)
    assert metric(server, "vllm:request_success_total", finished_reason="length") - before == num


def test_client_disconnect_aborts_request(server):
    aborted = metric(server, "vllm:request_success_total", finished_reason="abort")
    body = {"model": NAME, "prompt": "Tell me a very long story.", "max_tokens": 480, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=AUTH, timeout=60) as resp:
        assert resp.status_code == 200
        seen = 0
        for line in resp.iter_lines():
            seen += line.startswith("data:")
            if seen == 3:
                break  # leaving the block closes the connection mid-stream
    wait_idle(server, timeout=10)  # 480 tokens would take far longer than this to finish normally
    assert metric(server, "vllm:request_success_total", finished_reason="abort") == aborted + 1
    # A non-streaming client that gives up is noticed too.
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server}/v1/completions", json={**body, "stream": False}, headers=AUTH, timeout=1.5)
    wait_idle(server, timeout=10)
    assert metric(server, "vllm:request_success_total", finished_reason="abort") == aborted + 2


GOOD = {"model": NAME, "prompt": "Hi", "max_tokens": 1}
CHAT = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
BAD = {  # name: (path, body (dict -> JSON, bytes -> raw), headers, status, param or None, text in the message)
    "invalid_json": ("/v1/completions", b'{"model": "smol", "prompt": ', AUTH, 400, None, "JSON"),
    "not_utf8": ("/v1/completions", b'{"model": "smol", "prompt": "\xff\xfe"}', AUTH, 400, None, "UTF-8"),
    "not_an_object": ("/v1/completions", [1, 2], AUTH, 400, None, "object"),
    "missing_model": ("/v1/completions", {"prompt": "Hi"}, AUTH, 400, "model", "required"),
    "missing_prompt": ("/v1/completions", {"model": NAME}, AUTH, 400, "prompt", "required"),
    "max_tokens_zero": ("/v1/completions", {**GOOD, "max_tokens": 0}, AUTH, 400, "max_tokens", "max_tokens"),
    "max_tokens_negative": ("/v1/completions", {**GOOD, "max_tokens": -5}, AUTH, 400, "max_tokens", "max_tokens"),
    "past_context": ("/v1/completions", {**GOOD, "max_tokens": MAX_LEN}, AUTH, 400, "max_tokens", "maximum context length"),
    "prompt_too_long": ("/v1/completions", {**GOOD, "prompt": "word " * (MAX_LEN + 10)}, AUTH, 400, "prompt", "maximum context length"),
    "token_out_of_vocab": ("/v1/completions", {**GOOD, "prompt": [1, 10**9]}, AUTH, 400, "prompt", "prompt"),
    "unknown_model": ("/v1/completions", {**GOOD, "model": "gpt-4"}, AUTH, 404, "model", "does not exist"),
    "wrong_key": ("/v1/completions", GOOD, {"Authorization": "Bearer nope"}, 401, None, "Unauthorized"),
    "no_key": ("/v1/completions", GOOD, {}, 401, None, "Unauthorized"),
    "oversized_body": ("/v1/completions", {**GOOD, "pad": "x" * (BODY_LIMIT + 1)}, AUTH, 413, None, "limit"),
    "negative_temperature": ("/v1/completions", {**GOOD, "temperature": -1}, AUTH, 400, "temperature", "temperature"),
    "temperature_text": ("/v1/completions", {**GOOD, "temperature": "hot"}, AUTH, 400, "temperature", "number"),
    "top_p_above_one": ("/v1/completions", {**GOOD, "top_p": 1.5}, AUTH, 400, "top_p", "top_p"),
    "top_k_negative": ("/v1/completions", {**GOOD, "top_k": -7}, AUTH, 400, "top_k", "top_k"),
    "n_zero": ("/v1/completions", {**GOOD, "n": 0}, AUTH, 400, "n", "n must"),
    "empty_stop": ("/v1/completions", {**GOOD, "stop": [""]}, AUTH, 400, "stop", "stop"),
    "stream_bad_request": ("/v1/completions", {**GOOD, "stream": True, "top_p": 0}, AUTH, 400, "top_p", "top_p"),
    "unsupported_logprobs": ("/v1/completions", {**GOOD, "logprobs": 2}, AUTH, 400, "logprobs", "not supported"),
    "chat_no_messages": ("/v1/chat/completions", {**CHAT, "messages": []}, AUTH, 400, "messages", "messages"),
    "chat_bad_role": ("/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, AUTH, 400, "messages", "role"),
    "chat_past_context": ("/v1/chat/completions", {**CHAT, "max_tokens": MAX_LEN}, AUTH, 400, "max_tokens", "maximum context length"),
    "unknown_route": ("/v1/embeddings", GOOD, AUTH, 404, None, "Not Found"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_gets_openai_error_and_server_keeps_serving(server, case):
    path, body, headers, status, param, text = BAD[case]
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = httpx.post(f"{server}{path}", content=raw, headers={**headers, "Content-Type": "application/json"}, timeout=60)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    assert err["param"] == param and text in err["message"], err
    good = httpx.post(f"{server}/v1/completions", json=GOOD, headers=AUTH, timeout=60)
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 1


def test_health_and_metrics_need_no_key(server):
    assert httpx.get(f"{server}/health").status_code == 200
    text = httpx.get(f"{server}/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:prefix_cache_queries_total",
                 "vllm:prefix_cache_hits_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_count"):
        assert f'{name}{{' in text and f'model_name="{NAME}"' in text, name
    assert httpx.get(f"{server}/v1/models").status_code == 401
    assert httpx.get(f"{server}/v1/completions", headers=AUTH).status_code == 405


def test_bounded_queue_answers_429():
    """One running slot and a queue of one: a third concurrent request is refused with 429."""
    cmd = lambda port: lab_server_command(str(default_model_dir()), port, NAME, max_model_len=MAX_LEN, max_num_seqs=1,  # noqa: E731
                                          extra=("--max-pending", "1", "--num-kv-blocks", "128"))
    with ServerProcess(cmd, env={"SERVINGLAB_IMPL": "solutions"}, name="lab-server-429") as srv:
        long = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}

        async def scenario():
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=120) as client:
                async with client.stream("POST", "/v1/completions", json=long) as running:
                    lines = running.aiter_lines()
                    while not (await lines.__anext__()).startswith("data:"):
                        pass  # A now holds the only running slot
                    queued = asyncio.create_task(client.post("/v1/completions", json={**GOOD, "max_tokens": 2}))
                    while metric(srv.base_url, "vllm:num_requests_waiting") < 1:
                        await asyncio.sleep(0.05)  # B waits in the queue
                    refused = await client.post("/v1/completions", json=GOOD)
                # Leaving A's block disconnects it: B then runs, and the server serves again.
                return refused, await queued, await client.post("/v1/completions", json=GOOD)

        refused, queued, after = asyncio.run(scenario())
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "RateLimitError"
        assert queued.status_code == 200 and after.status_code == 200
