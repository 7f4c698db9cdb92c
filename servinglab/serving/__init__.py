"""The serving room: the engine behind HTTP (vLLM's ``vllm/entrypoints/openai``).

- :mod:`.server` the OpenAI-compatible FastAPI app (``servinglab serve``);
- :mod:`.protocol` request/response models and OpenAI-style errors;
- :mod:`.metrics` Prometheus metrics with vLLM's names.

May import: :mod:`servinglab.engine` and everything below it. Never bench or course.
"""
