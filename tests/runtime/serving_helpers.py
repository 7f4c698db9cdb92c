"""Shared pieces of the server and router edge tests: a tiny random model served for real.

``InProcessServer`` runs the lab server's FastAPI app under uvicorn in a thread of the test
process (a real HTTP server on loopback, whose engine a test can reach into to inject a
fault); ``tiny_backend`` starts ``servinglab serve`` on a tiny random model folder in a child
process (a process a test can kill or freeze). Both start in seconds and need no prepared model.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import torch
import uvicorn

from servinglab.bench.router_faults import read_stream, total
from servinglab.bench.router_faults import wait_idle as idle_within
from servinglab.bench.servers import ServerProcess, free_port, lab_server_command
from servinglab.engine.async_engine import SimpleContinuousBatching
from servinglab.engine.config import EngineConfig
from servinglab.engine.engine import LLMEngine
from servinglab.model.random_folder import byte_tokenizer, tiny_serving_config
from servinglab.model.weights import random_model
from servinglab.serving.server import create_app
from servinglab.serving.streaming import ServerState

__all__ = ["InProcessServer", "completion", "metric", "read_stream", "tiny_backend", "tiny_state", "wait_idle"]
NAME = "tiny"
ENV = {"SERVINGLAB_IMPL": "solutions", "OMP_NUM_THREADS": "1"}


def tiny_state(max_num_seqs: int = 16, async_scheduling: bool = False) -> ServerState:
    """A server state over a fresh tiny engine (float32, 256 KV blocks of 16)."""
    config = tiny_serving_config()
    engine = LLMEngine(EngineConfig(dtype="float32", max_model_len=512, num_kv_blocks=256, block_size=16, max_num_seqs=max_num_seqs,
                                    async_scheduling=async_scheduling),
                       model=random_model(config, dtype=torch.float32, seed=0), hf_config=config, tokenizer=byte_tokenizer())
    return ServerState(SimpleContinuousBatching(engine), NAME)


class InProcessServer:
    """``create_app(state)`` under uvicorn in a daemon thread, on a free loopback port."""

    def __init__(self, state: ServerState) -> None:
        self.state, self.port = state, free_port()
        self.server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> InProcessServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def tiny_backend(model_dir: Path, name: str = "backend", max_num_seqs: int = 8) -> ServerProcess:
    """``servinglab serve`` on the tiny folder in a child process (started on enter)."""
    cmd = lambda port: lab_server_command(str(model_dir), port, NAME, dtype="float32", max_model_len=2048,  # noqa: E731
                                          max_num_seqs=max_num_seqs, extra=("--num-kv-blocks", "1024"))
    return ServerProcess(cmd, env=ENV, startup_timeout=300, name=name)


def metric(base_url: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when absent)."""
    return total(base_url, name, **labels)


def wait_idle(base_url: str, timeout: float = 30.0) -> None:
    """Until nothing runs or waits and no KV block is held."""
    assert idle_within(base_url, timeout), f"{base_url} did not go idle within {timeout} s: requests or KV blocks left over"


def completion(prompt: str, max_tokens: int, stream: bool = True, **extra: Any) -> dict[str, Any]:
    """A completion body for the tiny model (EOS ignored, so it runs to max_tokens)."""
    return {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": stream, **extra}
