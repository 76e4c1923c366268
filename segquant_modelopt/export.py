"""ONNX export of a ModelOpt-quantized SegQuant model with standard QuantizeLinear/DequantizeLinear.

Two modes (``segquant.backend.ONNX_MODES``):

- ``"tensorrt"`` (default): every activation Q/DQ is per tensor (a one-element scale, no axis), the form
  TensorRT's INT8/FP8 GEMM fusion takes. Per-segment scales reach the graph only as the ``folded``
  realisation's ``pre_quant_scale`` Mul before that Q/DQ (the scales are folded into the weight); weights keep
  per-channel Q/DQ on axis 0. A model with per-K input scales (``split_k`` with more than one segment) or
  DualScale is refused before exporting (``check_tensorrt``), and the written graph is checked (``qdq_axes``).
- ``"qdq"``: what the quantizers hold: per-segment scales as per-channel Q/DQ on the input's last axis
  (``split_k``), DualScale as two Q/DQ branches (x+ and x-) added before the MatMul. onnxruntime runs it;
  TensorRT is unlikely to fuse ``Add(DQ, DQ) -> MatMul`` or per-channel activation Q/DQ into an INT8 GEMM.

An activation shift (``LinearPlan.shift``) exports in both modes as a ``Sub`` of its constant (the centres ``c``,
or ``c / a`` after the folded realisation's ``pre_quant_scale`` Mul) before the input Q/DQ, and the Linear's bias
as ``b + W_hat c``: the Q/DQ still feeds the MatMul directly (``shift_in_bias``).

Exporter: TorchScript (``dynamo=False``) in both modes. ModelOpt 0.47 emits Q/DQ only through the TorchScript
``symbolic`` of its ``FakeTensorQuantFunction``; it has no ``torch.export``/dynamo ONNX path for that fake
quantization (tried with torch 2.13, onnxscript 0.7.2 on a tiny folded FLUX):

- ``torch.onnx.export(..., dynamo=True)`` on CPU fails in step 1 (``torch.export``):
  ``GuardOnDataDependentSymNode: Could not guard on data-dependent expression Eq(u0, 1)``, raised by
  ``if min_amax < 0:`` in ``modelopt.torch.quantization.tensor_quant._tensor_quant``;
- on CUDA tensors the quantizer calls the custom op ``tensorrt::quantize_op``, which ``torch.export`` keeps but
  the ONNX translation cannot lower (step 3): ``DispatchError: No ONNX function found for
  <OpOverload(op='tensorrt.quantize_op', overload='default')>`` (the op called directly, on CPU).

Even where it traced, it would be a fake-quant subgraph, not QuantizeLinear/DequantizeLinear.

Example:
    >>> export_onnx(quantized, example_kwargs, "flux.onnx")              # TensorRT: per-tensor activations
    >>> qdq_axes("flux.onnx")["activation_per_axis"]
    {'QuantizeLinear': 0, 'DequantizeLinear': 0}
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn
from modelopt.torch.quantization.nn import TensorQuantizer

from segquant import SegQuantError
from segquant.backend import DEFAULT_ONNX_MODE, ONNX_MODES
from segquant.options import check_choice

from .quantizer import is_marked

OPSET = 17
SHOWN = 3
"""Layers a refusal names (then a count)."""
_QDQ = ("QuantizeLinear", "DequantizeLinear")


def _rms_norm_symbolic(g: Any, x: Any, normalized_shape: Any, weight: Any, eps: Any) -> Any:
    """aten::rms_norm (diffusers' attention qk-norm), which the TorchScript exporter lacks."""
    from torch.onnx import symbolic_helper as sh

    dims = sh._get_const(normalized_shape, "is", "normalized_shape")
    eps_value = 1e-6 if sh._is_none(eps) else sh._get_const(eps, "f", "eps")
    squared = g.op("Mul", x, x)
    mean = g.op("ReduceMean", squared, axes_i=list(range(-len(dims), 0)), keepdims_i=1)
    denominator = g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(eps_value))))
    out = g.op("Div", x, denominator)
    return out if sh._is_none(weight) else g.op("Mul", out, weight)


class _KeywordModule(nn.Module):
    """Positional-tensor front for a model called with keyword arguments (ONNX inputs are positional)."""

    def __init__(self, model: nn.Module, names: list[str], constants: dict[str, Any]) -> None:
        super().__init__()
        self.model, self.names, self.constants = model, names, constants

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        out = self.model(**dict(zip(self.names, tensors)), **self.constants)
        return out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)


def tensorrt_blockers(model: nn.Module) -> dict[str, str]:
    """Layers whose enabled input quantizer is not one per-tensor scale, with why: ``"<n> per-K input scales"``
    (a ``split_k`` layer with segments) and/or ``"DualScale"``."""
    found = {}
    for name, module in model.named_modules():
        quantizer = getattr(module, "input_quantizer", None)
        if not isinstance(quantizer, TensorQuantizer) or not quantizer.is_enabled:
            continue
        why = []
        if quantizer.amax is not None and quantizer.amax.numel() > 1:
            why.append(f"{quantizer.amax.numel()} per-K input scales")
        if getattr(quantizer, "dual_scale", False):
            why.append("DualScale")
        if why:
            found[name] = " and ".join(why)
    return found


def check_tensorrt(model: nn.Module) -> None:
    """Refuse a model that ``mode="tensorrt"`` cannot export with per-tensor activation Q/DQ.

    Raises:
        SegQuantError: naming the first ``SHOWN`` such layers, their number and the fix.
    """
    found = tensorrt_blockers(model)
    if found:
        shown = ", ".join(f"{name} ({why})" for name, why in list(found.items())[:SHOWN])
        more = f" and {len(found) - SHOWN} more" if len(found) > SHOWN else ""
        raise SegQuantError(
            f"ONNX mode tensorrt needs one per-tensor activation scale per layer; {len(found)} layers of "
            f"{type(model).__name__} have per-K input scales or DualScale: {shown}{more}; quantize with "
            "realisation='folded' and dual_scale=False (segquant quantize --onnx does), or export with "
            "mode='qdq' (per-channel activation Q/DQ and DualScale branches, which TensorRT is unlikely to fuse "
            "into INT8 GEMMs)")


def _shifted_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Linear layers whose enabled SegQuant input quantizer shifts its input."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and is_marked(getattr(m, "input_quantizer", None))
            and m.input_quantizer.is_enabled and m.input_quantizer.shift_offset() is not None}


def _shifted_bias(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o, b + W_hat o)`` (``segquant.numerics.shift_bias``): ``o`` the shift as the GEMM's input carries it
    (``SegmentTensorQuantizer.shift_offset``), ``W_hat`` the weight as the fake-quant model's GEMM uses it."""
    from segquant.numerics import shift_bias

    with torch.no_grad():
        weight = module.weight_quantizer(module.weight)  # outside the export: the reference fake quantization
        offset = module.input_quantizer.shift_offset()
        bias = shift_bias(weight, module.bias, offset).to(module.weight.dtype)
    return offset.to(module.weight.dtype), bias


@contextlib.contextmanager
def shift_in_bias(model: nn.Module):
    """While exporting: each shifted layer's bias is ``b + W_hat o`` and its input quantizer subtracts the constant
    ``o`` before the Q/DQ without adding it back after (an ``Add`` between the DQ and the MatMul would keep
    TensorRT from fusing them into a quantized GEMM)."""
    layers = _shifted_linears(model)
    shifts = {name: _shifted_bias(m) for name, m in layers.items()}
    saved = {name: m._parameters["bias"] for name, m in layers.items()}
    try:
        for name, module in layers.items():
            offset, bias = shifts[name]
            module._parameters["bias"] = nn.Parameter(bias, requires_grad=False)
            module.input_quantizer._segquant_offset_in_bias = offset
        yield
    finally:
        for name, module in layers.items():
            module._parameters["bias"] = saved[name]
            module.input_quantizer.__dict__.pop("_segquant_offset_in_bias", None)


def _first_line(error: BaseException) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), "no message")


@contextlib.contextmanager
def _ir_log_off():
    """No TorchScript IR on stdout: on a failure the exporter logs the whole graph (thousands of lines for a
    FLUX) through ``torch._C._jit_onnx_log``, and its log switch is always on (torch's ``setup_onnx_logging``
    tests the function ``_jit_is_onnx_log_enabled`` instead of calling it)."""
    log = getattr(torch._C, "_jit_onnx_log", None)
    if log is None:
        yield
        return
    torch._C._jit_onnx_log = lambda *args: None
    try:
        yield
    finally:
        torch._C._jit_onnx_log = log


def _torchscript_export(module: nn.Module, args: tuple, path: Path, opset: int, names: list[str]) -> None:
    """``torch.onnx.export(dynamo=False)`` without its TracerWarnings, deprecation notices (the choice is
    deliberate: see the module docstring) or IR log; a failure is one line (the exporter's first line; its
    exception stays in ``__context__``)."""
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm_symbolic, opset)
    try:
        with torch.no_grad(), warnings.catch_warnings(), _ir_log_off():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export",
                                    DeprecationWarning)
            warnings.filterwarnings("ignore", "The feature will be removed", DeprecationWarning)
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, input_names=names,
                              output_names=["output"])
    except Exception as e:  # noqa: BLE001 - surface the exporter's reason with what was exported
        name = type(module.model).__name__ if isinstance(module, _KeywordModule) else type(module).__name__
        raise SegQuantError(f"ONNX export of {name} failed: {type(e).__name__}: {_first_line(e)}") from None


def export_onnx(model: nn.Module, example_kwargs: dict[str, Any], path: str | Path, opset: int = OPSET,
                mode: str = DEFAULT_ONNX_MODE) -> Path:
    """Export a (fake-)quantized model called as ``model(**example_kwargs)`` to ONNX.

    Tensor keyword arguments become ONNX inputs (same names); the others are baked in.

    Args:
        mode: ``"tensorrt"`` (per-tensor activation Q/DQ only) or ``"qdq"`` (see the module docstring).
    Raises:
        SegQuantError: an unknown mode, no example input is a tensor, a model ``mode="tensorrt"`` cannot
            export (``check_tensorrt``), or the export fails (one line: the exporter's reason).
    """
    check_choice(mode, ONNX_MODES, "ONNX export mode")
    names = [k for k, v in example_kwargs.items() if isinstance(v, torch.Tensor)]
    if not names:
        raise SegQuantError("export_onnx needs at least one tensor among the example inputs")
    if mode == "tensorrt":
        check_tensorrt(model)
    constants = {k: v for k, v in example_kwargs.items() if k not in names}
    path = Path(path)
    with shift_in_bias(model):
        _torchscript_export(_KeywordModule(model, names, constants), tuple(example_kwargs[n] for n in names), path,
                            opset, names)
    if mode == "tensorrt":
        per_axis = sum(qdq_axes(path)["activation_per_axis"].values())
        if per_axis:
            raise SegQuantError(f"{path}: {per_axis} activation Q/DQ nodes are per axis although every input "
                                "quantizer is per tensor; export with mode='qdq', or report this with the model")
    return path


def qdq_counts(path: str | Path) -> dict[str, int]:
    """Numbers of QuantizeLinear and DequantizeLinear nodes in an ONNX file."""
    import onnx

    ops = Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)
    return {op: ops[op] for op in _QDQ}


def _constant_size(node: Any) -> int | None:
    """Number of elements of a Constant node's value."""
    for attribute in node.attribute:
        if attribute.name == "value":
            return math.prod(attribute.t.dims)
        if attribute.name in ("value_float", "value_int"):
            return 1
        if attribute.name in ("value_floats", "value_ints"):
            return len(attribute.floats or attribute.ints)
    return None


def qdq_axes(path: str | Path) -> dict[str, dict[str, int]]:
    """Q/DQ nodes of an ONNX file by what they quantize and how.

    A node quantizes a weight when its input is computed from constants only (an initializer, a Constant, or
    the integer initializer of a constant-folded weight feeding a DequantizeLinear), else an activation. It is
    per tensor when its scale has one element, per axis otherwise (or when the file does not state the scale's
    size: a scale computed at run time).

    Returns:
        ``{"activation_per_tensor", "activation_per_axis", "weight_per_tensor", "weight_per_axis"}``, each
        ``{"QuantizeLinear": n, "DequantizeLinear": n}``.
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    constant = {t.name for t in graph.initializer}
    sizes: dict[str, int | None] = {t.name: math.prod(t.dims) for t in graph.initializer}
    for node in graph.node:  # ONNX graphs are topologically sorted
        if node.op_type == "Constant":
            sizes[node.output[0]] = _constant_size(node)
        elif node.op_type in ("Identity", "Cast") and node.input[0] in sizes:
            sizes[node.output[0]] = sizes[node.input[0]]
        if all(name in constant for name in node.input if name):  # "" is an omitted optional input
            constant.update(node.output)
    counts = {f"{role}_{granularity}": dict.fromkeys(_QDQ, 0)
              for role in ("activation", "weight") for granularity in ("per_tensor", "per_axis")}
    for node in graph.node:
        if node.op_type in _QDQ:
            role = "weight" if node.input[0] in constant else "activation"
            granularity = "per_tensor" if sizes.get(node.input[1]) == 1 else "per_axis"
            counts[f"{role}_{granularity}"][node.op_type] += 1
    return counts
