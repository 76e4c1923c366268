"""``SegmentTensorQuantizer``: ModelOpt's ``TensorQuantizer`` with SegQuant's DualScale.

Per-segment scales need no new machinery: they are a per-K ``amax`` (``axis=-1``) on the standard
input quantizer (exact form) or a ``pre_quant_scale`` with the scales folded into the weight (folded
form). DualScale adds a negative-side amax: the quantizer splits its input into ``x+`` and ``x-`` on
the DualScale columns and fake-quantizes each with its own amax, which exports to ONNX as two
QuantizeLinear/DequantizeLinear branches feeding the same (weight-quantized) MatMul.

The negative amax and the column mask are buffers of the quantizer and a ``SegQuantFlag`` is one of
its properties, so ``mto.save``/``mto.restore`` carry them. Restore re-creates a plain
``TensorQuantizer`` and sets its properties; setting the flag turns it back into this class (as
ModelOpt promotes its own static NVFP4 quantizers). Without ``import segquant_modelopt`` the checkpoint
does not load at all (``torch.load(weights_only=True)`` rejects the unknown flag class), so a SegQuant
model is never silently restored without its DualScale.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from modelopt.torch.quantization.nn import TensorQuantizer

from segquant.numerics import INT8


class SegQuantFlag:
    """The value of a quantizer's ``_segquant`` property: marks it as a ``SegmentTensorQuantizer``."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SegQuantFlag)

    def __hash__(self) -> int:
        return hash(SegQuantFlag)

    def __repr__(self) -> str:
        return "SegQuantFlag()"


class _PromoteOnSet:
    """``TensorQuantizer._segquant``: storing a ``SegQuantFlag`` promotes the quantizer's class."""

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        return self if obj is None else obj.__dict__.get("_segquant")

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__["_segquant"] = value
        if isinstance(value, SegQuantFlag) and type(obj) is TensorQuantizer:
            obj.__class__ = SegmentTensorQuantizer


torch.serialization.add_safe_globals([SegQuantFlag])


class SegmentTensorQuantizer(TensorQuantizer):
    """An input quantizer with per-segment amax and, on DualScale columns, a separate negative amax.

    Buffers (set by the ``segquant`` calibration algorithm):
        _amax: per-tensor or per-K amax of the positive side (whole input on non-DualScale columns).
        _segquant_neg_amax: amax of the negative side on DualScale columns (per-tensor or per-K).
        _segquant_dual_mask: ``(K,)`` bool, True on DualScale columns.
    """

    @property
    def dual_scale(self) -> bool:
        return "_segquant_dual_mask" in self._buffers

    def set_dynamic_segments(self, segments: list[int], dual_segments: list[int]) -> None:
        """Per-token dynamic scales, one per input segment (two on DualScale segments); INT8 only."""
        self._segquant_segments = [int(s) for s in segments]
        self._segquant_dual_segments = [int(i) for i in dual_segments]

    def _dynamic_forward(self, x: Tensor) -> Tensor:
        from modelopt.torch.quantization.tensor_quant import fake_tensor_quant

        def quant(part: Tensor, amax: Tensor) -> Tensor:
            return fake_tensor_quant(part, amax, None, 8, False, self._narrow_range)

        out = []
        for i, part in enumerate(x.split(self._segquant_segments, dim=-1)):
            if i in self._segquant_dual_segments:
                pos, neg = part.clamp(min=0), part.clamp(max=0)
                # ModelOpt's scale is amax / qmax; the negative side's is amax(|x-|) / |qmin|
                out.append(quant(pos, pos.abs().amax(-1, keepdim=True).float()) +
                           quant(neg, neg.abs().amax(-1, keepdim=True).float() * (INT8.qmax / -INT8.qmin)))
            else:
                out.append(quant(part, part.abs().amax(-1, keepdim=True).float()))
        return torch.cat(out, dim=-1)

    def set_dual_scale(self, neg_amax: Tensor, dual_mask: Tensor) -> None:
        for name, value in (("_segquant_neg_amax", neg_amax), ("_segquant_dual_mask", dual_mask)):
            if name in self._buffers:
                del self._buffers[name]
            self.register_buffer(name, value.detach().clone())

    def forward(self, inputs: Tensor) -> Tensor:
        if getattr(self, "_segquant_segments", None) is not None and not self._disabled and inputs.numel():
            x = inputs if self.pre_quant_scale is None else inputs * self.pre_quant_scale
            return self._dynamic_forward(x)
        if not self.dual_scale or self._disabled or not self._if_quant or inputs.numel() == 0:
            return super().forward(inputs)
        x = inputs
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale  # positive per-channel scales commute with the sign split
        mask = self._segquant_dual_mask
        positive = torch.where(mask, x.clamp(min=0), x)
        negative = torch.where(mask, x.clamp(max=0), torch.zeros_like(x))
        with self.disable_pre_quant_scale():
            out = super().forward(positive)
            amax = self._buffers["_amax"]
            self._buffers["_amax"] = self._segquant_neg_amax
            try:
                out = out + super().forward(negative)
            finally:
                self._buffers["_amax"] = amax
        return out


def mark(quantizer: TensorQuantizer) -> SegmentTensorQuantizer:
    """Make ``quantizer`` a ``SegmentTensorQuantizer`` whose state says so (survives save/restore)."""
    quantizer._segquant = SegQuantFlag()
    if type(quantizer) is not SegmentTensorQuantizer:
        quantizer.__class__ = SegmentTensorQuantizer
    return quantizer


def is_marked(quantizer: nn.Module) -> bool:
    return isinstance(quantizer, TensorQuantizer) and isinstance(getattr(quantizer, "_segquant", None), SegQuantFlag)


TensorQuantizer._segquant = _PromoteOnSet()
