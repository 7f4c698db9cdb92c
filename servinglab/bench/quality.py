"""Quality of a quantized model, measured offline: perplexity on stdlib docstrings, greedy agreement.

**The text.** Every Python installation ships its standard library with docstrings, so
the course needs no download to get real English-and-code prose. :func:`stdlib_docstring_text`
is the exact extraction: for each module of :data:`STDLIB_MODULES` (in that order) the
module docstring, then the docstrings of its public classes and functions *defined in that
module*, sorted by name, each through ``inspect.getdoc`` (which strips indentation), all
joined with blank lines. The text differs between Python versions, so the report carries
the Python version and the text's sha256: equal hashes, comparable perplexities.

**Perplexity** ``exp(mean NLL)`` over non-overlapping windows of ``window`` tokens, each
scored from its own start (no context carried across windows), on the first
``num_windows`` windows. It runs the model's own modules (``QuantLinear`` included)
through the plain causal attention of :class:`~servinglab.model.onnx_export.DenseKVDecoder`.

**Greedy agreement**: the share of prompts whose greedy continuation is identical to the
baseline's, and the mean length of the common prefix. In reduced precision a divergence
at a near-tie is not an error (the two logits differ by less than the rounding).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import math
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F

STDLIB_MODULES = ("argparse", "collections", "contextlib", "dataclasses", "functools", "heapq", "json",
                  "pathlib", "shutil", "statistics", "string", "textwrap")
PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "A paged KV cache stores keys and values in",
    "The three primary colors are",
    "Write a haiku about the ocean:\n",
    "import json\n\ndef load_config(path):\n",
    "Photosynthesis is the process by which",
    "Q: What is 12 times 7?\nA:",
)


def stdlib_docstring_text(modules: Sequence[str] = STDLIB_MODULES) -> str:
    """The docstring text described in the module docstring (deterministic for one Python version)."""
    parts: list[str] = []
    for name in modules:
        mod = importlib.import_module(name)
        if mod.__doc__:
            parts.append(inspect.getdoc(mod) or "")
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            if getattr(obj, "__module__", None) != name:
                continue  # re-exported from elsewhere
            doc = inspect.getdoc(obj)
            if doc:
                parts.append(doc)
    return "\n\n".join(p for p in parts if p)


def text_fingerprint(text: str) -> dict[str, object]:
    """``{"python": version, "chars": n, "sha256": hex}`` of the text (UTF-8)."""
    return {"python": sys.version.split()[0], "chars": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest()}


def token_windows(token_ids: Sequence[int], window: int, num_windows: int) -> torch.Tensor:
    """``[num_windows, window]`` long: the first non-overlapping windows of the token stream."""
    if window < 2 or num_windows < 1:
        raise ValueError(f"window must be >= 2 and num_windows >= 1, got {window}, {num_windows}")
    available = len(token_ids) // window
    if available < num_windows:
        raise ValueError(f"num_windows={num_windows} windows of {window} tokens need {num_windows * window} tokens, the text has {len(token_ids)}")
    return torch.tensor(list(token_ids[: num_windows * window]), dtype=torch.long).view(num_windows, window)


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, batch: int = 4, progress: bool = False) -> float:
    """``exp`` of the mean next-token NLL over every window (each scored from its own start)."""
    from tqdm.auto import tqdm

    from servinglab.model.onnx_export import DenseKVDecoder

    scorer = DenseKVDecoder(model, with_past=False)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in tqdm(range(0, windows.shape[0], batch), desc="perplexity", disable=not progress, leave=False):
        ids = windows[start : start + batch].to(device)
        logits = scorer(ids)[0]  # float32 [B, T, V]
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def greedy_agreement(baseline: list[list[int]], other: list[list[int]]) -> dict[str, float]:
    """Share of identical continuations and mean common-prefix length (tokens)."""
    if len(baseline) != len(other):
        raise ValueError(f"baseline has {len(baseline)} continuations, other has {len(other)}")
    prefixes = []
    for a, b in zip(baseline, other):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        prefixes.append(n)
    identical = sum(a == b for a, b in zip(baseline, other))
    return {"identical": identical / len(baseline), "mean_common_prefix": sum(prefixes) / len(prefixes)}
