"""A tensor-parallel worker: one rank's process (vLLM's ``Worker`` in miniature).

Each worker joins the process group (gloo on CPUs, NCCL on GPUs, GPU ``rank`` for rank
``rank``), builds its shard of the model (:class:`~servinglab.model.tp_layers.TPLlamaForCausalLM`
with the student's ``shard_state_dict``), allocates its share of the KV cache (its
``num_kv_heads / k`` heads for every block) and then serves commands from the driver
(:mod:`servinglab.engine.tp_executor`) over its own pipe:

``("init_cache", num_blocks)``, ``("step", pickled inputs)``, ``("stats", reset)``,
``("shutdown",)``. Every command gets one reply, ``("ok", value)`` or ``("error",
traceback)``. A step that raises on every rank at the same point (a bad input) leaves
the ranks in step with each other, so the worker reports it and keeps serving. The
worker exits on ``shutdown``, when its pipe closes, or when the driver process is gone.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from servinglab import impl
from servinglab.interfaces import AttentionMetadata
from servinglab.model.cache import KVCacheSpec, allocate_kv_cache, kv_cache_nbytes
from servinglab.model.distributed import init_rank, shutdown_rank
from servinglab.model.tp_layers import TPLlamaForCausalLM, replicated_names, shard_for_rank

POLL_S = 1.0  # how often an idle worker checks that the driver is still alive


@dataclass
class WorkerSpec:
    """What every rank needs to build its shard (sent once, at start).

    Attributes:
        config: the full model's ``LlamaConfig.to_dict()``.
        dtype: parameter and KV dtype name (``float32``, ``bfloat16``, ``float16``).
        device_type: ``cpu`` or ``cuda``.
        block_size: tokens per KV block.
        impl: ``exercises`` or ``solutions``: whose parts the rank runs (the driver's).
        model_dir: a Hugging Face folder to load, or ``None`` when ``state`` is given.
        state: the full engine state dict (CPU tensors, shared memory), or ``None``.
        profile_collectives: time every all-reduce / all-gather (``servinglab bench tp``).
        pp_size: pipeline stages; above 1 every rank runs one stage (:mod:`servinglab.engine.pp_worker`).
    """

    config: dict[str, Any]
    dtype: str
    device_type: str
    block_size: int
    impl: str
    model_dir: str | None = None
    state: dict[str, torch.Tensor] | None = None
    profile_collectives: bool = False
    pp_size: int = 1


class CollectiveTimer:
    """Counts calls, elements and seconds of ``all_reduce`` / ``all_gather_into_tensor`` in this process.

    It wraps the two functions on the ``torch.distributed`` module, so the student's
    Part 9 (which calls ``dist.all_reduce``) is measured without changing it. On CUDA
    it synchronises around each call: the time is then the collective's own.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()
        for name in ("all_reduce", "all_gather_into_tensor"):
            setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def reset(self) -> None:
        self.calls: dict[str, int] = {"all_reduce": 0, "all_gather_into_tensor": 0}
        self.elements: dict[str, int] = {"all_reduce": 0, "all_gather_into_tensor": 0}
        self.seconds: dict[str, float] = {"all_reduce": 0.0, "all_gather_into_tensor": 0.0}

    def _wrap(self, name: str, fn):
        def timed(tensor, *args, **kwargs):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            result = fn(tensor, *args, **kwargs)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[name] += time.perf_counter() - t0
            self.calls[name] += 1
            # all_gather_into_tensor(output, input): count the elements this rank sends.
            self.elements[name] += int(args[0].numel() if name == "all_gather_into_tensor" else tensor.numel())
            return result

        return timed

    def snapshot(self) -> dict[str, Any]:
        return {"calls": dict(self.calls), "elements": dict(self.elements), "seconds": dict(self.seconds)}


class WorkerRank:
    """The state of one worker: model shard, KV cache, step execution."""

    def __init__(self, rank: int, world: int, spec: WorkerSpec, device: torch.device) -> None:
        from transformers import LlamaConfig

        from servinglab.model import weights

        self.rank, self.world, self.spec, self.device = rank, world, spec, device
        self.dtype = getattr(torch, spec.dtype)
        full_config = LlamaConfig.from_dict(spec.config)
        if spec.state is not None:
            state = spec.state
        else:
            from safetensors.torch import load_file
            from pathlib import Path

            hf_state: dict[str, torch.Tensor] = {}
            for f in sorted(Path(spec.model_dir).glob("*.safetensors")):
                hf_state.update(load_file(str(f)))
            state = weights.hf_to_fused(hf_state, full_config)
        shard = shard_for_rank(state, full_config, rank, world)
        shard = {k: v.to(device=device, dtype=self.dtype) for k, v in shard.items()}
        del state
        with torch.device("meta"):
            model = TPLlamaForCausalLM(full_config, rank, world)
        model.load_state_dict(shard, strict=True, assign=True)
        self.model = model.eval()
        if device.type == "cpu":
            self.model.prepack_cpu_weights(None)  # a no-op in float32
        self.kv_spec = KVCacheSpec.from_hf_config(self.model.config)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.timer = CollectiveTimer(device) if spec.profile_collectives else None
        self.compute_s = 0.0

    def init_cache(self, num_blocks: int) -> dict[str, Any]:
        self.kv_caches = allocate_kv_cache(self.kv_spec, num_blocks, self.spec.block_size, self.dtype, self.device)
        return self.stats(False)

    def _metadata(self, meta: dict[str, Any]) -> AttentionMetadata:
        values = {k: torch.from_numpy(v).to(self.device) if isinstance(v, np.ndarray) else v for k, v in meta.items()}
        return AttentionMetadata(**values)

    def step(self, payload: bytes) -> torch.Tensor | None:
        """Run one engine step on this rank; rank 0 returns the gathered float32 logits."""
        inputs = pickle.loads(payload)
        t0 = time.perf_counter()
        with torch.inference_mode():
            pairs = inputs["block_copies"]
            if pairs:
                src = torch.tensor([s for s, _ in pairs], dtype=torch.long, device=self.device)
                dst = torch.tensor([d for _, d in pairs], dtype=torch.long, device=self.device)
                for k_cache, v_cache in self.kv_caches:
                    k_cache.index_copy_(0, dst, k_cache.index_select(0, src))
                    v_cache.index_copy_(0, dst, v_cache.index_select(0, src))
            ids = torch.from_numpy(inputs["input_ids"]).to(self.device)
            positions = torch.from_numpy(inputs["positions"]).to(self.device)
            rows = torch.from_numpy(inputs["logits_indices"]).to(self.device)
            hidden = self.model(ids, positions, self._metadata(inputs["metadata"]), self.kv_caches)
            logits = None
            if rows.numel():  # the same on every rank: all gather, or none does
                logits = self.model.compute_logits(hidden[rows])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.compute_s += time.perf_counter() - t0
        return logits.cpu() if (logits is not None and self.rank == 0) else None

    def stats(self, reset: bool) -> dict[str, Any]:
        params = dict(self.model.named_parameters())
        replicated = set(replicated_names(self.model))
        out: dict[str, Any] = {
            "rank": self.rank,
            "pid": os.getpid(),
            "device": str(self.device),
            "weight_bytes": sum(p.numel() * p.element_size() for p in params.values()),
            "replicated_bytes": sum(params[n].numel() * params[n].element_size() for n in replicated),
            "kv_bytes": kv_cache_nbytes(self.kv_caches) if self.kv_caches else 0,
            "num_kv_heads": self.kv_spec.num_kv_heads,
            "num_kv_blocks": int(self.kv_caches[0][0].shape[0]) if self.kv_caches else 0,
            "step_seconds": self.compute_s,
        }
        try:
            import psutil

            out["rss_bytes"] = psutil.Process().memory_info().rss
        except ImportError:  # psutil is a course dependency; keep the worker alive without it
            out["rss_bytes"] = None
        if self.device.type == "cuda":
            out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
        if self.timer is not None:
            out["collectives"] = self.timer.snapshot()
            if reset:
                self.timer.reset()
        if reset:
            self.compute_s = 0.0
        return out


def _driver_alive() -> bool:
    parent = multiprocessing.parent_process()
    return parent is None or parent.is_alive()


def worker_main(rank: int, world: int, port: int, spec: WorkerSpec, conn: Any, rank_class: type | None = None) -> None:
    """Entry point of a worker process (spawned by :class:`~servinglab.engine.tp_executor.TPExecutor`)."""
    try:
        impl.set_impl(spec.impl)
        device = init_rank(rank, world, port, spec.device_type)
        worker = (rank_class or WorkerRank)(rank, world, spec, device)  # pipeline stages: pp_worker.PPRank
        spec.state = None  # drop the reference to the shared full weights
        conn.send(("ok", worker.stats(False)))
    except BaseException:
        try:
            conn.send(("error", f"rank {rank} failed to start:\n{traceback.format_exc()}"))
        finally:
            shutdown_rank()
        return
    try:
        while True:
            if not conn.poll(POLL_S):
                if not _driver_alive():
                    return
                continue
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return  # the driver closed the pipe
            kind = msg[0]
            if kind == "shutdown":
                conn.send(("ok", None))
                return
            try:
                if kind == "step":
                    result: Any = worker.step(msg[1])
                elif kind == "init_cache":
                    result = worker.init_cache(msg[1])
                elif kind == "stats":
                    result = worker.stats(bool(msg[1]))
                else:
                    raise ValueError(f"unknown command {kind!r}")
                conn.send(("ok", result))
            except Exception:
                conn.send(("error", f"rank {rank}: {traceback.format_exc()}"))
    except (BrokenPipeError, EOFError, OSError):
        return
    finally:
        shutdown_rank()
