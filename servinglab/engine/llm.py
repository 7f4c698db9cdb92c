"""``LLM``: the offline API, shaped like ``vllm.LLM`` so the same script runs on both."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

from tqdm.auto import tqdm

from servinglab.engine.config import EngineConfig
from servinglab.engine.engine import LLMEngine
from servinglab.engine.outputs import RequestOutput
from servinglab.engine.sampling import SamplingParams

PromptType = str | list[int] | dict[str, Any]


def _normalize(prompts: PromptType | Seq[PromptType]) -> list[str | list[int]]:
    """Accept what vLLM accepts: a string, token ids, ``{"prompt": ...}`` / ``{"prompt_token_ids": ...}``, or a list of those."""
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]  # type: ignore[list-item]
    out: list[str | list[int]] = []
    for p in prompts:  # type: ignore[union-attr]
        if isinstance(p, dict):
            if "prompt_token_ids" in p:
                out.append(list(p["prompt_token_ids"]))
            elif "prompt" in p:
                out.append(p["prompt"])
            else:
                raise ValueError(f"a prompt dict needs 'prompt' or 'prompt_token_ids', got keys {sorted(p)}")
        else:
            out.append(p)
    return out


class LLM:
    """Offline batch generation with the lab engine.

    Example::

        llm = LLM(model=str(default_model_dir()), max_num_seqs=64)
        outs = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=16))
        print(outs[0].outputs[0].text)
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        engine_keys = {k: kwargs.pop(k) for k in ("hf_config", "tokenizer") if k in kwargs}
        model_obj = kwargs.pop("model_obj", None)
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs), model=model_obj, **engine_keys)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Seq[PromptType],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run every prompt to completion with continuous batching; outputs keep the input order.

        All requests are validated before any runs, so a bad one raises ``ValueError``
        without leaving the others half-done.
        """
        items = _normalize(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(items)
        else:
            params = list(sampling_params)
            if len(params) != len(items):
                raise ValueError(f"sampling_params has {len(params)} entries but there are {len(items)} prompts")
        engine = self.engine
        ids: list[str] = []
        try:
            for item, p in zip(items, params):
                ids.append(engine.add_request(item, p))
        except ValueError:
            for rid in ids:
                engine.abort_request(rid)
            raise
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="lab generate", disable=not use_tqdm, unit="req") as bar:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        return [done[rid] for rid in ids]
