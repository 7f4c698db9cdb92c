"""torchao as the library reference for Part 8a: quantize the same weight with torchao and compare.

torchao 0.18's API (``torchao.quantization``)::

    quantize_(model, Int8WeightOnlyConfig())                 # per-row symmetric int8
    quantize_(model, Int4WeightOnlyConfig(group_size=128))   # group-wise int4, tinygemm layout

``quantize_`` swaps each ``nn.Linear``'s weight for a tensor subclass in place. What was
seen on a CPU-only machine (torch 2.13, torchao 0.18; :func:`torchao_int4_linear` reports
it at run time instead of assuming it):

* INT8 runs on the CPU. Its codes are torchao's own rounding of ``w / scale`` with the
  same per-row symmetric scale up to float rounding (its code range includes -128), so
  the dequantized weights agree with Part 8a's to one quantization step.
* INT4 does not run on a CPU: the default ``plain`` packing needs the separate ``mslk``
  kernel package, ``tile_packed_to_4d`` (tinygemm) needs CUDA and bfloat16, and
  ``plain_int32`` has no CPU path. With ``group_size=128`` and SmolLM2's in_features
  576 it quietly leaves the layer unquantized (576 is not a multiple of 128).
"""

from __future__ import annotations

import torch
from torch import nn


class TorchaoUnavailable(RuntimeError):
    """torchao cannot quantize this layer here; the message says why (measured, not assumed)."""


def _quantized_copy(weight: torch.Tensor, bias: torch.Tensor | None, config) -> nn.Linear:
    from torchao.quantization import quantize_

    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    holder = nn.Sequential(linear)
    quantize_(holder, config)
    if type(holder[0].weight) in (torch.Tensor, nn.Parameter):
        raise TorchaoUnavailable(
            f"torchao left the layer unquantized ({type(config).__name__}, in_features={in_features}): "
            "its filter skips shapes its kernels do not support"
        )
    return holder[0]


def torchao_int8_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` after ``quantize_(.., Int8WeightOnlyConfig())``."""
    from torchao.quantization import Int8WeightOnlyConfig

    return _quantized_copy(weight, bias, Int8WeightOnlyConfig())


def torchao_int4_linear(weight: torch.Tensor, group_size: int, bias: torch.Tensor | None = None) -> nn.Linear:
    """``quantize_(.., Int4WeightOnlyConfig(group_size))`` of ``weight``, on its device and dtype.

    Raises:
        TorchaoUnavailable: with torchao's own error, when its int4 kernels do not run
            here (on a CPU: every packing format, see the module docstring) or it left
            the layer unquantized.
    """
    from torchao.quantization import Int4WeightOnlyConfig

    try:
        # Forward once: some formats only fail when their kernel is first called.
        layer = _quantized_copy(weight, bias, Int4WeightOnlyConfig(group_size=group_size))
        layer(torch.zeros(1, weight.shape[1], dtype=weight.dtype, device=weight.device))
    except TorchaoUnavailable:
        raise
    except (ImportError, NotImplementedError, AssertionError, RuntimeError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TorchaoUnavailable(
            f"torchao Int4WeightOnlyConfig(group_size={group_size}) does not run for a {weight.dtype} "
            f"weight on {weight.device.type}: {type(exc).__name__}: {first_line}"
        ) from exc
    return layer


def torchao_dequantized(layer: nn.Linear) -> torch.Tensor:
    """The float weight a torchao-quantized layer stands for (``dequantize()`` of its weight subclass)."""
    weight = layer.weight
    if hasattr(weight, "dequantize"):
        return weight.dequantize().float()
    raise TypeError(f"{type(weight).__name__} has no dequantize(); is this a torchao-quantized layer?")
