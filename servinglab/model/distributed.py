"""Start ``torch.distributed`` ranks on one machine: a process group per rank, loopback rendezvous.

Two users: the tensor-parallel workers of the engine (:mod:`servinglab.engine.tp_worker`)
and :func:`run_on_ranks`, which runs one function on ``k`` fresh processes and returns
what each rank returned (the Part 9 tests and notebook use it to run a student's shards
as real ranks).

Choices, and why:

* Processes start with the ``spawn`` method (``torch.multiprocessing``): a fork of a
  process that already ran torch (threads, CUDA) is unsafe, and ``spawn`` works from a
  notebook as long as the target function lives in an importable module.
* Rendezvous is TCP on ``127.0.0.1`` at a free port picked by the parent; the backend is
  gloo on CPUs and NCCL on GPUs, and rank ``r`` uses GPU ``r`` (``device_for_rank``).
* Every collective has a timeout, and every rank destroys its group in a ``finally``, so
  a failing rank ends the run with its traceback instead of a hang.
"""

from __future__ import annotations

import os
import queue
import socket
import traceback
import warnings
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

BACKENDS = ("gloo", "nccl")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def backend_for(device_type: str) -> str:
    """``nccl`` for ``cuda``, ``gloo`` for ``cpu``; ``ValueError`` naming ``device`` otherwise."""
    if device_type == "cuda":
        return "nccl"
    if device_type == "cpu":
        return "gloo"
    raise ValueError(f"device must be 'cpu' or 'cuda' for tensor parallelism, got {device_type!r}")


def device_for_rank(device_type: str, rank: int) -> torch.device:
    """Rank ``r`` runs on ``cuda:r`` (one GPU per rank, as vLLM's workers do) or on the CPU."""
    if device_type == "cuda":
        if rank >= torch.cuda.device_count():
            raise ValueError(f"rank {rank} needs GPU {rank} but only {torch.cuda.device_count()} are visible")
        return torch.device("cuda", rank)
    return torch.device("cpu")


def init_rank(rank: int, world_size: int, port: int, device_type: str = "cpu", timeout_s: float = 120.0) -> torch.device:
    """Join the process group as ``rank`` of ``world_size``; return this rank's device.

    The CPU threads are shared out: ``k`` ranks on ``n`` cores get ``max(1, n // k)``
    threads each, so the ranks do not fight over the same cores.
    """
    # torch 2.13 renames all_gather_into_tensor (all_gather_single); vLLM and older torch use the old name.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*deprecated", category=FutureWarning)
    device = device_for_rank(device_type, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group(
        backend=backend_for(device_type),
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
        **({"device_id": device} if device.type == "cuda" else {}),
    )
    return device


def shutdown_rank() -> None:
    """Leave the process group if this process is in one (safe to call twice)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _rank_main(rank: int, world_size: int, port: int, device_type: str, fn: Callable[..., Any], args: tuple, results: Any) -> None:
    try:
        init_rank(rank, world_size, port, device_type)
        value = fn(rank, world_size, *args)
        results.put((rank, True, value))
    except BaseException:  # report everything, the parent re-raises it
        results.put((rank, False, traceback.format_exc()))
    finally:
        shutdown_rank()


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any, device_type: str = "cpu", timeout_s: float = 120.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; return the results by rank.

    ``fn`` must be importable (defined at the top level of a module, not in a notebook
    cell) and return something picklable. Raises ``RuntimeError`` with the rank's
    traceback when a rank fails, and ``TimeoutError`` when the ranks do not all answer
    within ``timeout_s`` seconds; the processes are always reaped.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(r, world_size, port, device_type, fn, args, results), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    got: dict[int, Any] = {}
    errors: list[str] = []
    try:
        while len(got) + len(errors) < world_size:
            try:
                rank, ok, value = results.get(timeout=timeout_s)
            except queue.Empty:
                raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(got))} gave no answer in {timeout_s} s") from None
            if ok:
                got[rank] = value
            else:
                errors.append(f"rank {rank} failed:\n{value}")
                break  # the others may now wait forever in a collective: stop them below
    finally:
        for p in procs:
            p.join(timeout=10 if not errors else 1)
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [got[r] for r in range(world_size)]
