"""Tensor parallelism in the engine: a driver that schedules, ``k`` worker ranks that compute.

``LLM(model, tensor_parallel_size=k)`` splits the work the way vLLM's executor/worker
design does (``vllm/v1/executor/multiproc_executor.py`` and ``vllm/v1/worker/``):

* The **driver** is the engine process. It runs the student's scheduler (Part 4) and
  block manager (Part 2) unchanged: block ids and slots mean the same on every rank,
  because every rank's KV cache has the same number of blocks, each holding that rank's
  ``num_kv_heads / k`` heads. It flattens each scheduled step into model inputs (the
  ordinary :meth:`ModelRunner.prepare_inputs`), pickles them once and sends the same
  bytes to every rank (the broadcast of the step's inputs), then samples from the
  logits rank 0 returns. The driver holds no weights and no KV cache.
* **Workers** (:mod:`servinglab.engine.tp_worker`) are ``k`` processes started with
  ``torch.multiprocessing`` (spawn) that form one ``torch.distributed`` process group
  (gloo on CPUs, NCCL on GPUs, rank ``r`` on GPU ``r``). Each holds its shard of the
  weights and its share of the KV cache; inside the forward pass they talk only through
  collectives (two all-reduces per layer, one for the embedding, one logits gather).

vLLM runs rank 0 inside the driver process to save one process; here the driver is not
a rank, which keeps ``torch.distributed`` state out of the engine process (a notebook
can build TP=1 and TP=2 engines side by side, and shutting a group down never touches
the caller's process).

Memory: for the same ``kv_cache_memory_gib`` per rank, a rank's block is ``1/k`` of the
TP=1 block, so each rank gets ``k`` times the TP=1 block count: Part 1's
``num_kv_blocks(..., tensor_parallel_size=k)``.

Lifetime: workers are daemon processes; :meth:`TPExecutor.shutdown` stops them (also
run by a ``weakref.finalize`` that also fires at interpreter exit), and each worker exits by itself when the driver dies.
"""

from __future__ import annotations

import pickle
import weakref
from dataclasses import fields
from typing import Any

import torch
import torch.multiprocessing as mp

from servinglab import impl
from servinglab.engine.config import EngineConfig
from servinglab.engine.runner import ModelRunner
from servinglab.interfaces import SchedulerOutput
from servinglab.model.cache import KVCacheSpec
from servinglab.model.distributed import backend_for, free_port
from servinglab.model.tp_layers import local_config
from servinglab.engine.tp_worker import WorkerSpec, worker_main
from servinglab.sequence import Sequence

START_TIMEOUT_S = 600.0  # loading and sharding a real model on a busy machine
STEP_TIMEOUT_S = 600.0


class TPWorkerError(RuntimeError):
    """A worker rank failed; the message carries its traceback."""


def _stop(procs: list[Any], conns: list[Any]) -> None:
    """Ask every worker to exit, then make sure it did (idempotent; also run at exit)."""
    for conn in conns:
        try:
            conn.send(("shutdown",))
        except (BrokenPipeError, OSError, EOFError):
            pass
    for proc, conn in zip(procs, conns):
        try:
            if conn.poll(10):
                conn.recv()
        except (BrokenPipeError, OSError, EOFError):
            pass
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)
        conn.close()
    procs.clear()
    conns.clear()


class TPExecutor(ModelRunner):
    """The driver side of tensor parallelism: a :class:`ModelRunner` whose model runs on ``k`` ranks.

    Args:
        config: the engine config (``tensor_parallel_size``, ``dtype``, ``device``, ``block_size``).
        model: an engine model object whose full weights the ranks shard (tiny random
            models, benchmarks), or ``None`` to load ``config.model`` in every rank.
        hf_config: the model's ``LlamaConfig`` (required with ``model``).
        profile_collectives: time the collectives in every rank (see :meth:`rank_stats`);
            also switched on by ``config.extra["tp_profile_collectives"]``.

    Raises ``ValueError`` from Part 9 when the model's heads, KV heads, intermediate size
    or vocabulary do not divide by ``tensor_parallel_size`` (before any process starts).
    """

    def __init__(self, config: EngineConfig, model: torch.nn.Module | None = None, hf_config: Any = None,
                 profile_collectives: bool = False) -> None:
        from servinglab.model import weights

        self.tp_size = config.tensor_parallel_size
        if model is not None:
            if hf_config is None:
                raise ValueError("hf_config is required when a model object is passed")
            state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
        elif config.model is not None:
            hf_config, state = weights.load_config(config.model), None
        else:
            raise ValueError("model must be a model folder (run `servinglab prepare-model`) or a model object")
        self.hf_config = hf_config
        # Part 9b: pp_size stages of tp_size ranks each (servinglab.engine.pp_worker); a rank's KV pool
        # holds its stage's layers, every stage sized for the largest stage.
        self.pp_size = config.pipeline_parallel_size
        if self.pp_size > 1:
            from servinglab.model.pp_stage import max_stage_layers

            stage = hf_config.to_dict() | {"num_hidden_layers": max_stage_layers(hf_config.num_hidden_layers, self.pp_size)}
            stage_cfg = type(hf_config).from_dict(stage)
            self.local_config = local_config(stage_cfg, self.tp_size) if self.tp_size > 1 else stage_cfg
        else:
            self.local_config = local_config(hf_config, self.tp_size)  # Part 9's divisibility errors, before spawning
        world = self.tp_size * self.pp_size
        self.logits_rank = (self.pp_size - 1) * self.tp_size  # the last stage's tensor-parallel rank 0
        self.kv_spec = KVCacheSpec.from_hf_config(self.local_config)
        self.engine_device = config.torch_device
        backend_for(self.engine_device.type)
        if self.engine_device.type == "cuda" and torch.cuda.device_count() < world:
            raise ValueError(f"tensor_parallel_size x pipeline_parallel_size = {world} ranks need {world} GPUs (one per rank), "
                             f"{torch.cuda.device_count()} visible")
        self.model_dir = config.model
        # The driver prepares inputs on the CPU (ModelRunner.prepare_inputs, unchanged) and ships
        # them as numpy arrays; it holds no cache: an empty placeholder satisfies the base class.
        placeholder = torch.empty((0, config.block_size, 1, 1), device="meta")
        super().__init__(None, [(placeholder, placeholder)], config.block_size, "cpu")
        self.kv_caches = []
        profile_collectives = profile_collectives or bool(config.extra.get("tp_profile_collectives", False))
        spec = WorkerSpec(hf_config.to_dict(), config.resolved_dtype, self.engine_device.type, config.block_size,
                          impl.current_impl(), config.model if state is None else None, state, profile_collectives,
                          self.pp_size)
        ctx = mp.get_context("spawn")
        port = free_port()
        self._procs: list[Any] = []
        self._conns: list[Any] = []
        # Runs on shutdown(), when the executor is garbage-collected, and at interpreter exit.
        self._finalizer = weakref.finalize(self, _stop, self._procs, self._conns)
        rank_class = None
        if self.pp_size > 1:
            from servinglab.engine.pp_worker import PPRank as rank_class  # noqa: N813
        for rank in range(world):
            parent_conn, child_conn = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(rank, world, port, spec, child_conn, rank_class), daemon=True,
                               name=f"servinglab-tp-rank{rank}")
            proc.start()
            child_conn.close()
            self._procs.append(proc)
            self._conns.append(parent_conn)
        try:
            self.start_stats = self._collect(START_TIMEOUT_S)
        except BaseException:
            self.shutdown()
            raise

    # ------------------------------------------------------------------ plumbing
    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (empty after :meth:`shutdown`)."""
        return [p.pid for p in self._procs]

    def _collect(self, timeout: float) -> list[Any]:
        """One reply from every rank, in rank order; raise :class:`TPWorkerError` on any error."""
        replies: list[Any] = []
        errors: list[str] = []
        for rank, conn in enumerate(self._conns):
            if not conn.poll(timeout):
                self.shutdown()
                raise TPWorkerError(f"rank {rank} did not answer within {timeout:.0f} s; the workers were stopped")
            try:
                status, value = conn.recv()
            except (EOFError, OSError) as exc:
                self.shutdown()
                raise TPWorkerError(f"rank {rank} exited unexpectedly ({exc!r}); the workers were stopped") from None
            if status == "ok":
                replies.append(value)
            else:
                errors.append(value)
        if errors:
            raise TPWorkerError("\n".join(errors))
        return replies

    def _broadcast(self, message: tuple, timeout: float = STEP_TIMEOUT_S) -> list[Any]:
        self._send_all(message)
        return self._collect(timeout)

    def _send_all(self, message: tuple) -> None:
        if not self._conns:
            raise RuntimeError("the tensor-parallel workers were shut down")
        for conn in self._conns:
            conn.send(message)

    def load_tokenizer(self):
        """The model folder's tokenizer (``None`` for a model object without a folder)."""
        if self.model_dir is None:
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_dir)

    def to(self, *args: Any, **kwargs: Any) -> "TPExecutor":
        """The engine moves a model to its device; the ranks already placed their shards."""
        return self

    def start_cache(self, num_blocks: int) -> "TPExecutor":
        """Every rank allocates ``num_blocks`` blocks of its own KV heads; returns ``self`` (the runner)."""
        self.num_blocks = num_blocks
        self.cache_stats = self._broadcast(("init_cache", num_blocks), START_TIMEOUT_S)
        return self

    def rank_stats(self, reset: bool = False) -> list[dict[str, Any]]:
        """Per rank: weight, replicated and KV bytes, KV heads and blocks, RSS, step time, collectives."""
        return self._broadcast(("stats", reset))

    def shutdown(self) -> None:
        """Stop every worker (safe to call twice); the engine cannot step afterwards."""
        self._finalizer()

    # ------------------------------------------------------------------ the step
    def execute(self, out: SchedulerOutput, block_tables: dict[int, list[int]]) -> tuple[list[Sequence], torch.Tensor]:
        """Prepare the step once, send it to every rank, return the full-vocabulary logits."""
        return self.collect(self.submit(out, block_tables))

    def submit(self, out: SchedulerOutput, block_tables: dict[int, list[int]], block_offset: int = 0) -> list[Sequence]:
        """Send a step to every rank without waiting (pipeline parallelism keeps several in flight).

        ``block_offset`` shifts the copy-on-write block ids (a virtual engine's share of the
        blocks starts there; its tables and slots arrive already shifted). Returns the
        sequences that sample; :meth:`collect` returns the logits, steps in submission order.
        """
        batch = self.prepare_inputs(out, block_tables)
        meta = {f.name: getattr(batch.metadata, f.name) for f in fields(batch.metadata)}
        meta = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in meta.items()}
        payload = pickle.dumps({
            "input_ids": batch.input_ids.numpy(),
            "positions": batch.positions.numpy(),
            "logits_indices": batch.logits_indices.numpy(),
            "metadata": meta,
            "block_copies": [(a + block_offset, b + block_offset) for a, b in out.block_copies],
        }, protocol=pickle.HIGHEST_PROTOCOL)
        self._send_all(("step", payload))
        return batch.sample_seqs

    def collect(self, sample_seqs: list[Sequence]) -> tuple[list[Sequence], torch.Tensor]:
        """Wait for the oldest submitted step; its ``(sample_seqs, logits)`` from the last stage's rank 0."""
        logits = self._collect(STEP_TIMEOUT_S)[self.logits_rank]
        if logits is None:
            logits = torch.empty((0, self.hf_config.vocab_size), dtype=torch.float32)
        return sample_seqs, logits.to(self.engine_device)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Block copies travel with the next step (each rank copies its own heads)."""
        raise NotImplementedError("with tensor_parallel_size > 1 block copies are sent with the step (execute)")

    def execute_speculative(self, *args: Any, **kwargs: Any):
        raise NotImplementedError("speculative decoding with tensor_parallel_size > 1 is not supported")
