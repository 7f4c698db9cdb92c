"""The lab engine: the step loop that wires scheduler, block manager, runner and sampler.

Each :meth:`LLMEngine.step` is one iteration of continuous batching (Orca, OSDI 2022):
the student's scheduler picks which sequences run and how many tokens each computes,
the runner writes their K/V into the student's paged blocks and runs the model through
the student's paged attention, the sampler picks the next tokens, and finished sequences
hand their blocks back. Requests join and leave between any two steps.
"""

from __future__ import annotations

import itertools
import time

import torch

from servinglab.model.cache import KVCacheSpec, allocate_host_kv_cache, allocate_kv_cache, host_pool_num_blocks, pool_num_blocks
from servinglab.engine.async_scheduling import AsyncScheduling
from servinglab.engine.config import EngineConfig
from servinglab.interfaces import SchedulerOutput
from servinglab.engine.output_processor import OutputProcessor
from servinglab.engine.outputs import RequestMetrics, RequestOutput
from servinglab.engine.step_protocol import RequestState, StepRecord, StepStrategy
from servinglab.engine.stall import raise_if_stalled
from servinglab.engine.cuda_runner import make_runner
from servinglab.engine.pp_driver import make_scheduling
from servinglab.engine.sampling import SamplingParams, make_generator, sample, sample_each
from servinglab.sequence import Sequence, SequenceStatus


class LLMEngine:
    """Continuous-batching engine over a paged KV cache (vLLM's ``LLMEngine`` in miniature)."""

    def __init__(self, config: EngineConfig, model: torch.nn.Module | None = None, hf_config=None, tokenizer=None) -> None:
        from servinglab.model import weights

        self.config = config
        self.device = config.torch_device
        self.tp_executor = None
        # Part 9: k worker ranks hold the model (servinglab.engine.tp_executor); vLLM's
        # distributed_executor_backend="mp" forces worker processes at k = 1 too (one NCCL rank on one GPU).
        if config.tensor_parallel_size > 1 or config.pipeline_parallel_size > 1 or config.extra.get("distributed_executor_backend") == "mp":
            from servinglab.engine.tp_executor import TPExecutor

            self.tp_executor = model = TPExecutor(config, model, hf_config)
            hf_config, tokenizer = model.hf_config, tokenizer or model.load_tokenizer()
        # Part 8 on a GPU: load on the CPU and quantize layer by layer onto the GPU, which then
        # never holds the unquantized projections (peak memory = the quantized model's).
        quantize_on_load = config.quantization is not None and self.device.type == "cuda"
        if model is None:
            if config.model is None:
                raise ValueError("model must be a model folder (run `servinglab prepare-model`) or a model object")
            model, hf_config = weights.load_model(config.model, dtype=config.torch_dtype,
                                                  device="cpu" if quantize_on_load else self.device)
            if tokenizer is None:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(config.model)
        elif hf_config is None:
            raise ValueError("hf_config is required when a model object is passed")
        if config.quantization is not None:  # Part 8: before packing (cpu_gemm only re-lays plain nn.Linear)
            from servinglab.model.quant import quantize_model

            quantize_model(model, config.quantization, config.quantization_group_size, device=self.device)
        model = model.to(device=self.device)  # a ready model may come from the CPU
        if self.device.type == "cpu" and config.quantization == "int8":
            from servinglab.model.quant import use_cpu_int8pack

            use_cpu_int8pack(model, config.torch_dtype)  # bf16/fp16 activations only (float32 stays exact)
        if self.device.type == "cpu" and hasattr(model, "prepack_cpu_weights"):
            model.prepack_cpu_weights(config.cpu_gemm)  # bf16/fp16 oneDNN weight packing (servinglab.model.cpu_gemm)
        self.model, self.hf_config, self.tokenizer = model, hf_config, tokenizer
        limit = getattr(hf_config, "max_position_embeddings", 2048)
        self.max_model_len = config.max_model_len or min(limit, 2048)
        if self.max_model_len > limit:
            raise ValueError(f"max_model_len ({self.max_model_len}) must be <= the model's max_position_embeddings ({limit})")
        eos = getattr(hf_config, "eos_token_id", None)
        self.eos_token_ids: set[int] = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.output_processor = OutputProcessor(tokenizer, self.eos_token_ids, self.max_model_len)

        # With tensor parallelism a block holds one rank's num_kv_heads / k heads: k times the blocks per GiB.
        self.kv_spec = KVCacheSpec.from_hf_config(hf_config if self.tp_executor is None else self.tp_executor.local_config)
        self.num_kv_blocks = config.num_kv_blocks or pool_num_blocks(  # Part 1 sizes the pool
            self.kv_spec, config.kv_cache_memory_gib, config.block_size, config.torch_dtype)
        kv_caches = [] if self.tp_executor is not None else allocate_kv_cache(
            self.kv_spec, self.num_kv_blocks, config.block_size, config.torch_dtype, self.device)

        # preemption_mode="swap": a host pool of swap_space GiB (pinned on CUDA) takes preempted sequences' blocks.
        swap = config.preemption_mode == "swap"
        self.num_host_blocks = host_pool_num_blocks(self.kv_spec, config.swap_space, config.block_size, config.torch_dtype) if swap else 0
        # Parts 2 and 4; with pipeline parallelism p virtual engines behind the same interfaces (pp_driver.py).
        self.block_manager, self.scheduler, self.pp_engines = make_scheduling(config, self.num_kv_blocks, self.num_host_blocks)
        self.runner = make_runner(self.model, kv_caches, config, self.device, self.max_model_len) if self.tp_executor is None \
            else self.tp_executor.start_cache(self.num_kv_blocks)  # every rank allocates its share of the blocks
        if swap:
            self.runner.host_caches = allocate_host_kv_cache(self.kv_spec, self.num_host_blocks, config.block_size, config.torch_dtype, self.device.type == "cuda")
        if hasattr(self.runner, "slot_of"):
            self.runner.slot_of = self.block_manager.get_slot  # every step's slot mapping comes from Part 2
        # Speculative decoding (servinglab.engine.spec_decode), when configured: a StepStrategy the step delegates to.
        self.spec_decoder: StepStrategy | None = None
        if config.speculative_config is not None:
            from servinglab.engine.spec_decode import SpeculativeDecoder

            self.spec_decoder = SpeculativeDecoder(config.speculative_config, self)
        self.async_loop = AsyncScheduling() if config.use_async_scheduling else None  # overlap scheduling (on for CUDA by default)
        self.requests: dict[str, RequestState] = {}
        self._seq_to_request: dict[int, RequestState] = {}
        self._ids = itertools.count()
        self.step_log: list[StepRecord] = []
        self.record_steps = False
        self.num_steps = 0
        # Servers set it: a failure of one request's own sampling or forks aborts that request alone (kept in `failed`).
        self.isolate_failures, self.failed = False, {}
        self.last_step_had_prefill = False  # whether the last plain step computed a prefill (chunk)

    # ---------------------------------------------------------------- requests
    def tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        """Return ``(text or None, token ids)`` for a text or token-id prompt."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt is text but the engine has no tokenizer: pass token ids")
            return prompt, self.tokenizer(prompt)["input_ids"]
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) for t in prompt):
            raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        vocab = self.hf_config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got {bad[:5]}")
        return None, list(prompt)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None, arrival_time: float | None = None, stream: bool = False) -> str:
        """Queue a request; raises ``ValueError`` (naming the parameter) if it can never run.

        With ``stream=True`` every step that advances the request returns a snapshot of it;
        otherwise :meth:`step` returns the request once, when it finishes.
        """
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        text, ids = self.tokenize(prompt)
        if not ids:
            raise ValueError("prompt must contain at least one token")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens but max_model_len is {self.max_model_len}: it needs room for one output token")
        # The longest this request can grow: prompt + max_tokens, capped by max_model_len.
        # If even an empty cache cannot hold that, it could never finish: refuse it now.
        longest = min(len(ids) + (params.max_tokens or self.max_model_len), self.max_model_len)
        blocks_needed = -(-longest // self.config.block_size)
        if blocks_needed > self.block_manager.num_blocks:  # with pipeline parallelism: one virtual engine's share
            raise ValueError(
                f"request needs up to {blocks_needed} KV blocks ({longest} tokens: prompt + max_tokens) but the cache has "
                f"only {self.block_manager.num_blocks} (num_kv_blocks={self.num_kv_blocks}); lower max_tokens or give the engine more KV memory"
            )
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        now = time.perf_counter()
        req = RequestState(request_id, text, ids, params, RequestMetrics(arrival_time if arrival_time is not None else now), stream)
        seq = Sequence(list(ids), request_id=request_id, sampling_params=params, arrival_time=req.metrics.arrival_time)
        req.seqs.append(seq)
        req.generators[seq.seq_id] = make_generator(params, 0, self.device)
        self.requests[request_id] = req
        self._seq_to_request[seq.seq_id] = req
        self.scheduler.add_sequence(seq)
        return request_id

    def abort_request(self, request_id: str) -> None:
        """Cancel a request: its sequences leave the queues and their blocks are freed."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            if not seq.is_finished:
                seq.status = SequenceStatus.FINISHED_ABORTED
                self.scheduler.finish_sequence(seq)
            self._seq_to_request.pop(seq.seq_id, None)

    def has_unfinished_requests(self) -> bool:
        """Requests not finished yet, or (overlap scheduling) a launched step not committed yet."""
        return bool(self.requests) or (self.async_loop is not None and self.async_loop.in_flight is not None)

    # ------------------------------------------------ hooks for step implementations
    # The plain step below and speculative decoding (spec_decode.py) both commit tokens
    # through these public methods, so neither reaches into the other's private state.
    def request_of(self, seq: Sequence) -> RequestState:
        """The request a live sequence belongs to."""
        return self._seq_to_request[seq.seq_id]

    def generator_of(self, seq: Sequence) -> torch.Generator | None:
        """The sequence's seeded random generator (``None`` for unseeded sampling)."""
        return self._seq_to_request[seq.seq_id].generators.get(seq.seq_id)

    # ---------------------------------------------------------------- the step
    def step(self) -> list[RequestOutput]:
        """Run one iteration; return outputs of requests that progressed (finished ones last time)."""
        if self.spec_decoder is not None:  # draft, verify in one pass, roll back: spec_decode.py
            return self.spec_decoder.step(self)
        if self.async_loop is not None:  # the host one step ahead of the device: async_scheduling.py
            return self.async_loop.step(self)
        return self.plain_step()

    def plain_step(self) -> list[RequestOutput]:
        """One iteration without speculation (a step strategy may call it for steps it does not speculate in)."""
        if self.pp_engines is not None:  # several micro-batches in flight: pp_driver.py
            return self.pp_engines.step(self)
        start = time.perf_counter()
        out = self.scheduler.schedule()
        if out.is_empty:
            raise_if_stalled(self.scheduler, self.block_manager)
            return []
        was_prefill = [s.seq.is_prefill for s in out.scheduled]
        self.last_step_had_prefill = any(was_prefill)
        seqs, logits = self.runner.execute(out, self.block_manager.block_tables)
        return self.commit(out, seqs, logits, was_prefill, start)

    def commit(self, out: SchedulerOutput, seqs: list[Sequence], logits: torch.Tensor, was_prefill: list[bool],
               start: float) -> list[RequestOutput]:
        """After a step ran: advance computed tokens, publish full blocks, sample, commit tokens."""
        for item in out.scheduled:
            seq = item.seq
            seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.cache_blocks(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
        tokens = (sample_each if self.isolate_failures else sample)(logits, [s.sampling_params for s in seqs], [self.generator_of(s) for s in seqs])
        return self.commit_tokens(out, seqs, tokens, logits, was_prefill, start)

    def commit_tokens(self, out: SchedulerOutput, seqs: list[Sequence], tokens: list[int | Exception | None], logits: torch.Tensor,
                      was_prefill: list[bool], start: float) -> list[RequestOutput]:
        """Append each row's sampled token (``None``: skip the row; an exception fails its request when the
        server isolates failures, else raises), fork parallel samples, end the step; return the outputs."""
        now = time.perf_counter()
        touched: dict[str, RequestState] = {}
        for row, (seq, token) in enumerate(zip(seqs, tokens)):
            if token is None or (req := self._seq_to_request.get(seq.seq_id)) is None:
                continue  # its request failed earlier in this step
            try:
                if isinstance(token, Exception):
                    raise token
                touched[req.request_id] = req
                self.append_token(req, seq, token, now)
                if len(req.seqs) < req.params.n and seq is req.seqs[0]:
                    self.fork_children(req, seq, logits[row : row + 1], now)
            except (Exception if self.isolate_failures else ()) as exc:  # () catches nothing: offline, it raises
                self.abort_request(req.request_id)
                self.failed[req.request_id] = exc
        self.num_steps += 1
        if self.record_steps:
            self.log_step(start, out, was_prefill)
        return [self.request_output(req) for req in touched.values() if (req.stream or req.finished) and req.request_id not in self.failed]

    def log_step(self, start: float, out: SchedulerOutput, was_prefill: list[bool]) -> None:
        """Append this step's :class:`StepRecord` to ``step_log``."""
        stats = self.block_manager.get_stats()
        self.step_log.append(StepRecord(
            self.num_steps, start, time.perf_counter(),
            [(s.seq.seq_id, s.num_new_tokens, p) for s, p in zip(out.scheduled, was_prefill)],
            [s.seq_id for s in out.preempted], stats.usage, len(self.scheduler.waiting),
        ))

    def fork_children(self, req: RequestState, parent: Sequence, logits_row: torch.Tensor, now: float) -> None:
        """Parallel sampling: the other n-1 completions share the prompt's blocks (copy-on-write)."""
        for index in range(1, req.params.n):
            child = Sequence(list(req.prompt_token_ids), request_id=req.request_id, sampling_params=req.params, arrival_time=parent.arrival_time)
            child.num_computed_tokens = parent.num_computed_tokens
            child.first_scheduled_time = parent.first_scheduled_time
            req.seqs.append(child)
            req.generators[child.seq_id] = make_generator(req.params, index, self.device)
            self._seq_to_request[child.seq_id] = req
            self.scheduler.fork_sequence(parent, child)
            token = sample(logits_row, [req.params], [req.generators[child.seq_id]])[0]
            self.append_token(req, child, token, now)

    def append_token(self, req: RequestState, seq: Sequence, token: int, now: float) -> None:
        """Commit one sampled token: timestamps, metrics, and the stop check (a finished sequence frees its blocks)."""
        seq.output_token_ids.append(token)
        seq.token_times.append(now)
        if seq.first_token_time is None:
            seq.first_token_time = now
        m = req.metrics
        if m.first_token_time is None:
            m.first_token_time, m.first_scheduled_time = now, seq.first_scheduled_time
        if seq is req.seqs[0]:
            m.token_times.append(now)
        reason = self.output_processor.stop_reason(seq)
        if reason is not None:
            seq.status, seq.finish_time = reason, now
            self.scheduler.finish_sequence(seq)

    def request_output(self, req: RequestState) -> RequestOutput:
        """The request's snapshot; a finished request also leaves the engine's tables."""
        finished = req.finished
        if finished:
            req.metrics.finished_time = max(s.finish_time or 0.0 for s in req.seqs)
            req.metrics.num_cached_tokens = req.seqs[0].num_cached_tokens
            req.metrics.num_preemptions = sum(s.num_preemptions for s in req.seqs)
            self.requests.pop(req.request_id, None)
            for s in req.seqs:
                self._seq_to_request.pop(s.seq_id, None)
        outs = [self.output_processor.completion(i, s) for i, s in enumerate(req.seqs)]
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, finished, req.metrics)
