"""The engine room: requests in, tokens out (vLLM's ``vllm/v1/engine`` and ``core``).

- :mod:`.config` ``EngineConfig``, every engine setting with vLLM's name;
- :mod:`.engine` ``LLMEngine``, the continuous-batching step loop that calls the
  student's scheduler (Part 4) and block manager (Part 2);
- :mod:`.runner` ``ModelRunner``, turns a scheduled batch into tensors for the model;
  :mod:`.cuda_runner` its CUDA version (pinned uploads, CUDA-graph decode, ``enforce_eager``);
- :mod:`.llm` ``LLM``, the offline API; :mod:`.async_engine` the asyncio front (Part 6);
- :mod:`.sampling`, :mod:`.outputs`, and :mod:`.spec_decode` / :mod:`.draft_model`
  (speculative decoding, Part 5: a step strategy the engine calls through
  :mod:`.step_protocol`; :mod:`.spec_verify` verification, :mod:`.spec_policy` the
  per-step on/off rule, :mod:`.ngram_index` the GPU path's proposer).

May import: :mod:`servinglab.model`, :mod:`servinglab.interfaces`,
:mod:`servinglab.sequence`, :mod:`servinglab.impl`. Never serving, bench or course.
"""
