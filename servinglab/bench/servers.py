"""Start and stop OpenAI-compatible servers for benchmarks: the lab server and vLLM's, on loopback.

Each server runs in its own process on a free port; :class:`ServerProcess` waits for
``/health``, and stops the whole process group afterwards so no worker outlives it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx


def free_port() -> int:
    """A loopback port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lab_server_command(model_dir: str, port: int, name: str, dtype: str = "auto", max_model_len: int = 1024,
                       max_num_seqs: int = 256, extra: tuple[str, ...] = ()) -> list[str]:
    """``servinglab serve`` for a child process."""
    return [sys.executable, "-m", "servinglab.cli", "serve", model_dir, "--port", str(port), "--served-model-name", name,
            "--dtype", dtype, "--max-model-len", str(max_model_len), "--max-num-seqs", str(max_num_seqs), *extra]


def vllm_server_command(model_dir: str, port: int, name: str, dtype: str = "auto", max_model_len: int = 1024,
                        max_num_seqs: int = 256, extra: tuple[str, ...] = ()) -> list[str]:
    """vLLM's OpenAI server with the lab's settings: eager (no compile, like the lab), same batch limits.

    ``dtype="auto"`` is resolved the lab's way (:mod:`servinglab.model.dtypes`) so both servers compute alike.
    """
    from servinglab.model.dtypes import resolve_dtype

    dtype = resolve_dtype(dtype, "cpu")
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--served-model-name", name,
            "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype, "--max-model-len", str(max_model_len),
            "--max-num-seqs", str(max_num_seqs), "--max-num-batched-tokens", "2048", "--gpu-memory-utilization", "0.3",
            "--enforce-eager", *extra]


class ServerProcess:
    """A server in a child process on a free loopback port: started and health-checked on enter, stopped on exit.

    ``command(port)`` gives the argv. Output goes to a temporary log file (a pipe nobody
    reads would fill up and block the server); :meth:`log_tail` shows it when start-up fails.
    """

    def __init__(self, command: Callable[[int], list[str]], env: dict[str, str] | None = None,
                 startup_timeout: float = 300, name: str = "server") -> None:
        self.command, self.env, self.startup_timeout, self.name = command, env, startup_timeout, name
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"{name}-", suffix=".log", delete=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 3000) -> str:
        return Path(self.log.name).read_text(errors="replace")[-chars:]

    def __enter__(self) -> ServerProcess:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"), **(self.env or {})}
        self.proc = subprocess.Popen(self.command(self.port), stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} during start-up:\n{tail}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"{self.name} did not answer /health within {self.startup_timeout} s:\n{tail}")

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Terminate (SIGTERM, then SIGKILL after 30 s) and remove the log file."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)
