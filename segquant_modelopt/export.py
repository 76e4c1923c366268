"""ONNX export of a ModelOpt-quantized SegQuant model with standard QuantizeLinear/DequantizeLinear.

Per-segment scales export as per-channel Q/DQ on the input's last axis (``split_k``) or as a Mul by
``pre_quant_scale`` before a per-tensor Q/DQ (``folded``); DualScale as two Q/DQ branches (x+ and x-)
added before the Linear, whose weight has its own Q/DQ.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segquant import SegQuantError

OPSET = 17


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


def export_onnx(model: nn.Module, example_kwargs: dict[str, Any], path: str | Path, opset: int = OPSET) -> Path:
    """Export a (fake-)quantized model called as ``model(**example_kwargs)`` to ONNX.

    Tensor keyword arguments become ONNX inputs (same names); the others are baked in.

    Raises:
        SegQuantError: if no example input is a tensor or the export fails.
    """
    names = [k for k, v in example_kwargs.items() if isinstance(v, torch.Tensor)]
    if not names:
        raise SegQuantError("export_onnx needs at least one tensor among the example inputs")
    constants = {k: v for k, v in example_kwargs.items() if k not in names}
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm_symbolic, opset)
    path = Path(path)
    try:
        with torch.no_grad():
            torch.onnx.export(_KeywordModule(model, names, constants), tuple(example_kwargs[n] for n in names),
                              str(path), dynamo=False, opset_version=opset, input_names=names,
                              output_names=["output"])
    except Exception as e:  # noqa: BLE001 - surface the exporter's reason with what was exported
        raise SegQuantError(f"ONNX export of {type(model).__name__} failed: {type(e).__name__}: {e}") from e
    return path


def qdq_counts(path: str | Path) -> dict[str, int]:
    """Numbers of QuantizeLinear and DequantizeLinear nodes in an ONNX file."""
    import onnx

    ops = Counter(node.op_type for node in onnx.load(str(path)).graph.node)
    return {"QuantizeLinear": ops["QuantizeLinear"], "DequantizeLinear": ops["DequantizeLinear"]}
