"""Swap the decoder's projections for the student's ``QuantLinear`` (``LLM(..., quantization=...)``).

The engine calls :func:`quantize_model` once, right after the weights load and before
the CPU kernels pack anything (:mod:`servinglab.model.cpu_gemm` only re-lays modules whose
type is exactly ``nn.Linear``, so a ``QuantLinear`` is left as it is).

What gets quantized: the four projections of every decoder layer (``qkv_proj``,
``o_proj``, ``gate_up_proj``, ``down_proj``). What stays in the model dtype:

* the token embedding: a decode step reads only one row of it per token, so its
  bytes do not limit speed, and quantizing it saves memory but not time;
* the LM head (SmolLM2 ties it to the embedding): the logits feed sampling directly, so
  rounding errors there change tokens first. vLLM's GPTQ/AWQ loaders keep ``lm_head``
  unquantized unless the checkpoint asks otherwise (GPTQ's ``lm_head`` flag); torchao's
  ``quantize_`` quantizes every ``nn.Linear`` its filter accepts, which includes an untied
  ``lm_head``; for tied embeddings both keep the shared matrix in full precision;
* the RMSNorm weights (576 numbers a layer).

For SmolLM2-135M the embedding is 28.3 M of 134.5 M parameters (21%), so INT8 shrinks
the *whole* model by about 40%, not 50%: :func:`weight_bytes` reports both.

INT4 groups must divide every projection's input width: SmolLM2's are 576 (hidden) and
1536 (intermediate), so group 128 does not fit (576 = 4.5 x 128) and 32 or 64 do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from servinglab import impl

QUANT_METHODS = ("int8", "int4", "fp8")  # fp8: servinglab.model.fp8_linear (CUDA, compute capability >= 8.9)
INT4_GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64  # divides both of SmolLM2's input widths (576 and 1536)
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def check_method(method: str | None, group_size: int) -> None:
    """Raise ``ValueError`` naming ``quantization`` / ``quantization_group_size`` for a bad choice."""
    if method is not None and method not in QUANT_METHODS:
        raise ValueError(f"quantization must be one of {QUANT_METHODS} or None, got {method!r}")
    if isinstance(group_size, bool) or group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"quantization_group_size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")


def projection_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """``(parent, attribute, linear)`` for every decoder projection that is a plain ``nn.Linear``."""
    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if name in PROJECTIONS and type(child) is nn.Linear
    ]


CHUNK_ELEMENTS = 1 << 20  # weights quantized at a time on the way to a GPU (bounds the float32 temporaries)


def _row_slice(linear: nn.Linear, start: int, stop: int, device: torch.device | str) -> nn.Linear:
    """A new ``nn.Linear`` of rows ``start:stop`` of ``linear``, its parameters on ``device``."""
    part = nn.Linear(linear.in_features, stop - start, bias=linear.bias is not None, device="meta")
    part.weight = nn.Parameter(linear.weight.detach()[start:stop].to(device), requires_grad=False)
    if linear.bias is not None:
        part.bias = nn.Parameter(linear.bias.detach()[start:stop].to(device), requires_grad=False)
    return part


def _quantize_linear(quantize: Callable[[nn.Linear], nn.Module], join: Callable[..., nn.Module], linear: nn.Linear,
                     device: torch.device | str | None) -> nn.Module:
    """``quantize(linear)``; onto ``device`` a block of rows at a time.

    Every format here quantizes each output row on its own (INT8 and FP8 one scale a row,
    INT4 groups within a row), so quantizing row blocks and concatenating the codes and
    scales (``join(first_block, codes, scales, bias)``) gives the same module; the GPU then
    holds one block's float32 temporaries, not a layer's.
    """
    if device is None:
        return quantize(linear)
    rows = max(1, CHUNK_ELEMENTS // linear.in_features)
    parts = [quantize(_row_slice(linear, i, min(i + rows, linear.out_features), device))
             for i in range(0, linear.out_features, rows)]
    if len(parts) == 1:
        return parts[0]
    bias = None if linear.bias is None else linear.bias.detach().to(device)
    return join(parts[0], torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]), bias)


def quantize_model(model: nn.Module, method: str, group_size: int = DEFAULT_GROUP_SIZE, device: torch.device | str | None = None) -> int:
    """Replace each decoder projection of ``model`` by a quantized layer, in place.

    Args:
        model: a :class:`~servinglab.model.llama.LlamaForCausalLM` with its weights loaded
            (any device; the codes land where the weights are).
        method: ``"int8"`` (per output channel), ``"int4"`` (group-wise), both the
            implementation's ``QuantLinear``; or ``"fp8"`` (e4m3 per output channel, the
            project's :class:`~servinglab.model.fp8_linear.Fp8Linear`).
        group_size: INT4 group (32, 64 or 128); it must divide every projection's
            input width. Ignored for INT8.
        device: where the codes go (default: where each weight is). A CPU model
            quantized for a GPU moves a block of rows at a time, so the GPU never holds
            the unquantized projections (its peak memory is the quantized model's).

    Returns:
        How many linear layers were replaced (4 per decoder layer).

    Raises:
        ValueError: naming ``quantization`` or ``quantization_group_size``; nothing is
            changed when a group size does not fit (all layers are checked first).
    """
    check_method(method, group_size)
    targets = projection_linears(model)
    if method == "int4":
        bad = sorted({lin.in_features for _, _, lin in targets if lin.in_features % group_size})
        if bad:
            fits = [g for g in INT4_GROUP_SIZES if all(lin.in_features % g == 0 for _, _, lin in targets)]
            raise ValueError(
                f"quantization_group_size={group_size} must divide every projection's input width; "
                f"{bad} are not multiples of it (sizes that fit this model: {fits})"
            )
    if method == "fp8":  # the project's e4m3 layer, not a student part (servinglab.model.fp8_linear)
        from servinglab.model.fp8_linear import Fp8Linear

        quantize = Fp8Linear.from_linear
        join = lambda first, q, s, bias: Fp8Linear(first.in_features, q.shape[0], q, s, bias)  # noqa: E731
    else:
        quant_linear = impl.load_part("quantization").QuantLinear
        quantize = lambda lin: quant_linear.from_linear(lin, method, group_size)  # noqa: E731
        join = lambda first, q, s, bias: quant_linear(first.in_features, q.shape[0], first.method, first.group_size, q, s, bias)  # noqa: E731
    with torch.no_grad():
        for parent, name, linear in targets:
            setattr(parent, name, _quantize_linear(quantize, join, linear, device))
    return len(targets)


def _int8pack_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x @ (q * s).T`` through ``torch.ops.aten._weight_int8pack_mm`` (int8 codes, one scale a row)."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), layer.qweight, layer.scales.to(x.dtype))
    if layer.bias is not None:
        out = out + layer.bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def use_cpu_int8pack(model: nn.Module, dtype: torch.dtype) -> int:
    """On a CPU, run INT8 ``QuantLinear`` layers through PyTorch's ``_weight_int8pack_mm`` when ``dtype`` is bf16/fp16.

    The kernel multiplies int8 codes by bf16/fp16 activations without writing a
    dequantized weight. Measured on the project's 2-core AVX2 machine (busy, one run,
    SmolLM2-135M's gate_up and down shapes), against ``QuantLinear.forward``'s
    dequantize + ``F.linear``: bf16 5.8x / 3.8x / 6.2x faster (M = 1 gate_up, M = 32 gate_up,
    M = 1 down); float32 only 1.2x / 0.7x / 1.5x, and not bit-equal to the float32
    reference (it scales after the sum), so float32 keeps ``QuantLinear.forward``, which the
    exact tests compare with transformers. The instance's ``forward`` is replaced; the
    module, its buffers and its ``state_dict`` stay as they are.

    Returns:
        How many layers now use the kernel.
    """
    if dtype not in (torch.bfloat16, torch.float16):
        return 0
    count = 0
    for module in model.modules():
        if getattr(module, "method", None) == "int8" and hasattr(module, "qweight") and module.qweight.device.type == "cpu":
            module.forward = _int8pack_forward.__get__(module)  # bound to this instance only
            count += 1
    return count


@dataclass
class WeightBytes:
    """Bytes of a model's weights: quantized layers (codes + scales) and everything else."""

    quantized: int  # codes and scales of QuantLinear layers
    dense_linear: int  # projections still stored as floating-point nn.Linear weights
    other: int  # embeddings, norms, an untied LM head, biases

    @property
    def total(self) -> int:
        return self.quantized + self.dense_linear + self.other

    @property
    def linear(self) -> int:
        """The projections alone (what quantization acts on)."""
        return self.quantized + self.dense_linear


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def weight_bytes(model: nn.Module) -> WeightBytes:
    """Count the bytes of ``model``'s ``state_dict`` (persistent weights; shared tensors once), split by kind."""
    modules = dict(model.named_modules())
    seen: set[int] = set()
    quantized = dense = other = 0
    for key, tensor in model.state_dict(keep_vars=True).items():
        if tensor.is_meta or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        owner, _, name = key.rpartition(".")
        if name in ("qweight", "scales"):
            quantized += _nbytes(tensor)
        elif name == "weight" and isinstance(modules.get(owner), nn.Linear):
            dense += _nbytes(tensor)
        else:
            other += _nbytes(tensor)
    return WeightBytes(quantized, dense, other)


def dequantized_state_dict(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """``model``'s state dict with every quantized layer's ``qweight``/``scales`` replaced by
    its dequantized ``weight`` (the same names a plain model has): the weights the quantized
    model really computes with, for a float32 reference such as transformers."""
    modules = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        owner, _, name = key.rpartition(".")
        module = modules.get(owner)
        if name == "qweight" and hasattr(module, "dequantized_weight"):
            out[f"{owner}.weight"] = module.dequantized_weight(dtype).detach()
        elif name != "scales" or not hasattr(module, "dequantized_weight"):
            out[key] = tensor.detach().to(dtype) if tensor.is_floating_point() else tensor
    return out
