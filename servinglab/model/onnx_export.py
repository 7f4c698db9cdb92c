"""Export the decoder to ONNX (``servinglab export-onnx``) and run it with onnxruntime.

The engine's model reads K/V through the student's paged attention, whose block tables
and slot mappings are Python-side planning that a static graph cannot hold. The export
therefore wraps the *same weights* in plain causal attention over dense K/V tensors,
the layout ONNX runtimes, TensorRT and Hugging Face's ``past_key_values`` use:

* **prefill graph** ``input_ids [B, T] -> logits [B, T, V], present.{i}.key/value [B, kv_heads, T, head_dim]``;
* **decode graph** ``input_ids [B, T], past.{i}.key/value [B, kv_heads, P, head_dim] ->
  logits [B, T, V], present.{i}.key/value [B, kv_heads, P + T, head_dim]``.

Batch ``B``, new tokens ``T`` and past length ``P`` are dynamic axes. Every row of a batch
has the same length (no padding mask): enough for the round trip and the speed check.
Position ``p`` of a new token is ``P + t``; token ``t`` attends to every past position and
to new positions ``<= t`` (causal mask, Vaswani et al. 2017).

The export uses ``torch.onnx.export(..., dynamo=True)`` (the TorchDynamo-based exporter;
needs ``onnxscript``), is checked with ``onnx.checker.check_model`` and runs on
onnxruntime's CPU provider. Everything runs in float32 so the ONNX logits can be compared
with PyTorch's to float32 rounding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from servinglab.model.llama import LlamaForCausalLM, RotaryEmbedding

OPSET = 18


class DenseKVDecoder(nn.Module):
    """The lab decoder's weights over dense K/V tensors, in an exportable form.

    Args:
        model: a :class:`LlamaForCausalLM` (its modules are shared, not copied).
        with_past: ``True`` takes ``past`` K/V inputs (decode graph); ``False`` starts
            from an empty cache (prefill graph).
    """

    def __init__(self, model: LlamaForCausalLM, with_past: bool) -> None:
        super().__init__()
        self.lm = model
        self.with_past = with_past
        attn = model.model.layers[0].self_attn
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim

    def _attention(self, layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   past_k: torch.Tensor | None, past_v: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = layer.self_attn
        batch, new = x.shape[0], x.shape[1]
        h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = attn.qkv_proj(x)
        qk = RotaryEmbedding.apply(qkv[..., : (h + kvh) * d].reshape(batch, new, h + kvh, d), cos, sin)
        q = qk[:, :, :h].transpose(1, 2)  # [B, H, T, D]
        k = qk[:, :, h:].transpose(1, 2)  # [B, KVH, T, D]
        v = qkv[..., (h + kvh) * d :].reshape(batch, new, kvh, d).transpose(1, 2)
        if past_k is not None:
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        total = k.shape[2]
        # Grouped-query attention: each KV head serves h // kvh query heads.
        k_rep, v_rep = k.repeat_interleave(h // kvh, dim=1), v.repeat_interleave(h // kvh, dim=1)
        scores = torch.matmul(q, k_rep.transpose(-1, -2)) * attn.scale  # [B, H, T, P + T]
        query_pos = torch.arange(new, device=x.device)[:, None] + (total - new)
        key_pos = torch.arange(total, device=x.device)[None, :]
        scores = scores.masked_fill(key_pos > query_pos, float("-inf"))
        out = torch.matmul(F.softmax(scores.float(), dim=-1).to(v.dtype), v_rep)  # [B, H, T, D]
        out = attn.o_proj(out.transpose(1, 2).reshape(batch, new, h * d))
        return out, k, v

    def layer_forward(self, layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      past_k: torch.Tensor | None = None, past_v: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decoder layer on the hidden state ``x`` ``[B, T, hidden]``: ``(x, key, value)`` (keys and values with the past)."""
        out, k, v = self._attention(layer, layer.input_layernorm(x), cos, sin, past_k, past_v)
        x = x + out
        return x + layer.mlp(layer.post_attention_layernorm(x)), k, v

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(logits, present.0.key, present.0.value, ...)``; ``past`` alternates key, value per layer."""
        layers = self.lm.model.layers
        past_len = past[0].shape[2] if self.with_past else 0
        x = self.lm.model.embed_tokens(input_ids)  # [B, T, hidden]
        positions = torch.arange(input_ids.shape[1], device=input_ids.device) + past_len
        cos, sin = self.lm.rotary_emb.cos_sin(positions, x.dtype)  # [T, 1, D/2]: broadcasts over B
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(layers):
            pk, pv = (past[2 * i], past[2 * i + 1]) if self.with_past else (None, None)
            x, k, v = self.layer_forward(layer, x, cos, sin, pk, pv)
            presents += [k, v]
        logits = F.linear(self.lm.model.norm(x), self.lm.lm_head_weight).float()
        return (logits, *presents)


def io_names(num_layers: int, with_past: bool) -> tuple[list[str], list[str]]:
    """Input and output names of a graph (``past.{i}.key`` ... like Hugging Face's ONNX exports)."""
    kv = lambda prefix: [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]  # noqa: E731
    inputs = ["input_ids"] + (kv("past") if with_past else [])
    return inputs, ["logits"] + kv("present")


def example_inputs(model: LlamaForCausalLM, with_past: bool, batch: int = 2, new: int = 3, past: int = 4) -> tuple[torch.Tensor, ...]:
    """Small inputs to trace with (sizes above 1 so no axis gets specialised to a constant)."""
    cfg = model.config
    attn = model.model.layers[0].self_attn
    ids = torch.randint(0, cfg.vocab_size, (batch, 1 if with_past else new))
    if not with_past:
        return (ids,)
    kv = [torch.randn(batch, attn.num_kv_heads, past, attn.head_dim) for _ in range(2 * cfg.num_hidden_layers)]
    return (ids, *kv)


def export_onnx(model: LlamaForCausalLM, path: str | Path, with_past: bool) -> Path:
    """Export the prefill (``with_past=False``) or decode graph of a float32 CPU model; check it.

    Returns the path of the written ``.onnx`` file (weights inside the file).
    """
    import onnx

    first = next(model.parameters())
    if first.dtype != torch.float32 or first.device.type != "cpu":
        raise ValueError(f"model must be float32 on the CPU for the export, got {first.dtype} on {first.device}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = DenseKVDecoder(model, with_past).eval()
    inputs, outputs = io_names(model.config.num_hidden_layers, with_past)
    batch, seq, past = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    shapes: list[dict[int, object]] = [{0: batch, 1: seq}]
    shapes += [{0: batch, 2: past} for _ in inputs[1:]]
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper, example_inputs(model, with_past), dynamo=True, input_names=inputs, output_names=outputs,
            dynamic_shapes=(shapes[0], tuple(shapes[1:])) if with_past else (shapes[0],), opset_version=OPSET,
            external_data=False, verbose=False,
        )
    program.save(str(path), external_data=False)
    onnx.checker.check_model(str(path), full_check=True)
    return path


def write_graph_config(model: LlamaForCausalLM, out_dir: str | Path) -> Path:
    """``config.json`` next to the graphs: the sizes ``build-trt`` needs for its optimization profiles."""
    import json

    attn = model.model.layers[0].self_attn
    cfg = model.config
    values = {"num_hidden_layers": cfg.num_hidden_layers, "num_key_value_heads": attn.num_kv_heads, "head_dim": attn.head_dim,
              "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_position_embeddings, "opset": OPSET}
    path = Path(out_dir) / "config.json"
    path.write_text(json.dumps(values, indent=2) + "\n")
    return path


@dataclass
class OnnxDecoder:
    """onnxruntime sessions for the prefill and decode graphs, with a greedy loop."""

    prefill: object  # onnxruntime.InferenceSession
    decode: object | None
    num_layers: int

    @classmethod
    def load(cls, prefill_path: str | Path, decode_path: str | Path | None, num_layers: int, threads: int | None = None) -> OnnxDecoder:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        make = lambda p: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])  # noqa: E731
        return cls(make(prefill_path), None if decode_path is None else make(decode_path), num_layers)

    def run_prefill(self, input_ids: torch.Tensor) -> list:
        """``[logits, present...]`` as numpy arrays."""
        return self.prefill.run(None, {"input_ids": input_ids.numpy()})

    def greedy(self, input_ids: torch.Tensor, max_tokens: int) -> torch.Tensor:
        """Greedy continuation ``[B, max_tokens]``: one prefill, then one decode-graph run a token."""
        if self.decode is None:
            raise ValueError("decode graph not loaded: pass decode_path to OnnxDecoder.load")
        inputs, _ = io_names(self.num_layers, with_past=True)
        logits, *kv = self.run_prefill(input_ids)
        out = []
        nxt = logits[:, -1].argmax(-1)[:, None]
        for _ in range(max_tokens):
            out.append(nxt)
            if len(out) == max_tokens:
                break
            logits, *kv = self.decode.run(None, {"input_ids": nxt, **dict(zip(inputs[1:], kv))})
            nxt = logits[:, -1].argmax(-1)[:, None]
        import numpy as np

        return torch.from_numpy(np.concatenate(out, axis=1))


def torch_greedy(model: LlamaForCausalLM, input_ids: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """The same greedy loop in PyTorch through :class:`DenseKVDecoder` (the export's reference)."""
    prefill, decode = DenseKVDecoder(model, False), DenseKVDecoder(model, True)
    with torch.no_grad():
        logits, *kv = prefill(input_ids)
        out = []
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(max_tokens):
            out.append(nxt)
            if len(out) == max_tokens:
                break
            logits, *kv = decode(nxt, *kv)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
    return torch.cat(out, dim=1)


def time_call(fn, repeats: int = 5) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
