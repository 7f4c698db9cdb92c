"""servinglab: the runtime that the course's graded parts plug into.

The runtime (model, runner, engine, server, benchmarks) is not graded. It calls each
graded part (``kv_cache``, ``block_manager``, ``paged_attention``, ``scheduler``, ...)
through :mod:`servinglab.impl`, which picks the student's ``exercises`` package or the
reference ``solutions`` package.

Like vLLM, the offline API sits at the top: ``from servinglab import LLM, SamplingParams``.
Both names load on first use (PEP 562 ``__getattr__``), so ``import servinglab`` stays
cheap and does not import torch.

The rooms, and the one direction their imports run (a test checks it)::

    course  ->  serving, bench  ->  engine  ->  model  ->  interfaces, sequence, impl
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "EngineConfig"]

_LAZY = {
    "LLM": "servinglab.engine.llm",
    "SamplingParams": "servinglab.engine.sampling",
    "RequestOutput": "servinglab.engine.outputs",
    "EngineConfig": "servinglab.engine.config",
}

if TYPE_CHECKING:
    from servinglab.engine.config import EngineConfig
    from servinglab.engine.llm import LLM
    from servinglab.engine.outputs import RequestOutput
    from servinglab.engine.sampling import SamplingParams


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'servinglab' has no attribute {name!r}")
