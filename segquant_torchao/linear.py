"""A SegQuant Linear: an ``nn.Linear`` whose ``weight`` is a ``SegQuantTensor`` (``tensor.py``, which computes
through ``forward.py``). This module turns a float weight into one (``quantize_weight``, ``convert_linear``) and
holds the calibration observer (a forward pre-hook, ``prepare_linear``)."""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import Tensor, nn
from torchao.utils import TorchAOBaseTensor

from segquant import LinearPlan, SegmentAmaxObserver, SegQuantError
from segquant.calib import segment_calibration, static_calibration
from segquant.numerics import (ActivationStats, fold_activation_scales, folded_center, per_segment_weight_scales,
                               scale_from_amax, shift_bias, weight_amax)

from .kernels import codes, kernel_multiple, pad_to
from .tensor import SegLinearSpec, SegQuantTensor

logger = logging.getLogger(__name__)


def observed(module: nn.Module) -> bool:
    """Whether ``prepare_linear`` attached an observer to ``module``."""
    return isinstance(getattr(module, "segquant_observer", None), SegmentAmaxObserver)


def check_linear(module: nn.Module, layer: LinearPlan) -> None:
    """Raise ``SegQuantError`` unless ``module`` is a float ``nn.Linear`` of the planned shape with real weights."""
    name = layer.name or "<layer>"
    if isinstance(module, nn.Linear) and isinstance(module.weight, TorchAOBaseTensor):
        raise SegQuantError(f"{name}: already quantized ({type(module.weight).__name__}); quantize a fresh "
                            "copy of the float model")
    layer.check_module(module)
    if not module.weight.dtype.is_floating_point or module.weight.dtype.itemsize == 1:
        raise SegQuantError(f"{name}: weight dtype {module.weight.dtype} is not a float dtype SegQuant "
                            "can quantize (use float32, float16 or bfloat16)")
    if module.weight.device.type == "meta":
        raise SegQuantError(f"{name}: weights are on the meta device; load real weights before quantizing")


def _observe(module: nn.Module, args: tuple) -> None:
    module.segquant_observer.update(args[0].detach())


def prepare_linear(module: nn.Linear, spec: SegLinearSpec) -> nn.Linear:
    """Attach a per-segment observer (a forward pre-hook; the module stays an ``nn.Linear``); it also finds the
    centres of a shifted layer."""
    layer = spec.layer()
    check_linear(module, layer)
    if observed(module):
        raise SegQuantError(f"{spec.name}: already prepared; run calibration, then convert")
    module.segquant_observer = SegmentAmaxObserver(layer, name=spec.name)
    module.segquant_spec = spec
    module.segquant_observer_hook = module.register_forward_pre_hook(_observe)
    return module


def unprepare_linear(module: nn.Module) -> None:
    """Remove ``prepare_linear``'s observer (after convert, or to undo a failed step)."""
    if observed(module):
        module.segquant_observer_hook.remove()
        del module.segquant_observer, module.segquant_observer_hook, module.segquant_spec


Calibration = ActivationStats | Sequence[ActivationStats]
"""A layer's calibrated ranges: one ``ActivationStats``, or one per output segment (per-segment SmoothQuant)."""


def observed_calibration(observer: SegmentAmaxObserver, weight: Tensor,
                         spec: SegLinearSpec) -> tuple[Calibration, Tensor | None]:
    """What ``quantize_weight`` takes from a layer's observer: the ranges and SmoothQuant factors of
    ``segquant.calib.static_calibration``, or with per-segment SmoothQuant (``spec.tiled``) one range set per
    output segment and the ``(B, K)`` factors of ``segquant.calib.segment_calibration``."""
    alpha = spec.options.smoothquant_alpha
    if spec.tiled:
        smooth, stats = segment_calibration(observer, weight.detach().float(), spec.layer(), alpha)
        return stats, smooth
    return static_calibration(observer, weight.detach().float(), alpha)


def quantize_weight(weight: Tensor, spec: SegLinearSpec, stats: Calibration | None,
                    smooth: Tensor | None = None) -> SegQuantTensor:
    """The ``SegQuantTensor`` of a float ``(N, K)`` weight. ``stats`` (of the smoothed input when ``smooth`` is
    given) are required for static activation scales and for a shift (its centres); ``smooth`` holds the
    SmoothQuant factors when the options smooth (per-segment SmoothQuant: ``observed_calibration``). The caller
    corrects the bias of a shifted layer (``convert_linear``)."""
    if spec.options.activation == "static" and stats is None:
        raise SegQuantError(f"{spec.name}: static activation scales need calibration data")
    if spec.smoothed != (smooth is not None):
        raise SegQuantError(f"{spec.name}: SmoothQuant alpha {spec.options.smoothquant_alpha} needs "
                            f"{'its factors' if spec.smoothed else 'no factors'} from calibration")
    if spec.tiled:
        return _quantize_tiled(weight, spec, _block_stats(spec, stats, smooth), smooth)
    if not isinstance(stats, (ActivationStats, type(None))):
        raise SegQuantError(f"{spec.name}: per-output-segment calibration for a layer without per-segment "
                            "SmoothQuant; calibrate again with these options")
    _check_center(spec, stats)
    multiple = kernel_multiple(spec.options.precision)
    unaligned = [s for s in (spec.out_features, *spec.in_segments) if s % multiple]
    if unaligned:
        logger.info("%s: sizes %s are not multiples of %d; the %s weight is zero-padded for the kernel",
                    spec.name, unaligned, multiple, spec.options.precision)
    w = weight.detach().float()
    device = w.device
    data: dict[str, Tensor] = {}  # only what the realisation reads: every inner tensor is a graph input and a guard
    if stats is not None:
        act, neg = (t.to(device) for t in stats.scales(spec.layer(), spec.options.precision))
    if spec.folded:
        w, data["col_scale"] = fold_activation_scales(w, act, spec.in_segments, smooth)
        if spec.dual_segments:
            data["neg_ratio"] = neg / act
            data["dual_mask"] = torch.cat([torch.full((size,), i in spec.dual_segments, dtype=torch.bool)
                                           for i, size in enumerate(spec.in_segments)]).to(device)
    else:
        if stats is not None:
            data["act_scale"] = act
            if spec.dual_segments:
                data["neg_scale"] = neg
        if smooth is not None:
            data["smooth"] = smooth.to(device)
            w = w / data["smooth"]
    scale = scale_from_amax(weight_amax(w, spec.out_segments, spec.options.weight_granularity == "per_channel"),
                            spec.options.precision)
    q = codes(w, scale, spec.options.precision)
    if tensorwise(spec):  # one scale for the whole weight: the GEMM takes scalar scales, no (M, 1) scale per call
        weight_scale = scale.float().reshape(-1)[:1].reshape(1, 1).contiguous()
    else:
        weight_scale = pad_to(scale.float(), 0, multiple, value=1.0).t().contiguous()  # (1, N_pad)
    column_groups = [q] if spec.folded else [q[:, lo:hi] for lo, hi in spec.bounds]
    qdata = torch.cat([_pad_weight(part.contiguous(), multiple) for part in column_groups], dim=1)
    if spec.shift is not None:
        data["center"] = _gemm_center(spec, stats, act if spec.folded else None, device)
    return SegQuantTensor(qdata.contiguous(), weight_scale, spec, weight.dtype, **data)


def _block_stats(spec: SegLinearSpec, stats: Calibration, smooth: Tensor) -> list[ActivationStats]:
    """Per-segment SmoothQuant's calibration, checked: one unshifted ``ActivationStats`` per output segment and
    ``(B, K)`` factors."""
    blocks, layer = len(spec.blocks), spec.layer()
    if spec.shift is not None:
        raise SegQuantError(f"{spec.name}: per-segment SmoothQuant has no activation shift; drop the shift from the "
                            "plan (plan.ablate(shift=False)) or use smoothing='per_layer'")
    if isinstance(stats, ActivationStats) or len(stats) != blocks or tuple(smooth.shape) != (blocks, spec.in_features):
        got = 1 if isinstance(stats, ActivationStats) else len(stats)
        raise SegQuantError(f"{spec.name}: per-segment SmoothQuant needs ranges and factors per output segment "
                            f"({blocks} x {spec.in_features} factors), got {got} range set(s) and factors "
                            f"{tuple(smooth.shape)}; calibrate again with smoothing='per_segment'")
    for st in stats:
        st.check(layer)
        if st.center is not None:
            raise SegQuantError(f"{spec.name}: per-segment SmoothQuant has no activation shift; calibrate again")
    return list(stats)


def _quantize_tiled(weight: Tensor, spec: SegLinearSpec, stats: list[ActivationStats],
                    smooth: Tensor) -> SegQuantTensor:
    """Per-segment SmoothQuant: block ``b``'s rows smoothed by ``smooth[b]`` and quantized with one scale per input
    segment (per row and input segment; ``segquant.numerics.per_segment_weight_scales``), each block's rows and
    each segment's columns padded on their own; block ``b``'s activation scales from ``stats[b]``."""
    precision, layer = spec.options.precision, spec.layer()
    multiple = kernel_multiple(precision)
    device = weight.device
    smooth = smooth.float().to(device)
    per_channel = spec.options.weight_granularity == "per_channel"
    rows, scales = [], []
    for w_s, scale in per_segment_weight_scales(weight.detach(), layer, smooth, precision, per_channel):
        q = codes(w_s, scale, precision)
        rows.append(torch.cat([_pad_weight(q[:, lo:hi].contiguous(), multiple) for lo, hi in spec.bounds], dim=1))
        per_segment = torch.stack([scale[:, lo] for lo, _ in spec.bounds])  # (S, N_b)
        scales.append(pad_to(per_segment, 1, multiple, value=1.0))
    act, neg = zip(*(st.scales(layer, precision) for st in stats))
    data = {"act_scale": torch.stack(act).to(device), "smooth": smooth}
    if spec.dual_segments:
        data["neg_scale"] = torch.stack(neg).to(device)
    return SegQuantTensor(torch.cat(rows, dim=0).contiguous(), torch.cat(scales, dim=1).contiguous(), spec,
                          weight.dtype, **data)


def _check_center(spec: SegLinearSpec, stats: ActivationStats | None) -> None:
    """A shifted layer needs calibrated centres (dynamic ones too); an unshifted one must not get any."""
    has_center = stats is not None and stats.center is not None
    if spec.shift is not None and not has_center:
        raise SegQuantError(f"{spec.name}: the plan shifts this layer's input (shift {spec.shift}) and the "
                            "centre comes from calibration, also with dynamic activation scales: run quantize_ "
                            "with step='prepare', calibrate, then step='convert' (or pass "
                            "calibration=calibration_from(model) with its 'center')")
    if spec.shift is None and has_center:
        raise SegQuantError(f"{spec.name}: calibration carries shift centres but the plan does not shift this "
                            "layer; calibrate again with this plan")


def _gemm_center(spec: SegLinearSpec, stats: ActivationStats, act: Tensor | None, device: torch.device) -> Tensor:
    """The centres where the forward subtracts them: ``c`` from ``x * smooth``, or (folded, ``act`` the
    per-segment unit scales) ``c / a`` from ``x / col_scale``, in code units."""
    center = stats.center.float().to(device)  # calibration carried in a config lives on the CPU
    return (center if act is None else folded_center(center, act, spec.in_segments)).contiguous()


def tensorwise(spec: SegLinearSpec) -> bool:
    """True when the layer's weight has one scale (per-tensor granularity, one output segment) and every GEMM
    it runs can take it as a scalar: cuBLASLt's tensorwise fp8 GEMM (or ``_int_mm`` and a scalar product) with
    a scalar activation scale, where the row-wise form would build an ``(M, 1)`` scale tensor on every call.
    DualScale (M doubled with two row scales) and the Triton int8 GEMM (per-column scales) keep the vector."""
    return (spec.options.weight_granularity == "per_tensor" and len(spec.out_segments) == 1 and not spec.tiled
            and not spec.dual_segments and not (spec.options.kernel == "fused" and spec.options.precision == "int8"))


def convert_linear(module: nn.Linear, spec: SegLinearSpec, stats: Calibration | None,
                   smooth: Tensor | None = None) -> nn.Linear:
    """Replace ``module.weight`` by its ``SegQuantTensor`` (and remove the observer). A shifted layer's bias
    becomes ``b + W_hat c`` (``W_hat`` as the GEMM multiplies it), so that the GEMM stays the plain one."""
    check_linear(module, spec.layer())
    qweight = quantize_weight(module.weight, spec, stats, smooth)
    bias = None if qweight.center is None else _shifted_bias(module, qweight)
    unprepare_linear(module)
    module.weight = nn.Parameter(qweight, requires_grad=False)
    if bias is not None:
        module.bias = nn.Parameter(bias, requires_grad=False)
    return module


def _shifted_bias(module: nn.Linear, qweight: SegQuantTensor) -> Tensor:
    """``b + W_hat c`` in the layer's dtype (``segquant.numerics.shift_bias``)."""
    if module.bias is not None and module.bias.device.type == "meta":
        raise SegQuantError(f"{qweight.spec.name}: the bias is not loaded yet (meta); a shifted layer folds its "
                            "centre into the bias: load the float model first, then quantize")
    corrected = shift_bias(qweight.gemm_weight(), module.bias, qweight.center)
    return corrected.to(module.weight.dtype).to(module.weight.device)


def _pad_weight(q: Tensor, multiple: int) -> Tensor:
    int_view = q.view(torch.int8) if q.dtype == torch.float8_e4m3fn else q
    padded = pad_to(pad_to(int_view, 0, multiple), 1, multiple)
    return padded.view(q.dtype) if q.dtype == torch.float8_e4m3fn else padded
