"""``SegmentTensorQuantizer``: ModelOpt's ``TensorQuantizer`` with SegQuant's DualScale.

Per-segment scales need no new machinery: they are a per-K ``amax`` (``axis=-1``) on the standard
input quantizer (exact form) or a ``pre_quant_scale`` with the scales folded into the weight (folded
form). DualScale adds a negative-side amax: the quantizer splits its input into ``x+`` and ``x-`` on
the DualScale columns and fake-quantizes each with its own amax, which exports to ONNX as two
QuantizeLinear/DequantizeLinear branches feeding the same (weight-quantized) MatMul.

An activation shift (``LinearPlan.shift``) is a buffer ``_segquant_center`` (the calibrated centres ``c`` of the
smoothed input): the PyTorch fake quantization feeds ``Q(x - c) + c`` to the GEMM (the oracle's ``W_hat Q(x - c)
+ W_hat c``), the ONNX export a ``Sub`` of ``c`` before the input Q/DQ with ``W_hat c`` in the Linear's bias
(``segquant_modelopt.export``).

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

from segquant.numerics import ActivationStats, QuantFormat, fake_quant, fake_quant_input, \
    folded_center, get_format, scale_from_amax

from .segment_smoothing import tiles_forward


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


def format_of(quantizer: TensorQuantizer) -> QuantFormat | None:
    """The ``segquant.numerics`` format of a quantizer's ``num_bits`` (INT8/6/4, FP8 e4m3), or None."""
    bits = quantizer.num_bits
    if isinstance(bits, (list, tuple)):
        return get_format("fp8") if tuple(bits) == (4, 3) else None
    return {8: get_format("int8"), 6: get_format("int6"), 4: get_format("int4")}.get(bits)


class SegmentTensorQuantizer(TensorQuantizer):
    """A ModelOpt quantizer whose PyTorch fake quantization is ``segquant.numerics`` itself.

    ModelOpt rounds ``x * (qmax / amax)``; the reference (like ONNX QuantizeLinear) rounds ``x / scale``.
    To give exactly the reference's numbers, a SegQuant quantizer fake-quantizes through
    ``segquant.numerics`` (per segment, DualScale, per token) and keeps ModelOpt's own buffers (``_amax``,
    ``_pre_quant_scale``, ``_segquant_neg_amax``, ``_segquant_dual_mask``) for calibration plumbing and for
    ONNX export, where it emits standard QuantizeLinear/DequantizeLinear pairs.

    Roles (properties, saved with the model): ``_segquant_role`` is ``"weight"`` (per-row amax),
    ``"input"`` (static per-segment ranges in ``_segquant_seg_amax/_pos/_neg``, optional
    ``_segquant_smooth``, ``_segquant_folded``) or ``"dynamic"`` (per-token scales per segment).
    """

    @property
    def dual_scale(self) -> bool:
        return "_segquant_dual_mask" in self._buffers

    @property
    def segquant_format(self) -> QuantFormat:
        fmt = format_of(self)
        if fmt is None:
            raise ValueError(f"SegQuant has no reference format for num_bits={self.num_bits}")
        return fmt

    def _set_buffer(self, name: str, value: Tensor | None) -> None:
        if name in self._buffers:
            del self._buffers[name]
        if value is not None:
            self.register_buffer(name, value.detach().clone())

    def set_weight_role(self, out_segments: list[int], per_channel: bool) -> None:
        """Per-row amax (``axis=0``) that is one value per output row (``per_channel``) or one per output
        segment repeated over its rows (per tensor, as the plan's precision says)."""
        self._segquant_role = "weight"
        self._segquant_out_segments = [int(x) for x in out_segments]
        self._segquant_weight_granularity = "per_channel" if per_channel else "per_tensor"

    def set_input_role(self, segments: list[int], dual_segments: list[int], stats: ActivationStats | None,
                       smooth: Tensor | None, folded: bool, dynamic: bool | None = None) -> None:
        """Static (``stats`` per segment, of the smoothed input) or dynamic (``stats`` None, or ``dynamic``: per-token
        scales; the stats then only carry the calibrated shift centres) input scales. ``stats.center`` (the
        activation shift) is kept as the buffer ``_segquant_center``."""
        self._segquant_role = "dynamic" if (stats is None if dynamic is None else dynamic) else "input"
        self._segquant_segments = [int(x) for x in segments]
        self._segquant_dual_segments = [int(i) for i in dual_segments]
        self._segquant_folded = bool(folded)
        for name, value in (("_segquant_seg_amax", None if stats is None else stats.amax),
                            ("_segquant_seg_pos", None if stats is None else stats.pos_amax),
                            ("_segquant_seg_neg", None if stats is None else stats.neg_amax),
                            ("_segquant_smooth", smooth),
                            ("_segquant_center", None if stats is None else stats.center)):
            self._set_buffer(name, value)

    def set_shift(self, shift: str | None, shift_segments: list[int]) -> None:
        """The plan's activation shift (``per_tensor``/``per_channel`` and its input segments), kept as properties
        so that checkpoints describe it; the centres themselves come with the stats (``set_input_role``)."""
        self._segquant_shift = shift
        self._segquant_shift_segments = [int(i) for i in shift_segments] if shift is not None else []

    @property
    def shift_center(self) -> Tensor | None:
        """The ``(K,)`` activation-shift centres ``c`` (of the smoothed input; zero on unshifted channels), or None."""
        return self._buffers.get("_segquant_center")

    def segquant_stats(self) -> ActivationStats | None:
        """The calibrated ranges and shift centres this quantizer quantizes with (None: dynamic, unshifted)."""
        if "_segquant_seg_amax" not in self._buffers:
            return None
        return ActivationStats(self._segquant_seg_amax, self._segquant_seg_pos, self._segquant_seg_neg,
                               self.shift_center)

    def shift_offset(self) -> Tensor | None:
        """What the quantizer subtracts after its ``pre_quant_scale`` (``shift_offset``); None without a shift."""
        stats = self.segquant_stats()
        if stats is None or stats.center is None:
            return None
        return shift_offset(stats, self._segquant_segments, self._segquant_dual_segments, self.segquant_format,
                            self._segquant_folded)

    def set_dual_scale(self, neg_amax: Tensor, dual_mask: Tensor) -> None:
        """ModelOpt-side DualScale state, used by the ONNX export (two Q/DQ branches)."""
        self._set_buffer("_segquant_neg_amax", neg_amax)
        self._set_buffer("_segquant_dual_mask", dual_mask)

    def extra_repr(self) -> str:
        """ModelOpt's description (one line of ``mtq.print_quant_summary``) with SegQuant's state: DualScale's
        negative-side amax next to the positive one, then the role and its segments, e.g.
        ``8 bit fake per-tensor amax=5.49e-01 neg_amax=4.12e-01 ... quant segquant=input segments=32|128
        dual_scale=1``."""
        text = super().extra_repr()
        role = getattr(self, "_segquant_role", None)
        if self._disabled or role is None:
            return text
        if self.dual_scale and "_segquant_neg_amax" in self._buffers:
            amax = f" amax={self._short_amax()}"
            neg_amax, mask = self._segquant_neg_amax, self._segquant_dual_mask
            if neg_amax.numel() == mask.numel() > 1:  # per column: only DualScale columns have a negative side
                neg_amax = neg_amax.reshape(-1)[mask.reshape(-1).bool()]
            neg = f" neg_amax={self._short_tensor(neg_amax)}"
            text = text.replace(amax, amax + neg, 1) if amax in text else text + neg
        if role == "weight":
            return (f"{text} segquant=weight out_segments={_sizes(self._segquant_out_segments)} "
                    f"{self._segquant_weight_granularity}")
        text += f" segquant={role} segments={_sizes(self._segquant_segments)}"
        if self._segquant_dual_segments:
            text += f" dual_scale={','.join(map(str, self._segquant_dual_segments))}"
        if "_segquant_smooth" in self._buffers:
            text += " smoothed"
        if self.shift_center is not None:
            text += " shifted"
        return text + (" folded" if self._segquant_folded else "")

    def _reference_forward(self, x: Tensor) -> Tensor:
        fmt = self.segquant_format
        if self._segquant_role in ("input_tiles", "weight_tiles"):  # reference mode (segment_smoothing.py)
            return tiles_forward(self, fmt, x)
        if self._segquant_role == "weight":
            return fake_quant(x, scale_from_amax(self._amax, fmt), fmt)
        return fake_quant_input(x, fmt, self._segquant_segments, self._segquant_dual_segments, self.segquant_stats(),
                                self._buffers.get("_segquant_smooth"), self._segquant_folded,
                                per_token=self._segquant_role == "dynamic")

    def forward(self, inputs: Tensor) -> Tensor:
        exporting = torch.onnx.is_in_onnx_export()
        if (getattr(self, "_segquant_role", None) and not exporting and not self._disabled and self._if_quant
                and not self._if_calib and inputs.numel()):
            return self._reference_forward(inputs)
        in_bias = self.__dict__.get("_segquant_offset_in_bias")  # set by segquant_modelopt.export.shift_in_bias
        offset = in_bias if in_bias is not None else self.shift_offset() if is_marked(self) else None
        if (not self.dual_scale and offset is None) or self._disabled or not self._if_quant or inputs.numel() == 0:
            return super().forward(inputs)
        x = inputs
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale  # positive per-channel scales commute with the sign split
        if offset is not None:  # exported as a Sub of a constant before the Q/DQ (no Cast when the dtypes agree)
            offset = offset if offset.dtype == x.dtype else offset.to(x.dtype)
            x = x - offset
        with self.disable_pre_quant_scale():
            out = self._sign_split_forward(x) if self.dual_scale else super().forward(x)
        if offset is not None and in_bias is None:
            out = out + offset  # correct without segquant's exporter, which moves it to the bias
        return out

    def _sign_split_forward(self, x: Tensor) -> Tensor:
        """DualScale through ModelOpt's fake quantization (ONNX: two Q/DQ branches added before the MatMul)."""
        mask = self._segquant_dual_mask
        positive = torch.where(mask, x.clamp(min=0), x)
        negative = torch.where(mask, x.clamp(max=0), torch.zeros_like(x))
        out = super().forward(positive)
        amax = self._buffers["_amax"]
        self._buffers["_amax"] = self._segquant_neg_amax
        try:
            out = out + super().forward(negative)
        finally:
            self._buffers["_amax"] = amax
        return out


def shift_offset(stats: ActivationStats, segments: list[int], dual_segments: list[int], fmt: QuantFormat,
                 folded: bool) -> Tensor:
    """The shift as the GEMM's input carries it, ``(K,)`` float32: the centres ``c`` (``split_k``), or ``c / a``
    in the folded realisation, whose input is the codes (``a``: each segment's unit scale, ``s+`` on DualScale
    segments, as ``segquant.numerics.reference_linear`` folds them)."""
    if not folded:
        return stats.center.float()
    dual = torch.tensor([i in set(dual_segments) for i in range(len(segments))], device=stats.amax.device)
    return folded_center(stats.center, scale_from_amax(torch.where(dual, stats.pos_amax, stats.amax), fmt), segments)


def _sizes(sizes: list[int]) -> str:
    """Segment sizes in short: ``128``, ``6x32``, ``32|128``."""
    if len(set(sizes)) == 1 and len(sizes) > 1:
        return f"{len(sizes)}x{sizes[0]}"
    return "|".join(map(str, sizes))


def mark(quantizer: TensorQuantizer) -> SegmentTensorQuantizer:
    """Make ``quantizer`` a ``SegmentTensorQuantizer`` whose state says so (survives save/restore)."""
    quantizer._segquant = SegQuantFlag()
    if type(quantizer) is not SegmentTensorQuantizer:
        quantizer.__class__ = SegmentTensorQuantizer
    return quantizer


def is_marked(quantizer: nn.Module) -> bool:
    return isinstance(quantizer, TensorQuantizer) and isinstance(getattr(quantizer, "_segquant", None), SegQuantFlag)


TensorQuantizer._segquant = _PromoteOnSet()
