"""GPTQ on a whole model: calibration Hessians, in the GPTQ reference's order, and the quantized model.

The student's Part 8c (``gptq_quantize_int4(weight, hessian, group_size, damp)``) quantizes
one projection given its Hessian. This module decides *which* inputs each Hessian comes
from and the column order, as the GPTQ reference does (Frantar et al., ICLR 2023;
github.com/IST-DASLab/gptq, ``llama.py``):

* **layer by layer, through what is already quantized** (:func:`sequential_hessians`):
  each calibration batch's hidden state at the input of layer ``l`` is cached and only
  layer ``l`` runs on it (the reference's ``inps`` / ``outs``), so the walk costs a few
  runs of each layer instead of a forward from the embeddings per layer;
* **true-sequential inside a layer** (the reference's ``--true-sequential``): q/k/v first,
  then o_proj on inputs through the quantized q/k/v, gate/up on inputs through the
  quantized attention, down_proj on inputs through the quantized gate/up;
* **act-order** (the reference's ``--act-order``, :func:`gptq_int4`): columns with the
  largest Hessian diagonal (the input channels with the most energy) are quantized first,
  while many columns are still free to absorb their error. Part 8a's format has one scale
  per *contiguous* group, so here whole groups are ordered (by their summed diagonal) and
  columns inside each group; codes and scales are put back in place afterwards.

Every Hessian goes through :func:`_add_hessian`, so the walk's Hessians equal those of a
full-forward hook pass (:func:`collect_hessians`) on the same partly quantized model,
bitwise (tested on the tiny model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from servinglab import impl
from servinglab.model.quant import projection_linears

if TYPE_CHECKING:
    from servinglab.model.onnx_export import DenseKVDecoder

# Inside a decoder layer, the order in which the GPTQ reference (``--true-sequential``)
# quantizes the projections: each one's inputs go through the ones before it, quantized.
# Ours are fused as in vLLM: q/k/v is one qkv_proj, gate/up one gate_up_proj.
SEQUENTIAL_ORDER = (("self_attn", "qkv_proj"), ("self_attn", "o_proj"), ("mlp", "gate_up_proj"), ("mlp", "down_proj"))

Replace = Callable[[nn.Module, str, nn.Linear, torch.Tensor], None]


def scorer(model: nn.Module) -> DenseKVDecoder:
    """The float32 forward every pass here runs: plain causal attention over the model's own modules."""
    from servinglab.model.onnx_export import DenseKVDecoder

    return DenseKVDecoder(model, with_past=False)


class _StopForward(Exception):
    """Raised by a hook once the module being calibrated has run: the rest of the forward is not needed."""


def _run_each(run: Callable[[torch.Tensor], object], inputs: Iterable[torch.Tensor], handles: list[RemovableHandle]) -> None:
    """``run(x)`` for each input (a hook's ``_StopForward`` ends only that run); then removes the hooks' ``handles``."""
    try:
        for x in inputs:
            try:
                run(x)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()


def _add_hessian(sums: dict[nn.Module, torch.Tensor], counts: dict[nn.Module, int], module: nn.Module, x: torch.Tensor) -> None:
    """Adds one batch of ``module``'s inputs to its running Hessian sum (normalised once, at the end).

    Every Hessian is summed here, so that one taken in a full forward and one taken on
    cached layer inputs add the same numbers in the same order (bitwise equal).
    """
    gptq = impl.load_part("gptq")
    x = x.reshape(-1, x.shape[-1])
    sums[module] = sums.get(module, 0) + gptq.hessian_from_inputs(x) * x.shape[0]
    counts[module] = counts.get(module, 0) + x.shape[0]


@torch.inference_mode()
def collect_hessians(model: nn.Module, windows: torch.Tensor, batch: int = 2, linears: list[nn.Module] | None = None,
                     stop_after: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """``2 X^T X / n`` of the inputs of ``linears`` (default: every projection) over ``windows``, keyed by module path.

    One full forward per batch of ``batch`` windows: the one-pass Hessians, and the
    reference :func:`sequential_hessians` is tested against. ``stop_after``: a module after
    whose forward each pass stops.
    """
    sums: dict[nn.Module, torch.Tensor] = {}
    counts: dict[nn.Module, int] = {}

    def stop(*_: object) -> None:
        raise _StopForward

    targets = linears if linears is not None else [lin for _, _, lin in projection_linears(model)]
    handles = [lin.register_forward_hook(lambda m, args, _out: _add_hessian(sums, counts, m, args[0])) for lin in targets]
    if stop_after is not None:  # after the Hessian hooks: they run first
        handles.append(stop_after.register_forward_hook(stop))
    _run_each(scorer(model), windows.split(batch), handles)
    names = {m: n for n, m in model.named_modules()}
    return {names[m]: sums[m] / counts[m] for m in sums}


def gptq_int4(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, damp: float | None = None,
              act_order: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's ``gptq_quantize_int4``, with act-order kept inside Part 8a's groups; same ``(packed, scales)``.

    ``act_order``: groups by falling sum of ``diag(H)``, columns in each group likewise
    (stable sort: ties keep their order). A group stays contiguous in that order, so the
    student's code takes its scale when it reaches the group, over exactly the group's
    columns. ``damp=None`` keeps the student's default (1% of the mean diagonal, the paper's).
    """
    gptq, quant = impl.load_part("gptq"), impl.load_part("quantization")
    extra = {} if damp is None else {"damp": damp}
    fits = weight.dim() == 2 and tuple(hessian.shape) == (weight.shape[1],) * 2 and weight.shape[1] % group_size == 0
    if not act_order or not fits:  # shapes that do not fit: the student's checks say what is wrong
        return gptq.gptq_quantize_int4(weight, hessian, group_size, **extra)
    diag = torch.diagonal(hessian).reshape(-1, group_size)  # [groups, group_size]
    groups = torch.argsort(diag.sum(1), descending=True, stable=True)
    within = torch.argsort(diag, dim=1, descending=True, stable=True)
    perm = (groups[:, None] * group_size + within[groups]).reshape(-1)  # column perm[j] is quantized j-th
    packed, scales = gptq.gptq_quantize_int4(weight[:, perm], hessian[perm][:, perm], group_size, **extra)
    codes = torch.empty_like(quant.unpack_int4(packed))
    codes[:, perm] = quant.unpack_int4(packed)
    in_place = torch.empty_like(scales)
    in_place[:, groups] = scales  # the j-th group quantized is group groups[j]
    return quant.pack_int4(codes), in_place


def gptq_replace(group_size: int, damp: float | None = None, act_order: bool = True) -> Replace:
    """``replace(parent, name, linear, hessian)``: sets ``parent.name`` to the GPTQ INT4 ``QuantLinear`` of ``linear``."""
    quant = impl.load_part("quantization")

    def replace(parent: nn.Module, name: str, linear: nn.Linear, hessian: torch.Tensor) -> None:
        packed, scales = gptq_int4(linear.weight, hessian, group_size, damp, act_order)
        setattr(parent, name, quant.QuantLinear(linear.in_features, linear.out_features, "int4", group_size, packed, scales, linear.bias))

    return replace


def gptq_model(load: Callable[[], nn.Module], hessians: dict[str, torch.Tensor], group_size: int, act_order: bool = True) -> nn.Module:
    """A fresh model from ``load()`` whose projections are GPTQ INT4 ``QuantLinear`` layers (Part 8a format).

    ``hessians`` is keyed by the projection's module path (:func:`collect_hessians`).
    """
    model = load()
    replace = gptq_replace(group_size, act_order=act_order)
    names = {id(m): n for n, m in model.named_modules()}
    for parent, name, linear in projection_linears(model):
        replace(parent, name, linear, hessians[f"{names[id(parent)]}.{name}"])
    return model


def _run_layer(decoder: DenseKVDecoder, layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``layer``'s output on the hidden state ``x`` ``[B, T, hidden]``: the full forward's own layer step, no past."""
    return decoder.layer_forward(layer, x, cos, sin)[0]


@torch.inference_mode()
def _first_layer_inputs(model: nn.Module, windows: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """Per batch of ``windows``, the hidden state a full forward feeds layer 0 (caught by a hook: no re-implementation)."""
    inputs: list[torch.Tensor] = []

    def catch(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        inputs.append(args[0].clone())
        raise _StopForward

    _run_each(scorer(model), windows.split(batch), [model.model.layers[0].input_layernorm.register_forward_pre_hook(catch)])
    return inputs


@torch.inference_mode()
def _layer_hessian(decoder: DenseKVDecoder, layer: nn.Module, linear: nn.Module, hidden: list[torch.Tensor], cos: torch.Tensor,
                   sin: torch.Tensor) -> torch.Tensor:
    """``linear``'s Hessian over ``layer`` run on each cached hidden state; each run stops right after ``linear``."""
    sums: dict[nn.Module, torch.Tensor] = {}
    counts: dict[nn.Module, int] = {}

    def catch(m: nn.Module, args: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        _add_hessian(sums, counts, m, args[0])
        raise _StopForward  # the rest of the layer does not matter to this Hessian

    _run_each(lambda x: _run_layer(decoder, layer, x, cos, sin), hidden, [linear.register_forward_hook(catch)])
    return sums[linear] / counts[linear]


def sequential_hessians(model: nn.Module, windows: torch.Tensor, replace: Replace | None = None, batch: int = 2) -> dict[str, torch.Tensor]:
    """Every projection's Hessian, one decoder layer and one projection at a time; ``replace`` quantizes as it goes.

    Projections follow :data:`SEQUENTIAL_ORDER` inside each layer; once one's Hessian is
    taken, ``replace(parent, name, linear, hessian)`` (if given) swaps it for its quantized
    form, so the inputs of the next projection, and of the next layer, went through
    everything quantized before them. Without ``replace`` this equals
    :func:`collect_hessians` of the whole model (tested).
    """
    hidden = _first_layer_inputs(model, windows, batch)
    decoder = scorer(model)
    names = {id(m): n for n, m in model.named_modules()}
    with torch.inference_mode():  # the full forward's rotary tables: positions 0 .. T - 1, no past
        cos, sin = model.rotary_emb.cos_sin(torch.arange(windows.shape[1], device=windows.device), hidden[0].dtype)
    hessians: dict[str, torch.Tensor] = {}
    for layer in model.model.layers:
        steps = [(getattr(layer, part), name) for part, name in SEQUENTIAL_ORDER]
        if {id(getattr(p, n)) for p, n in steps} != {id(lin) for _, _, lin in projection_linears(layer)}:
            raise ValueError(f"a decoder layer's plain nn.Linear projections must be exactly {SEQUENTIAL_ORDER}")
        for parent, name in steps:
            linear = getattr(parent, name)
            hessians[f"{names[id(parent)]}.{name}"] = h = _layer_hessian(decoder, layer, linear, hidden, cos, sin)
            if replace is not None:
                replace(parent, name, linear, h)
        with torch.inference_mode():  # the next layer's inputs, through this layer as it now is
            hidden = [_run_layer(decoder, layer, x, cos, sin) for x in hidden]
    return hessians


def gptq_model_sequential(load: Callable[[], nn.Module], calib: torch.Tensor, group_size: int, damp: float | None = None,
                          act_order: bool = True) -> nn.Module:
    """A fresh model from ``load()`` quantized by GPTQ as the reference does: true-sequential, act-order.

    Layer ``l``'s Hessians come from calibration inputs that went through layers
    ``0 .. l - 1`` already quantized, and inside the layer from inputs through the
    projections quantized before (see :data:`SEQUENTIAL_ORDER`), so each projection is
    calibrated on the inputs it will see in the quantized model.
    """
    model = load()
    sequential_hessians(model, calib, gptq_replace(group_size, damp, act_order))
    return model
