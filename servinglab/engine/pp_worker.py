"""A pipeline-parallel worker rank (Part 9b): one stage, optionally tensor-parallel inside.

Ranks are numbered ``pp_rank * tp_size + tp_rank``: the ranks of one stage form a
tensor-parallel group (created on every rank in the same order, as ``torch.distributed``
requires), and tensor-parallel rank ``t`` of stage ``s`` hands its activations to rank
``t`` of stage ``s + 1`` with point-to-point ``send`` / ``recv`` (gloo on CPUs, NCCL on
GPUs): vLLM's ``IntermediateTensors``, the pair ``hidden_states`` and ``residual``.

Every rank receives every step's inputs from the driver (:mod:`servinglab.engine.tp_executor`)
and handles steps in the order they arrive, so stage ``s`` can work on micro-batch
``j + 1`` while stage ``s + 1`` works on micro-batch ``j``: the pipeline. Each rank
records its compute intervals (after the ``recv``, before the ``send``) for the
measured bubble.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from servinglab.engine.tp_worker import CollectiveTimer, WorkerSpec, WorkerRank
from servinglab.model.cache import KVCacheSpec
from servinglab.model.pp_stage import PPStage, stage_config

MAX_INTERVALS = 100_000  # busy intervals kept between two stats(reset=True)


class PPRank(WorkerRank):
    """Rank ``rank`` of ``tp_size * pp_size``: its stage's layers, its tensor-parallel shard of them."""

    def __init__(self, rank: int, world: int, spec: WorkerSpec, device: torch.device) -> None:  # noqa: D107
        from transformers import LlamaConfig

        from servinglab.model import weights

        self.rank, self.world, self.spec, self.device = rank, world, spec, device
        self.dtype = getattr(torch, spec.dtype)
        self.pp_size = spec.pp_size
        self.tp_size = world // spec.pp_size
        self.pp_rank, self.tp_rank = divmod(rank, self.tp_size)
        groups = [dist.new_group(list(range(s * self.tp_size, (s + 1) * self.tp_size))) for s in range(self.pp_size)]
        full_config = LlamaConfig.from_dict(spec.config)
        if spec.state is not None:
            state = spec.state
        else:
            from safetensors.torch import load_file

            hf_state: dict[str, torch.Tensor] = {}
            for f in sorted(Path(spec.model_dir).glob("*.safetensors")):
                hf_state.update(load_file(str(f)))
            state = weights.hf_to_fused(hf_state, full_config)
        self.stage = PPStage(full_config, state, self.pp_rank, self.pp_size, self.tp_rank, self.tp_size,
                             groups[self.pp_rank], device, self.dtype)
        del state
        self.model = self.stage.model
        local = stage_config(full_config, self.pp_rank, self.pp_size)
        if self.tp_size > 1:
            from servinglab.model.tp_layers import local_config

            local = local_config(local, self.tp_size)
        self.kv_spec = KVCacheSpec.from_hf_config(local)
        self.hidden_size = full_config.hidden_size
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.timer = CollectiveTimer(device) if spec.profile_collectives else None
        self.compute_s = 0.0
        self.busy: list[tuple[float, float]] = []
        self.p2p_elements = 0

    def step(self, payload: bytes) -> torch.Tensor | None:
        """Run this stage on one micro-batch; the last stage's tensor-parallel rank 0 returns the logits."""
        inputs = pickle.loads(payload)
        with torch.inference_mode():
            self.copy_blocks(inputs["block_copies"])
            ids = torch.from_numpy(inputs["input_ids"]).to(self.device)
            positions = torch.from_numpy(inputs["positions"]).to(self.device)
            rows = torch.from_numpy(inputs["logits_indices"]).to(self.device)
            hidden = residual = None
            if not self.stage.first:  # the previous stage's pair, from the same tensor-parallel rank there
                shape = (ids.shape[0], self.hidden_size)
                hidden = torch.empty(shape, dtype=self.dtype, device=self.device)
                residual = torch.empty(shape, dtype=self.dtype, device=self.device)
                dist.recv(hidden, src=self.rank - self.tp_size)
                dist.recv(residual, src=self.rank - self.tp_size)
            t0 = time.perf_counter()
            hidden, residual = self.stage.forward_stage(ids, positions, self._metadata(inputs["metadata"]), self.kv_caches,
                                                        hidden, residual)
            logits = self.stage.logits(hidden, residual, rows) if (self.stage.last and rows.numel()) else None
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t1 = time.perf_counter()
            if not self.stage.last:
                dist.send(hidden.contiguous(), dst=self.rank + self.tp_size)
                dist.send(residual.contiguous(), dst=self.rank + self.tp_size)
                self.p2p_elements += 2 * hidden.numel()
        self.compute_s += t1 - t0
        if len(self.busy) < MAX_INTERVALS:
            self.busy.append((t0, t1))
        return logits.cpu() if (logits is not None and self.tp_rank == 0) else None

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write copies of this stage's layers (the driver sends them with the step)."""
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], dtype=torch.long, device=self.device)
        dst = torch.tensor([d for _, d in pairs], dtype=torch.long, device=self.device)
        for k_cache, v_cache in self.kv_caches:
            k_cache.index_copy_(0, dst, k_cache.index_select(0, src))
            v_cache.index_copy_(0, dst, v_cache.index_select(0, src))

    def stats(self, reset: bool) -> dict[str, Any]:
        """The tensor-parallel rank's stats, plus the stage, its layers, busy intervals and send volume."""
        out = super().stats(False)
        out.update(pp_rank=self.pp_rank, tp_rank=self.tp_rank, num_layers=len(self.model.model.layers),
                   has_embedding=self.stage.first, has_lm_head=self.stage.last, busy=list(self.busy),
                   p2p_elements=self.p2p_elements)
        if reset:
            super().stats(True)
            self.busy, self.p2p_elements = [], 0
        return out
