"""Number formats and elementwise quantizers: the building blocks of the reference numerics.

Symmetric quantization of ``x`` with scale ``s``: ``q = clamp(round(x / s), qmin, qmax)`` (INT) or
``q = fp8(clamp(x / s, -448, 448))`` (FP8 e4m3), ``x_hat = s * q``; ``s = amax / qmax`` (the ``step`` scale
form; the ``reciprocal`` form keeps ``r = qmax / amax``: ``q = round(x * r)``, ``x_hat = q / r``). Scales per
tensor, channel, token or segment of the last dim; DualScale's sign-selected pair of scales (SPEC section 3).
``segquant.numerics`` builds whole quantized Linears from these and re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .errors import PlanError, SegQuantError
from .options import DEFAULT_SCALE_FORM, SCALE_FORMS, check_choice


@dataclass(frozen=True)
class QuantFormat:
    """A symmetric number format: codes in ``[qmin, qmax]``; ``is_float`` for FP8 rounding."""

    name: str
    qmin: float
    qmax: float
    is_float: bool = False


INT8 = QuantFormat("int8", -128.0, 127.0)
INT4 = QuantFormat("int4", -8.0, 7.0)
INT6 = QuantFormat("int6", -32.0, 31.0)
FP8_E4M3 = QuantFormat("fp8_e4m3", -448.0, 448.0, is_float=True)
FORMATS = {f.name: f for f in (INT8, INT6, INT4, FP8_E4M3)}
FORMATS["fp8"] = FP8_E4M3
GRANULARITIES = ("per_tensor", "per_channel", "per_token", "per_segment")


def get_format(fmt: str | QuantFormat) -> QuantFormat:
    """The ``QuantFormat`` named ``fmt`` (``int8``, ``int6``, ``int4``, ``fp8``/``fp8_e4m3``)."""
    if isinstance(fmt, QuantFormat):
        return fmt
    try:
        return FORMATS[fmt]
    except (KeyError, TypeError):
        raise SegQuantError(f"unknown quantization format {fmt!r}; expected one of {sorted(FORMATS)}") from None


def _check_finite(x: Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        raise SegQuantError(f"{what} contains NaN or Inf; quantization scales would be undefined")


def scale_from_amax(amax: Tensor, fmt: str | QuantFormat, negative: bool = False, form: str = DEFAULT_SCALE_FORM) \
        -> Tensor:
    """``amax / qmax`` (``amax / |qmin|`` for the negative side of DualScale); with ``form="reciprocal"`` the
    multiplier ``qmax / amax`` (``|qmin| / amax``), a correctly rounded float32 division.

    A zero amax gives scale 1; a scale that would underflow float32 is raised to its smallest normal
    value (a multiplier that would overflow is lowered to the largest), so that ``x / scale`` never divides by
    zero."""
    fmt = get_format(fmt)
    amax = torch.as_tensor(amax, dtype=torch.float32)
    bound = -fmt.qmin if negative else fmt.qmax
    if check_choice(form, SCALE_FORMS, "scale_form") == "reciprocal":  # not bound / amax: reciprocal() * bound
        scale = torch.div(torch.full_like(amax, bound), amax).clamp(max=torch.finfo(torch.float32).max)
    else:
        scale = (amax / bound).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.where(amax > 0, scale, torch.ones_like(amax))


def _round_codes(v: Tensor, fmt: QuantFormat, lo: float, hi: float) -> Tensor:
    v = v.clamp(lo, hi)
    if fmt.is_float:
        return v.to(torch.float8_e4m3fn).to(torch.float32)
    return torch.round(v)


def _apply_scale(x: Tensor, scale: Tensor, form: str) -> Tensor:
    """``x / scale`` (``step``) or ``x * scale`` (``reciprocal``): a value on the code grid."""
    return x * scale if form == "reciprocal" else x / scale


def _unapply_scale(q: Tensor, scale: Tensor, form: str) -> Tensor:
    """``q * scale`` (``step``) or ``q / scale`` (``reciprocal``): codes back to values."""
    return q / scale if form == "reciprocal" else q * scale


def quantize(x: Tensor, scale: Tensor, fmt: str | QuantFormat, form: str = DEFAULT_SCALE_FORM) -> Tensor:
    """Codes ``q`` (as float32 values on the format's grid); ``scale`` (of ``form``) broadcasts against ``x``."""
    fmt = get_format(fmt)
    return _round_codes(_apply_scale(x.float(), scale, form), fmt, fmt.qmin, fmt.qmax)


def fake_quant(x: Tensor, scale: Tensor, fmt: str | QuantFormat, form: str = DEFAULT_SCALE_FORM) -> Tensor:
    """``scale * quantize(x, scale)`` (``step``; ``quantize(x, r) / r`` for ``reciprocal``) in ``x.dtype``."""
    return _unapply_scale(quantize(x, scale, fmt, form), scale, form).to(x.dtype)


# ---- amax by granularity --------------------------------------------------------------------------

def _check_segments(segments: Sequence[int], size: int, what: str = "segments") -> tuple[int, ...]:
    segs = tuple(int(s) for s in segments)
    if not segs or any(s <= 0 for s in segs) or sum(segs) != size:
        raise PlanError(f"{what} {list(segs)} do not partition a dim of size {size}")
    return segs


def amax_per_tensor(x: Tensor) -> Tensor:
    return x.detach().abs().amax().float()


def amax_per_channel(x: Tensor, axis: int = 0) -> Tensor:
    """amax over every dim but ``axis``, shaped to broadcast against ``x`` (weights: axis 0 = rows)."""
    axis = axis % x.dim()
    dims = [d for d in range(x.dim()) if d != axis]
    return x.detach().abs().amax(dim=dims, keepdim=True).float()


def amax_per_token(x: Tensor) -> Tensor:
    """amax over the last dim, one per token, shaped ``x.shape[:-1] + (1,)``."""
    return x.detach().abs().amax(dim=-1, keepdim=True).float()


def amax_per_segment(x: Tensor, segments: Sequence[int], dim: int = -1) -> Tensor:
    """One amax per segment of ``dim`` (shape ``[len(segments)]``)."""
    segs = _check_segments(segments, x.shape[dim])
    return torch.stack([p.detach().abs().amax().float() for p in x.split(segs, dim=dim)])


def expand_segments(values: Tensor, segments: Sequence[int], ndim: int = 1) -> Tensor:
    """Repeat ``[len(segments)]`` values to one per element of the last dim, shaped for ``ndim`` dims."""
    full = values.repeat_interleave(torch.tensor(segments, device=values.device))
    return full.reshape([1] * (ndim - 1) + [full.numel()])


def fake_quant_tensor(x: Tensor, fmt: str | QuantFormat = "int8", granularity: str = "per_tensor", *,
                      axis: int = 0, segments: Sequence[int] | None = None, amax: Tensor | None = None) -> Tensor:
    """Fake-quantize ``x`` with scales of one granularity, from ``amax`` if given else from ``x``.

    Args:
        granularity: ``per_tensor``; ``per_channel`` (one scale per index of ``axis``); ``per_token``
            (one per row of the last dim); ``per_segment`` (one per segment of the last dim).
        amax: calibrated amax of the matching shape (scalar, broadcastable, or ``[len(segments)]``).
    """
    if granularity not in GRANULARITIES:
        raise SegQuantError(f"unknown granularity {granularity!r}; expected one of {GRANULARITIES}")
    _check_finite(x, "tensor to quantize")
    if x.numel() == 0:
        return x.clone()
    if granularity == "per_segment":
        if segments is None:
            raise SegQuantError("per_segment quantization needs segments")
        segs = _check_segments(segments, x.shape[-1])
        amax = amax_per_segment(x, segs) if amax is None else torch.as_tensor(amax, dtype=torch.float32)
        if amax.shape != (len(segs),):
            raise SegQuantError(f"per-segment amax has shape {tuple(amax.shape)}, expected ({len(segs)},)")
        scale = expand_segments(scale_from_amax(amax, fmt), segs, ndim=x.dim())
        return fake_quant(x, scale, fmt)
    if amax is None:
        amax = {"per_tensor": amax_per_tensor, "per_token": amax_per_token}.get(
            granularity, lambda t: amax_per_channel(t, axis))(x)
    return fake_quant(x, scale_from_amax(amax, fmt), fmt)


# ---- DualScale ------------------------------------------------------------------------------------

def dual_scale_amax(x: Tensor, per_token: bool = False) -> tuple[Tensor, Tensor]:
    """(amax of the positive part, amax of |negative part|), per tensor or per token."""
    x = x.detach().float()
    if per_token:
        return x.clamp(min=0).amax(-1, keepdim=True), (-x).clamp(min=0).amax(-1, keepdim=True)
    return x.clamp(min=0).amax(), (-x).clamp(min=0).amax()


def dual_scale_quantize(x: Tensor, fmt: str | QuantFormat = "int8", pos_amax: Tensor | None = None,
                        neg_amax: Tensor | None = None, per_token: bool = False,
                        form: str = DEFAULT_SCALE_FORM) -> tuple[Tensor, Tensor, Tensor]:
    """One code tensor ``q`` (``q >= 0`` scaled by ``s+``, ``q < 0`` by ``s-``) and the two scales (of ``form``).

    Returns:
        ``(q, s_pos, s_neg)``; ``dual_scale_dequantize(q, s_pos, s_neg, form)`` rebuilds ``x_hat``.
    """
    fmt = get_format(fmt)
    if pos_amax is None or neg_amax is None:
        p, n = dual_scale_amax(x, per_token)
        pos_amax = p if pos_amax is None else pos_amax
        neg_amax = n if neg_amax is None else neg_amax
    s_pos = scale_from_amax(pos_amax, fmt, form=form)
    s_neg = scale_from_amax(neg_amax, fmt, negative=True, form=form)
    xf = x.float()
    q_pos = _round_codes(_apply_scale(xf.clamp(min=0), s_pos, form), fmt, 0.0, fmt.qmax)
    q_neg = _round_codes(_apply_scale(xf.clamp(max=0), s_neg, form), fmt, fmt.qmin, 0.0)
    return q_pos + q_neg, s_pos, s_neg


def dual_scale_dequantize(q: Tensor, s_pos: Tensor, s_neg: Tensor, form: str = DEFAULT_SCALE_FORM) -> Tensor:
    return torch.where(q >= 0, _unapply_scale(q, s_pos, form), _unapply_scale(q, s_neg, form))


def dual_scale_fake_quant(x: Tensor, fmt: str | QuantFormat = "int8", pos_amax: Tensor | None = None,
                          neg_amax: Tensor | None = None, per_token: bool = False) -> Tensor:
    """``x_hat = s+ q+ + s- q-`` in ``x.dtype`` (SPEC section 3)."""
    q, s_pos, s_neg = dual_scale_quantize(x, fmt, pos_amax, neg_amax, per_token)
    return dual_scale_dequantize(q, s_pos, s_neg).to(x.dtype)
