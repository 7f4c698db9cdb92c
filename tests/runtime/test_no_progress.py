"""A deliberately broken Part 4 (a scheduler that never preempts) must fail loudly, never hang.

When the pool fills up, such a scheduler leaves the running sequences without blocks and
schedules nothing; the engine would then step forever. The engine raises
:class:`~servinglab.engine.stall.NoProgressError` naming the likely cause instead, the
asyncio front fails the affected streams, and the HTTP server answers that request with an
error and goes on serving the next one.
"""

from __future__ import annotations

import asyncio
from collections import deque

import httpx
import pytest
import torch

from servinglab import LLM, SamplingParams
from servinglab.engine.async_engine import SimpleContinuousBatching
from servinglab.engine.stall import NoProgressError
from servinglab.interfaces import ScheduledSequence, SchedulerOutput
from servinglab.model.weights import random_model, tiny_llama_config
from servinglab.sequence import Sequence, SequenceStatus


class NeverPreemptingScheduler:
    """FCFS continuous batching that skips a running sequence it cannot give a slot (the bug) instead of preempting."""

    def __init__(self, block_manager, max_num_batched_tokens: int = 2048) -> None:
        self.bm, self.budget = block_manager, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add_sequence(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        out, budget = SchedulerOutput(), self.budget
        for seq in self.running:
            n = seq.num_uncomputed_tokens
            if budget >= n and self.bm.can_append_slots(seq.seq_id, seq.num_tokens):
                out.block_copies += self.bm.append_slots(seq.seq_id, seq.num_computed_tokens, n)
                out.scheduled.append(ScheduledSequence(seq, n))
                budget -= n
        while self.waiting and self.bm.can_allocate(self.waiting[0].token_ids) and budget >= self.waiting[0].num_tokens:
            seq = self.waiting.popleft()
            seq.num_computed_tokens = self.bm.allocate_blocks(seq.seq_id, seq.token_ids)
            n = seq.num_uncomputed_tokens
            out.block_copies += self.bm.append_slots(seq.seq_id, seq.num_computed_tokens, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSequence(seq, n))
            budget -= n
        return out

    def fork_sequence(self, parent: Sequence, child: Sequence) -> None:
        raise NotImplementedError

    def finish_sequence(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.deallocate_blocks(seq.seq_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)


def broken_llm(num_kv_blocks: int = 6, overlap: bool = False) -> LLM:
    config = tiny_llama_config()
    llm = LLM(model_obj=random_model(config, dtype=torch.float32, seed=0), hf_config=config, dtype="float32",
              block_size=4, num_kv_blocks=num_kv_blocks, async_scheduling=overlap)
    llm.engine.scheduler = NeverPreemptingScheduler(llm.engine.block_manager)
    return llm


# Two prompts of 8 tokens take 4 of the 6 blocks; growing to 16 tokens each needs 8: the pool runs dry.
PROMPTS = [list(range(10, 18)), list(range(30, 38))]
LONG = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "async_scheduling"])
def test_generate_raises_instead_of_spinning(overlap):
    llm = broken_llm(overlap=overlap)
    with pytest.raises(NoProgressError) as err:
        llm.generate(PROMPTS, LONG, use_tqdm=False)
    text = str(err.value)
    assert "2 running" in text and "0 free of 6 blocks" in text and "does Part 4 preempt" in text, text


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "async_scheduling"])
def test_the_async_front_fails_the_stream_and_serves_the_next_request(overlap):
    async def scenario() -> tuple[list[str], list[int]]:
        front = SimpleContinuousBatching(broken_llm(overlap=overlap).engine)
        errors: list[str] = []

        async def consume(prompt: list[int], params: SamplingParams) -> list[int]:
            stream = await front.add_request(prompt, params)
            last: list[int] = []
            try:
                async for out in stream:
                    last = out.outputs[0].token_ids
            except NoProgressError as exc:
                errors.append(str(exc))
            return last

        await asyncio.wait_for(asyncio.gather(*(consume(p, LONG) for p in PROMPTS)), timeout=60)
        short = await asyncio.wait_for(consume(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)), 60)
        assert front.engine.block_manager.num_free_blocks == 6, "the failed requests' blocks must be freed"
        await front.aclose()
        return errors, short

    errors, short = asyncio.run(scenario())
    assert len(errors) == 2 and all("does Part 4 preempt" in e for e in errors), errors
    assert len(short) == 2, "after the failure the front must serve the next request"


def test_the_server_answers_with_an_error_and_keeps_serving():
    from servinglab.serving.server import create_app
    from servinglab.serving.streaming import ServerState

    async def scenario() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        state = ServerState(SimpleContinuousBatching(broken_llm().engine), "tiny")
        transport = httpx.ASGITransport(app=create_app(state))
        async with httpx.AsyncClient(transport=transport, base_url="http://lab", timeout=60) as client:
            body = {"model": "tiny", "prompt": PROMPTS, "max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
            failed = await client.post("/v1/completions", json=body)
            ok = await client.post("/v1/completions", json={**body, "prompt": PROMPTS[0], "max_tokens": 2})
            health = await client.get("/health")
        await state.front.aclose()
        return failed, ok, health

    failed, ok, health = asyncio.run(scenario())
    assert failed.status_code == 500 and "does Part 4 preempt" in failed.json()["error"]["message"], failed.text
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 1, ok.text
    assert health.status_code == 200
