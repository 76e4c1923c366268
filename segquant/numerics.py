"""Reference numerics: pure-torch fake quantization, the oracle every backend is tested against.

The number formats and elementwise quantizers live in ``segquant.formats`` and are re-exported here.

Symmetric quantization of ``x`` with scale ``s``: ``q = clamp(round(x / s), qmin, qmax)`` (INT) or
``q = fp8(clamp(x / s, -448, 448))`` (FP8 e4m3), ``x_hat = s * q``; ``s = amax / qmax``. Scales can be
per tensor, per channel, per token or per segment of the last dim. DualScale (SPEC section 3) keeps
``s+ = amax(x+) / qmax`` and ``s- = amax(|x-|) / |qmin|`` and one code tensor whose sign picks the scale.

The ``reciprocal`` scale form (``segquant.options.SCALE_FORMS``; the paper's reference code) keeps multipliers
``r = qmax / amax`` instead: ``q = round(x * r)``, ``x_hat = q / r``. Functions that take a ``form`` return and
take scales in that form. ``per_segment_linear`` is the oracle of the reference code's per-segment SmoothQuant
(``QuantizeOptions.smoothing="per_segment"``): an output-segmented Linear is smoothed as one Linear per output
segment (own factors, weight scale and input scales; its input smoothed and quantized once per segment), an
input-segmented one gets one weight scale per input segment; in general every (output, input) segment tile of the
weight has its own scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from .errors import PlanError, SegQuantError
from .formats import (  # noqa: F401 - re-exported: the formats are part of segquant.numerics
    FORMATS, FP8_E4M3, GRANULARITIES, INT4, INT6, INT8, QuantFormat, _check_finite, _check_segments,
    amax_per_channel, amax_per_segment, amax_per_tensor, amax_per_token, dual_scale_amax, dual_scale_dequantize,
    dual_scale_fake_quant, dual_scale_quantize, expand_segments, fake_quant, fake_quant_tensor, get_format,
    quantize, scale_from_amax)
from .options import ACT_GRANULARITIES, DEFAULT_REALISATION, DEFAULT_SCALE_FORM, DEFAULT_SMOOTHING, REALISATIONS, \
    SCALE_FORMS, SHIFTS, SMOOTHINGS, WEIGHT_GRANULARITIES, check_choice

if TYPE_CHECKING:  # numerics reads a plan entry's fields; the plan module validates against the registry
    from .plan import LinearPlan


# ---- activation shift ------------------------------------------------------------------------------

def shift_center(lo: Tensor, hi: Tensor) -> Tensor:
    """``c = (hi + lo) / 2``: the centre of a calibrated range ``[lo, hi]`` (per tensor: scalars; per channel:
    ``(K,)``). Quantizing ``x - c`` symmetrically spends the codes on the range the data has, not on a mirror of
    its longer side (after GELU: about [-0.17, 25] -> [-12.6, 12.6], half the step of one symmetric scale)."""
    return (torch.as_tensor(hi, dtype=torch.float32) + torch.as_tensor(lo, dtype=torch.float32)) / 2


def shift_amax(lo: Tensor, hi: Tensor) -> Tensor:
    """The per-tensor amax of ``x - shift_center(lo, hi)``: the largest half-range over the channels."""
    half = (torch.as_tensor(hi, dtype=torch.float32) - torch.as_tensor(lo, dtype=torch.float32)) / 2
    return half.abs().amax()


def shift_fake_quant(x: Tensor, fmt: str | QuantFormat, lo: Tensor, hi: Tensor) -> Tensor:
    """``Q(x - c) + c`` in ``x.dtype``, ``c = shift_center(lo, hi)``, one symmetric scale from ``shift_amax``.

    A Linear computes ``W (Q(x - c) + c) + b = W Q(x - c) + (b + W c)``: the GEMM is a plain one on symmetric
    codes and the shift is a bias (``shift_bias``), so any INT8/FP8 format expresses it.
    """
    c = shift_center(lo, hi).to(x.device)
    v = x.float() - c
    return (fake_quant(v, scale_from_amax(shift_amax(lo, hi).to(x.device), fmt), fmt) + c).to(x.dtype)


def shift_bias(weight: Tensor, bias: Tensor | None, center: Tensor) -> Tensor:
    """``b + W c``: the bias of a Linear whose input is quantized as ``Q(x - c)`` (``weight`` as the GEMM uses it,
    i.e. dequantized when the weights are quantized). Shape ``(N,)``, float32."""
    w = weight.float()
    c = torch.as_tensor(center, dtype=torch.float32, device=w.device).expand(w.shape[1])
    out = w @ c
    return out if bias is None else out + bias.float()


# ---- a whole Linear --------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantSpec:
    """Formats and granularities of a quantized Linear.

    Args:
        weight_format: ``int8``, ``int4``, ``fp8`` ... (default ``int8``).
        weight_granularity: ``per_tensor`` (one scale per output segment of the plan) or ``per_channel``.
        act_format: activation format (default ``int8``).
        act_granularity: ``per_tensor`` (one scale per input segment, static when amax is given) or
            ``per_token`` (dynamic, one scale per token and input segment).
        realisation: input segments as ``split_k`` (exact: one GEMM per segment, ``a_s`` applied after)
            or ``folded`` (``a_s`` folded into the weight columns before weight quantization, one GEMM).
        scale_form: ``step`` (default) or ``reciprocal`` (``segquant.options.SCALE_FORMS``).
        smoothing: ``per_layer`` (default) or ``per_segment`` (``segquant.options.SMOOTHINGS``): with
            ``per_segment``, ``reference_linear`` takes per-output-segment factors and stats (``per_segment_linear``).
    """

    weight_format: str = "int8"
    weight_granularity: str = "per_tensor"
    act_format: str = "int8"
    act_granularity: str = "per_tensor"
    realisation: str = DEFAULT_REALISATION
    scale_form: str = DEFAULT_SCALE_FORM
    smoothing: str = DEFAULT_SMOOTHING

    def __post_init__(self) -> None:
        get_format(self.weight_format)
        get_format(self.act_format)
        check_choice(self.weight_granularity, WEIGHT_GRANULARITIES, "weight_granularity")
        check_choice(self.act_granularity, ACT_GRANULARITIES, "act_granularity")
        check_choice(self.realisation, REALISATIONS, "realisation")
        check_choice(self.scale_form, SCALE_FORMS, "scale_form")
        check_choice(self.smoothing, SMOOTHINGS, "smoothing")
        if self.realisation == "folded" and (self.scale_form, self.smoothing) != (DEFAULT_SCALE_FORM,
                                                                                   DEFAULT_SMOOTHING):
            raise SegQuantError("the folded realisation supports scale_form='step' and smoothing='per_layer' only")


@dataclass(frozen=True)
class ActivationStats:
    """Calibrated activation ranges of one Linear input, one entry per input segment.

    With an activation shift, ``center`` holds the ``(K,)`` centres ``c`` (zero on unshifted channels) and the
    ranges are those of ``x - c``: the layer quantizes ``x - c`` and adds ``W c`` to its bias."""

    amax: Tensor
    pos_amax: Tensor
    neg_amax: Tensor
    center: Tensor | None = None

    def check(self, layer: LinearPlan) -> None:
        """Raise ``PlanError`` unless there is one finite, non-negative entry per input segment of ``layer``."""
        name = layer.name or "<layer>"
        n = len(layer.in_segments)
        for field_name in ("amax", "pos_amax", "neg_amax"):
            value = getattr(self, field_name)
            if not isinstance(value, Tensor) or value.shape != (n,):
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise PlanError(f"{name}: calibration {field_name} has shape {shape}, the plan has {n} input "
                                "segments; calibrate again with this plan")
            if not torch.isfinite(value).all() or (value < 0).any():
                raise PlanError(f"{name}: calibration {field_name} must be finite and non-negative")
        if self.center is not None:
            if not isinstance(self.center, Tensor) or self.center.shape != (layer.in_features,):
                shape = tuple(self.center.shape) if isinstance(self.center, Tensor) else type(self.center).__name__
                raise PlanError(f"{name}: calibration center has shape {shape}, expected ({layer.in_features},) "
                                "(one per input channel)")
            if not torch.isfinite(self.center).all():
                raise PlanError(f"{name}: calibration center must be finite")

    def scales(self, layer: LinearPlan, fmt: str | QuantFormat) -> tuple[Tensor, Tensor]:
        """Per-segment ``(activation scale, negative-side scale)``: DualScale segments take ``s+`` from
        the positive amax and ``s-`` from the negative one; the others one symmetric scale from amax."""
        self.check(layer)
        dual = torch.tensor([layer.dual_scale and i in layer.dual_scale_segments
                             for i in range(len(layer.in_segments))], device=self.amax.device)
        return (scale_from_amax(torch.where(dual, self.pos_amax, self.amax), fmt),
                scale_from_amax(self.neg_amax, fmt, negative=True))


def shifted_ranges(channels: ActivationStats, segments: Sequence[int], shift_segments: Sequence[int],
                   shift: str) -> ActivationStats:
    """Per-channel ranges of ``x - c`` and the centres ``c`` (``(K,)``, zero outside ``shift_segments``).

    ``channels`` holds per-channel maxima of ``|x|``, ``x+`` and ``|x-|``; the calibrated range of channel ``k``
    is ``[-neg_amax[k], pos_amax[k]]`` (it always contains zero, so a constant channel keeps a usable scale).
    ``c`` is that range's centre per channel (``per_channel``) or the centre of the segment's overall range
    (``per_tensor``: one ``c`` per segment)."""
    check_choice(shift, SHIFTS, "shift")
    segs = _check_segments(segments, channels.amax.shape[-1], "in_segments")
    hi, lo = channels.pos_amax.float(), -channels.neg_amax.float()
    centers = []
    for i, (h, l) in enumerate(zip(hi.split(segs), lo.split(segs))):
        if i not in set(shift_segments):
            centers.append(torch.zeros_like(h))
        elif shift == "per_channel":
            centers.append(shift_center(l, h))
        else:
            centers.append(shift_center(l.min(), h.max()).expand_as(h))
    c = torch.cat(centers)
    pos, neg = (hi - c).clamp(min=0), (c - lo).clamp(min=0)
    return ActivationStats(torch.maximum(pos, neg), pos, neg, c)


def reduce_segments(per_channel: Tensor, segments: Sequence[int]) -> Tensor:
    """The max over each segment of a per-channel ``(K,)`` tensor -> ``(len(segments),)``."""
    segs = _check_segments(segments, per_channel.shape[-1])
    return torch.stack([p.max() for p in per_channel.split(segs, dim=-1)])


def weight_amax(w: Tensor, out_segments: Sequence[int], per_channel: bool) -> Tensor:
    """``(N, 1)`` weight amax: per output row, or one per output segment repeated over its rows."""
    rows = w.detach().float().abs().amax(dim=1)
    if not per_channel:
        rows = expand_segments(reduce_segments(rows, out_segments), out_segments)
    return rows[:, None]


def activation_stats(x: Tensor, segments: Sequence[int]) -> ActivationStats:
    """Per-segment amax, positive amax and negative amax of ``x`` (dynamic, from ``x`` itself)."""
    segs = _check_segments(segments, x.shape[-1], "in_segments")
    parts = x.detach().float().split(segs, dim=-1)
    return ActivationStats(torch.stack([p.abs().amax() for p in parts]),
                           torch.stack([p.clamp(min=0).amax() for p in parts]),
                           torch.stack([(-p).clamp(min=0).amax() for p in parts]))


def quantize_input_segment(x: Tensor, fmt: QuantFormat, dual: bool, per_token: bool,
                           stats: ActivationStats | None, i: int) -> tuple[Tensor, Tensor]:
    """``(x_hat / unit, unit)`` of input segment ``i``; ``unit`` is the scale that can be folded (``a_s``
    or ``s+``). Static from ``stats`` (per segment), else dynamic per tensor or per token. Backends that
    fake-quantize in PyTorch call this so that their numbers are the oracle's."""
    if dual:
        pos = None if stats is None or per_token else stats.pos_amax[i]
        neg = None if stats is None or per_token else stats.neg_amax[i]
        q, s_pos, s_neg = dual_scale_quantize(x, fmt, pos, neg, per_token)
        return torch.where(q >= 0, q, q * (s_neg / s_pos)), s_pos
    amax = amax_per_token(x) if per_token else (amax_per_tensor(x) if stats is None else stats.amax[i])
    scale = scale_from_amax(amax, fmt)
    return quantize(x, scale, fmt), scale


def fake_quant_segment(x: Tensor, fmt: QuantFormat, dual: bool, per_token: bool, stats: ActivationStats | None,
                       i: int, form: str = DEFAULT_SCALE_FORM) -> Tensor:
    """``x_hat`` of input segment ``i`` as ``quantize_input_segment`` quantizes it, in float32. In the ``step``
    form it is ``codes * unit`` (bit for bit what the split-K GEMM sees); in the ``reciprocal`` form each side's
    codes are divided by their own multiplier, as the reference code does."""
    if form == DEFAULT_SCALE_FORM:
        q, unit = quantize_input_segment(x, fmt, dual, per_token, stats, i)
        return q * unit
    if dual:
        pos = None if stats is None or per_token else stats.pos_amax[i]
        neg = None if stats is None or per_token else stats.neg_amax[i]
        q, r_pos, r_neg = dual_scale_quantize(x, fmt, pos, neg, per_token, form)
        return dual_scale_dequantize(q, r_pos, r_neg, form)
    amax = amax_per_token(x) if per_token else (amax_per_tensor(x) if stats is None else stats.amax[i])
    return fake_quant(x.float(), scale_from_amax(amax, fmt, form=form), fmt, form)


def fake_quant_input(x: Tensor, fmt: QuantFormat, segments: Sequence[int], dual_segments: Sequence[int],
                     stats: ActivationStats | None, smooth: Tensor | None = None, folded: bool = False,
                     per_token: bool | None = None, add_center: bool = True, form: str = DEFAULT_SCALE_FORM) -> Tensor:
    """A Linear's input as a SegQuant layer feeds it to its GEMM, in ``x.dtype``: ``x * smooth`` (minus the
    shift centres of ``stats``) split into ``segments``, each quantized by ``quantize_input_segment`` (static
    from ``stats``, per token when ``per_token``, default: when there are no stats); the codes times their unit
    scale, or (``folded``: the unit scales live in the weight) the codes alone. The centres are added back (to
    folded codes as ``folded_center``, in their units) unless ``add_center`` is False (then the caller adds
    ``W c`` to the bias, as a deployed layer does). The one implementation behind ModelOpt's fake quantization
    and the HF-checkpoint runtime. With ``form="reciprocal"`` the input is divided by ``smooth`` (the reference
    code's SmoothQuant divisors) and each segment fake-quantized by ``fake_quant_segment`` (no folding, no
    shift)."""
    if form != DEFAULT_SCALE_FORM:
        if folded or (stats is not None and stats.center is not None):
            raise SegQuantError(f"scale_form {form!r} has no folded realisation and no activation shift")
        v = (x.float() / smooth.float()) if smooth is not None else x.float()
        per_token = stats is None if per_token is None else per_token
        dual = set(dual_segments)
        parts = [fake_quant_segment(part, fmt, i in dual, per_token, stats, i, form)
                 for i, part in enumerate(v.split(list(segments), dim=-1))]
        return torch.cat(parts, dim=-1).to(x.dtype)
    v = x * smooth if smooth is not None else x
    center = None if stats is None else stats.center
    if center is not None:
        v = v - center.to(v.device, v.dtype if v.dtype.is_floating_point else torch.float32)
    per_token = stats is None if per_token is None else per_token
    dual = set(dual_segments)
    parts = [quantize_input_segment(part, fmt, i in dual, per_token, stats, i)
             for i, part in enumerate(v.split(list(segments), dim=-1))]
    if folded:
        out = torch.cat([q for q, _ in parts], dim=-1)
        if center is not None and add_center:  # the codes are in units of a: the shift too
            out = out + folded_center(center.to(out.device), torch.stack([u.reshape(()) for _, u in parts]), segments)
    else:
        out = torch.cat([q * unit for q, unit in parts], dim=-1)
        if center is not None and add_center:
            out = out + center.to(out.device)
    return out.to(x.dtype)


def folded_center(center: Tensor, unit_scales: Tensor, segments: Sequence[int]) -> Tensor:
    """``c / a``, ``(K,)`` float32: the shift in the folded realisation's code units, ``a`` being each input
    segment's unit scale (``s+`` on DualScale segments) repeated over its channels. The folded GEMM's input is
    ``codes + c / a`` and its bias correction ``W' (c / a) = W_hat c``."""
    return center.float() / expand_segments(unit_scales.float().to(center.device), segments).reshape(-1)


def smoothquant_factors(weight: Tensor, act_channel_amax: Tensor, alpha: float) -> Tensor:
    """SmoothQuant's per-input-channel factors ``s`` (shape ``(K,)``): the layer computes
    ``(x * s) @ (W / s).T``, moving ``alpha`` of the activation range into the weight.

    ``s = max|W[:, k]|^(1 - alpha) / max|x[..., k]|^alpha``, clamped to ``[1e-4, 1e4]`` (ModelOpt's and the
    reference's convention: ModelOpt stores ``s`` as the input quantizer's ``pre_quant_scale``).

    Args:
        weight: ``(N, K)``.
        act_channel_amax: ``(K,)`` calibrated max of ``|x|`` per input channel.
        alpha: migration strength in [0, 1].
    """
    if not 0 <= alpha <= 1:
        raise SegQuantError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    w_amax = weight.detach().float().abs().amax(0).clamp(min=1e-8)
    x_amax = act_channel_amax.float().to(w_amax.device).clamp(min=1e-8)
    return (w_amax.pow(1 - alpha) / x_amax.pow(alpha)).clamp(1e-4, 1e4)


def smoothquant_divisors(weight: Tensor, act_channel_amax: Tensor, alpha: float) -> Tensor:
    """The reference code's SmoothQuant factors ``d`` (shape ``(K,)``): the layer computes ``(x / d) @ (W * d).T``.

    ``d = max|x[..., k]|^alpha / max|W[:, k]|^(1 - alpha)``; a ``d <= 2^-31`` becomes 1, then ``d`` is clamped to
    ``[1e-4, 1e4]``. The reciprocal of ``smoothquant_factors`` in exact arithmetic (the ``reciprocal`` scale form
    applies smoothing as this division, to the last bit as the reference does).
    """
    if not 0 <= alpha <= 1:
        raise SegQuantError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    w_amax = weight.detach().float().abs().amax(0)
    x_amax = act_channel_amax.float().to(w_amax.device)
    d = x_amax ** float(alpha) / w_amax ** (1 - float(alpha))
    d = torch.where(d <= 1.0 / (1 << 31), torch.ones_like(d), d)
    return d.clamp(1e-4, 1e4)


def smoothing_factors(weight: Tensor, act_channel_amax: Tensor, alpha: float, form: str = DEFAULT_SCALE_FORM) \
        -> Tensor:
    """SmoothQuant factors in ``form``: ``smoothquant_factors`` (``step``: ``x`` is multiplied) or
    ``smoothquant_divisors`` (``reciprocal``: ``x`` is divided)."""
    if check_choice(form, SCALE_FORMS, "scale_form") == "reciprocal":
        return smoothquant_divisors(weight, act_channel_amax, alpha)
    return smoothquant_factors(weight, act_channel_amax, alpha)


def smooth_input(x: Tensor, factors: Tensor, form: str = DEFAULT_SCALE_FORM) -> Tensor:
    """``x * factors`` (``step``) or ``x / factors`` (``reciprocal``), float32."""
    return x.float() / factors.float() if form == "reciprocal" else x.float() * factors.float()


def smooth_weight(w: Tensor, factors: Tensor, form: str = DEFAULT_SCALE_FORM) -> Tensor:
    """``W / factors`` (``step``) or ``W * factors`` (``reciprocal``) over the input columns, float32."""
    return w.float() * factors.float() if form == "reciprocal" else w.float() / factors.float()


def fold_activation_scales(weight: Tensor, unit_scales: Tensor, segments: Sequence[int],
                           smooth: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Fold per-segment activation scales (and SmoothQuant factors) into the weight columns.

    The folded layer computes ``(x / d) @ W'.T`` with ``d = a / smooth`` and ``W' = W * d``, where
    ``a`` repeats each segment's unit scale (``a_s``, or ``s+`` on DualScale segments) over its columns: the
    quantized input ``x / d`` then has unit scale, so one per-tensor activation format serves every segment.

    Returns:
        ``(W', d)``: the folded ``(N, K)`` float32 weight and the ``(K,)`` input divisor.
    """
    column = expand_segments(unit_scales.float().to(weight.device), segments)
    divisor = column if smooth is None else column / smooth.float().to(weight.device)
    return weight.float() * divisor, divisor


def _quantize_weight(w: Tensor, layer: LinearPlan, spec: QuantSpec) -> Tensor:
    amax = weight_amax(w, layer.out_segments, spec.weight_granularity == "per_channel")
    return fake_quant(w, scale_from_amax(amax, spec.weight_format, form=spec.scale_form), spec.weight_format,
                      spec.scale_form)


def _check_shapes(x: Tensor, weight: Tensor, layer: LinearPlan) -> str:
    """The layer's name; ``PlanError`` unless ``x`` and ``weight`` have the plan entry's shape,
    ``SegQuantError`` if they hold NaN or Inf."""
    name = layer.name or "<layer>"
    if weight.shape != (layer.out_features, layer.in_features) or x.shape[-1] != layer.in_features:
        raise PlanError(f"{name}: plan is {layer.in_features}->{layer.out_features}, got weight "
                        f"{tuple(weight.shape)} and input last dim {x.shape[-1]}")
    _check_finite(x, f"{name}: input")
    _check_finite(weight, f"{name}: weight")
    return name


def _bias(bias: Tensor | None) -> Tensor | float:
    return 0.0 if bias is None else bias.float()


def _split_k(xf: Tensor, w_hat: Tensor, layer: LinearPlan, spec: QuantSpec, stats: ActivationStats | None) -> Tensor:
    """``sum_s fake_quant_segment(x_s) @ W_hat[:, K_s].T`` (float32, no bias; no activation shift)."""
    if stats is not None and stats.center is not None:
        raise SegQuantError(f"{layer.name or '<layer>'}: scale_form {spec.scale_form!r} has no activation shift")
    fmt, per_token = get_format(spec.act_format), spec.act_granularity == "per_token"
    dual = set(layer.dual_scale_segments) if layer.dual_scale else set()
    segs = list(layer.in_segments)
    return sum(fake_quant_segment(p, fmt, i in dual, per_token, stats, i, spec.scale_form) @ w_s.t()
               for i, (p, w_s) in enumerate(zip(xf.split(segs, dim=-1), w_hat.split(segs, dim=1))))


def reference_linear(x: Tensor, weight: Tensor, bias: Tensor | None, layer: LinearPlan,
                     spec: QuantSpec = QuantSpec(), stats: ActivationStats | None = None,
                     smooth: Tensor | None = None) -> Tensor:
    """The quantized output of one Linear under its plan entry: the oracle for both backends.

    Weights get one scale per output segment (``per_tensor``) or per row (``per_channel``); each input
    segment gets its own activation scale (DualScale segments two), static from ``stats`` or dynamic.

    Args:
        x: ``(..., K)`` input.
        weight: ``(N, K)``; bias: ``(N,)`` or None.
        stats: calibrated ``ActivationStats`` (of the smoothed input when ``smooth`` is given); None =
            dynamic from ``x`` (per tensor or per token). Its ``center`` (the activation shift) is subtracted
            before quantization and ``W_hat c`` added to the output, with static or per-token scales.
        smooth: SmoothQuant factors ``(K,)`` (``smoothquant_factors``): the layer computes
            ``(x * smooth) @ (W / smooth).T``; None = no smoothing. ``reciprocal`` scale form: divisors
            (``smoothquant_divisors``); ``per_segment`` smoothing: see ``per_segment_linear``.
    Returns:
        ``(..., N)`` in ``x.dtype``.
    Raises:
        PlanError: if ``x`` or ``weight`` do not match the plan entry's shape.
    """
    name = _check_shapes(x, weight, layer)
    per_token = spec.act_granularity == "per_token"
    if spec.smoothing == "per_segment" and smooth is not None:
        return per_segment_linear(x, weight, bias, layer, spec, stats, smooth)
    if stats is not None:
        stats.check(layer)
    if spec.realisation == "folded" and per_token:
        raise SegQuantError(f"{name}: the folded realisation needs static per_tensor activation scales; "
                            "use realisation='split_k' with per_token activations")
    if x.numel() == 0:
        return x.new_zeros(*x.shape[:-1], layer.out_features)
    act_fmt = get_format(spec.act_format)
    w, xf = weight.float(), x.float()
    if smooth is not None:
        w, xf = smooth_weight(w, smooth, spec.scale_form), smooth_input(xf, smooth, spec.scale_form)
    center = None if stats is None else stats.center
    if spec.scale_form != DEFAULT_SCALE_FORM:
        return (_split_k(xf, _quantize_weight(w, layer, spec), layer, spec, stats) + _bias(bias)).to(x.dtype)
    if center is not None:
        xf = xf - center.float()
    dual = set(layer.dual_scale_segments) if layer.dual_scale else set()
    parts = xf.split(list(layer.in_segments), dim=-1)
    quantized = [quantize_input_segment(p, act_fmt, i in dual, per_token, stats, i) for i, p in enumerate(parts)]
    if spec.realisation == "folded":
        units = torch.stack([u.reshape(()) for _, u in quantized])
        w_hat = _quantize_weight(fold_activation_scales(w, units, layer.in_segments)[0], layer, spec)
        y = torch.cat([q for q, _ in quantized], dim=-1) @ w_hat.t()
        if center is not None:
            y = y + w_hat @ folded_center(center, units, layer.in_segments)
    else:
        w_hat = _quantize_weight(w, layer, spec)
        y = sum((q * u) @ w_s.t() for (q, u), w_s in zip(quantized, w_hat.split(list(layer.in_segments), dim=1)))
        if center is not None:
            y = y + w_hat @ center.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ---- per-segment SmoothQuant (the reference code's) -----------------------------------------------------------

def tile_weight_amax(w: Tensor, in_segments: Sequence[int], per_channel: bool) -> Tensor:
    """``(N, K)`` weight amax with one value per input segment of ``w`` (over all its rows, or per row with
    ``per_channel``), repeated over the segment's columns."""
    segs = _check_segments(in_segments, w.shape[1], "in_segments")
    tiles = []
    for part in w.detach().float().abs().split(segs, dim=1):
        amax = part.amax(dim=1, keepdim=True) if per_channel else part.amax().reshape(1, 1).expand(part.shape[0], 1)
        tiles.append(amax.expand(-1, part.shape[1]))
    return torch.cat(tiles, dim=1)


def per_segment_weight_scales(weight: Tensor, layer: LinearPlan, smooth: Tensor, fmt: str | QuantFormat,
                              per_channel: bool, form: str = DEFAULT_SCALE_FORM) -> list[tuple[Tensor, Tensor]]:
    """Per output segment ``b``: its weight rows smoothed by ``smooth[b]`` and their scales in ``form``, one per
    input segment (per row and input segment with ``per_channel``) repeated over the segment's columns. Float32,
    ``[((N_b, K), (N_b, K))]``: what a backend quantizes ``W_b`` with, to codes or fake-quantized."""
    rows = weight.float().split(list(layer.out_segments), dim=0)
    out = []
    for w_b, factors in zip(rows, _block_factors(smooth, layer)):
        w_s = smooth_weight(w_b, factors, form)
        out.append((w_s, scale_from_amax(tile_weight_amax(w_s, layer.in_segments, per_channel), fmt, form=form)))
    return out


def per_segment_weight(weight: Tensor, layer: LinearPlan, smooth: Tensor, fmt: str | QuantFormat,
                       per_channel: bool, form: str = DEFAULT_SCALE_FORM) -> list[Tensor]:
    """The fake-quantized weight of each output segment ``b``: ``Q(W_b`` smoothed by ``smooth[b])``, one scale per
    input segment (per row and input segment with ``per_channel``). Float32, ``[(N_b, K)]``."""
    return [fake_quant(w_s, scale, fmt, form)
            for w_s, scale in per_segment_weight_scales(weight, layer, smooth, fmt, per_channel, form)]


def per_segment_inputs(x: Tensor, layer: LinearPlan, stats: Sequence[ActivationStats], smooth: Tensor,
                       fmt: str | QuantFormat, form: str = DEFAULT_SCALE_FORM) -> list[Tensor]:
    """The fake-quantized input of each output segment ``b``: ``x`` smoothed by ``smooth[b]``, each input segment
    quantized with ``stats[b]`` (static, DualScale as planned). Float32, ``[(..., K)]``."""
    fmt = get_format(fmt)
    dual = set(layer.dual_scale_segments) if layer.dual_scale else set()
    out = []
    for factors, st in zip(_block_factors(smooth, layer), stats):
        v = smooth_input(x, factors, form)
        out.append(torch.cat([fake_quant_segment(p, fmt, i in dual, False, st, i, form)
                              for i, p in enumerate(v.split(list(layer.in_segments), dim=-1))], dim=-1))
    return out


def _block_factors(smooth: Tensor, layer: LinearPlan) -> list[Tensor]:
    n = len(layer.out_segments)
    smooth = smooth.float()
    if smooth.dim() == 1:
        smooth = smooth.expand(n, -1)
    if smooth.shape != (n, layer.in_features):
        raise PlanError(f"{layer.name or '<layer>'}: per-segment smoothing factors have shape {tuple(smooth.shape)}, "
                        f"expected ({n}, {layer.in_features}) (one row per output segment)")
    return list(smooth.unbind(0))


def per_segment_linear(x: Tensor, weight: Tensor, bias: Tensor | None, layer: LinearPlan, spec: QuantSpec,
                       stats: Sequence[ActivationStats] | ActivationStats | None, smooth: Tensor) -> Tensor:
    """Per-segment SmoothQuant (``QuantSpec.smoothing="per_segment"``, the paper's reference code): output segment
    ``b`` of ``layer`` is its own smoothed Linear,

        ``y_b = sum_s Q(x_s o d_b; a_bs) @ Q(W_bs o d_b; w_bs).T``

    with ``o`` the smoothing of ``spec.scale_form`` (``x * d``, ``W / d`` for ``step``; ``x / d``, ``W * d`` for
    ``reciprocal``), ``d_b`` the factors of segment ``b`` (``smoothquant_factors``/``smoothquant_divisors`` of the
    weight rows of ``b``), ``a_bs`` the activation scale of input segment ``s`` of the smoothed input of ``b`` and
    ``w_bs`` one weight scale per (output, input) segment tile. An output-segmented layer thus smooths and
    quantizes its input once per output segment; an input-segmented one gets one weight scale per input segment.

    Args:
        x: ``(..., K)``; weight ``(N, K)``; bias ``(N,)`` or None.
        stats: one static ``ActivationStats`` per output segment (of that segment's smoothed input); None =
            dynamic per-tensor scales from each smoothed input.
        smooth: ``(len(out_segments), K)`` factors (or ``(K,)``, shared).
    Returns:
        ``(..., N)`` in ``x.dtype``.
    """
    name = _check_shapes(x, weight, layer)
    if spec.act_granularity != "per_tensor" or spec.realisation != "split_k":
        raise SegQuantError(f"{name}: per-segment smoothing needs static per_tensor activations and the split_k "
                            "realisation")
    n = len(layer.out_segments)
    if stats is None:
        stats = [activation_stats(smooth_input(x, f, spec.scale_form), layer.in_segments)
                 for f in _block_factors(smooth, layer)]
    elif isinstance(stats, ActivationStats):
        stats = [stats] * n
    if len(stats) != n:
        raise PlanError(f"{name}: {len(stats)} calibration stats for {n} output segments")
    for st in stats:
        st.check(layer)
        if st.center is not None:
            raise SegQuantError(f"{name}: per-segment smoothing has no activation shift")
    fmt = get_format(spec.act_format)
    inputs = per_segment_inputs(x, layer, stats, smooth, fmt, spec.scale_form)
    weights = per_segment_weight(weight, layer, smooth, spec.weight_format, spec.weight_granularity == "per_channel",
                                 spec.scale_form)
    ys = [sum(p @ w_s.t() for p, w_s in zip(x_b.split(list(layer.in_segments), dim=-1),
                                           w_b.split(list(layer.in_segments), dim=1)))
          for x_b, w_b in zip(inputs, weights)]
    y = torch.cat(ys, dim=-1)
    return (y if bias is None else y + bias.float()).to(x.dtype)


def sqnr_db(reference: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(|ref|^2 / |ref - approx|^2)``."""
    ref = reference.detach().double()
    noise = (ref - approx.detach().double()).pow(2).sum()
    signal = ref.pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise))
