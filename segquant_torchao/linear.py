"""The quantized Linear: an ``nn.Linear`` converted IN PLACE (its ``__class__`` swapped), so that it
survives loaders that call ``quantize_`` on each leaf Linear (diffusers' ``TorchAoConfig``).

Realisations (see SPEC sections 2-3):
- static ``folded``: per-segment activation scales folded into the weight columns; one GEMM, with M
  doubled (rows ``[q+ ; q-]``) when some input segment is DualScale.
- static ``split_k``: one GEMM per input segment, ``y = sum_s a_s (W_s q_s)``.
- ``dynamic``: per-token scales per segment (split-K), DualScale with per-token ``s+``/``s-``.

Kernels (``LayerSpec.kernel``): ``naive`` runs every GEMM on ``torch._scaled_mm``/``torch._int_mm`` and
DualScale with M doubled; ``fused`` runs DualScale GEMMs on the fused Triton kernel (one code tensor, the
sign selects the scale; ``triton_gemm.py``) and int8 GEMMs on the Triton int8 GEMM, fp8 plain GEMMs staying on
cuBLAS. Under ``fused`` the activations are still quantized by torch ops, which ``torch.compile`` fuses into
the producer of ``x`` (the GELU/SiLU), a pass the Triton GEMM cannot see into.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segquant import LinearPlan, SegmentAmaxObserver, SegQuantError
from segquant.numerics import ActivationStats, fold_activation_scales, scale_from_amax, weight_amax

from .kernels import codes, dual_scale_mm, kernel_multiple, negative_codes, pad_to, \
    positive_codes, scaled_mm
from .options import SegQuantOptions

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerSpec:
    """What a converted layer does; plain Python so that ``torch.compile`` treats it as constant."""

    name: str
    in_features: int
    out_features: int
    in_segments: tuple[int, ...]
    out_segments: tuple[int, ...]
    dual_segments: tuple[int, ...]
    options: SegQuantOptions = SegQuantOptions()

    bounds: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        edges = [0]
        for size in self.in_segments:
            edges.append(edges[-1] + size)
        object.__setattr__(self, "bounds", tuple(zip(edges, edges[1:])))

    @property
    def smoothed(self) -> bool:
        return self.options.smoothquant_alpha is not None

    def layer(self) -> LinearPlan:
        return LinearPlan(self.in_features, self.out_features, self.in_segments, self.out_segments,
                          dual_scale=bool(self.dual_segments), dual_scale_segments=self.dual_segments, name=self.name)


class ObservedSegQuantLinear(nn.Linear):
    """A Linear that records per-segment, per-sign input ranges (the ``prepare`` step)."""

    segquant_observer: SegmentAmaxObserver

    def forward(self, x: Tensor) -> Tensor:
        self.segquant_observer.update(x.detach())
        return F.linear(x, self.weight, self.bias)


class SegQuantLinear(nn.Linear):
    """A Linear whose weight is fp8/int8 codes with per-row scales and whose input is quantized per
    SegQuant plan entry. Built by ``convert_linear``; never constructed directly."""

    segquant_spec: LayerSpec

    def extra_repr(self) -> str:
        s = self.segquant_spec
        return (f"in_features={s.in_features}, out_features={s.out_features}, precision={s.options.precision}, "
                f"activation={s.options.activation}, in_segments={list(s.in_segments)}, dual={list(s.dual_segments)}")

    def forward(self, x: Tensor) -> Tensor:
        spec = self.segquant_spec
        if x.shape[-1] != spec.in_features:
            raise SegQuantError(f"{spec.name}: input has last dim {x.shape[-1]}, the layer takes {spec.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, spec.in_features)
        if spec.options.activation == "static" and spec.options.realisation == "folded":
            y = self._folded(x2, self.bias)  # the SmoothQuant factors are folded into col_scale
        else:
            y = self._split(x2 * self.smooth if spec.smoothed else x2, self.bias)
        return y[:, :spec.out_features].reshape(*lead, spec.out_features)

    def _folded(self, x: Tensor, bias: Tensor | None) -> Tensor:
        spec = self.segquant_spec
        m = x.shape[0]
        v = x.float() / self.col_scale
        if spec.dual_segments and spec.options.kernel == "fused" and len(spec.dual_segments) == 1:
            return self._folded_fused(x, v, bias)
        if spec.dual_segments:
            top = torch.where(self.dual_mask, v.clamp(min=0), v)
            rows = [codes(top, 1.0, spec.options.precision)]
            ratios = []
            for j, i in enumerate(spec.dual_segments):
                lo, hi = spec.bounds[i]
                neg = torch.zeros_like(v)
                neg[:, lo:hi] = v[:, lo:hi].clamp(max=0) / self.neg_ratio[i]  # (smoothed x-) / s-
                rows.append(negative_codes(neg, 1.0, spec.options.precision))
                ratios.append(self.neg_ratio[i])
            a = torch.cat(rows, dim=0)
            scale_a = torch.cat([x.new_ones(m, 1, dtype=torch.float32)] +
                                [r.reshape(1, 1).expand(m, 1) for r in ratios], dim=0)
            y = scaled_mm(a, self.qweight, scale_a, self.weight_scale, torch.float32,
                          fast_accum=spec.options.fast_accum)
            y = y.reshape(len(rows), m, y.shape[-1]).sum(0)
            return _add_bias(y, bias).to(x.dtype)
        a = codes(v, 1.0, spec.options.precision)
        ones = x.new_ones(m, 1, dtype=torch.float32)
        if spec.options.kernel == "fused" and spec.options.precision == "int8":
            return _fused_gemm(a, self.qweight, ones[:1], self.weight_scale, x.dtype, bias)
        return scaled_mm(a, self.qweight, ones, self.weight_scale, x.dtype, bias, spec.options.fast_accum)

    def _folded_fused(self, x: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        """ONE code tensor: inside the DualScale segment the negative codes are ``x / s-`` (weight columns
        carry ``s+``, so their accumulator is scaled by ``s- / s+``), everything else ``x / a_s``."""
        spec = self.segquant_spec
        i = spec.dual_segments[0]
        lo, hi = spec.bounds[i]
        neg = self.dual_mask & (x < 0)
        q = codes(torch.where(neg, v / self.neg_ratio[i], v), 1.0, spec.options.precision)
        ones = self.neg_ratio.new_ones(1)
        return _fused_gemm(q, self.qweight, ones, self.weight_scale, x.dtype, bias, self.neg_ratio[i:i + 1],
                           (lo, hi))

    def _split(self, x: Tensor, bias: Tensor | None) -> Tensor:
        spec = self.segquant_spec
        m = x.shape[0]
        dynamic = spec.options.activation == "dynamic"
        # one term: write x.dtype straight from the GEMM; several: accumulate in float32
        acc_dtype = x.dtype if len(spec.bounds) == 1 else torch.float32
        y = None
        for i, (lo, hi) in enumerate(spec.bounds):
            part = x[:, lo:hi]
            weight = getattr(self, f"qweight_{i}")
            if i in spec.dual_segments:
                xf = part.float()
                if dynamic:
                    s_pos = scale_from_amax(xf.clamp(min=0).amax(-1, keepdim=True), spec.options.precision)
                    s_neg = scale_from_amax((-xf).clamp(min=0).amax(-1, keepdim=True), spec.options.precision,
                                            negative=True)
                else:
                    s_pos, s_neg = self.act_scale[i].reshape(1, 1), self.neg_scale[i].reshape(1, 1)
                if spec.options.kernel == "fused":
                    single = len(spec.bounds) == 1  # then the bias goes into the kernel's epilogue
                    q = _dual_codes(xf, s_pos, s_neg, spec.options.precision)
                    out = _fused_gemm(q, weight, s_pos, self.weight_scale, acc_dtype, bias if single else None, s_neg)
                    if single:
                        return out.to(x.dtype)
                else:
                    q_pos = positive_codes(xf, s_pos, spec.options.precision)
                    q_neg = negative_codes(xf, s_neg, spec.options.precision)
                    out = dual_scale_mm(q_pos, q_neg, weight, s_pos, s_neg, self.weight_scale, acc_dtype,
                                        spec.options.fast_accum)
            else:
                if dynamic:
                    scale = scale_from_amax(part.float().abs().amax(-1, keepdim=True), spec.options.precision)
                else:
                    scale = self.act_scale[i].reshape(1, 1)
                single = len(spec.bounds) == 1
                q = codes(part, scale, spec.options.precision)
                if spec.options.kernel == "fused" and spec.options.precision == "int8":
                    out = _fused_gemm(q, weight, scale, self.weight_scale, acc_dtype, bias if single else None)
                else:
                    out = scaled_mm(q, weight, scale.expand(m, 1), self.weight_scale, acc_dtype,
                                    bias if single else None, spec.options.fast_accum)
                if single:
                    return out.to(x.dtype)
            y = out if y is None else y + out
        return _add_bias(y, bias).to(x.dtype)


def _dual_codes(x: Tensor, s_pos: Tensor, s_neg: Tensor, precision: str) -> Tensor:
    """DualScale's one code tensor: ``x+ / s+`` where ``x >= 0``, ``x- / s-`` elsewhere."""
    return codes(torch.where(x >= 0, x / s_pos, x / s_neg), 1.0, precision)


def _fused_gemm(q: Tensor, weight: Tensor, s_pos: Tensor, w_scale: Tensor, out_dtype: torch.dtype,
                bias: Tensor | None, s_neg: Tensor | None = None, dual_range: tuple[int, int] | None = None) -> Tensor:
    from .triton_gemm import scaled_gemm

    return scaled_gemm(q, weight, s_pos, w_scale, out_dtype, bias=bias, s_neg=s_neg, dual_range=dual_range)


def _add_bias(y: Tensor, bias: Tensor | None) -> Tensor:
    if bias is None:
        return y
    if bias.shape[0] != y.shape[-1]:
        bias = pad_to(bias, 0, y.shape[-1])
    return y + bias


def _check_module(module: nn.Module, spec: LayerSpec) -> None:
    if isinstance(module, SegQuantLinear):
        raise SegQuantError(f"{spec.name}: already quantized by SegQuant; quantize a fresh copy of the float model")
    spec.layer().check_module(module)
    if not module.weight.dtype.is_floating_point or module.weight.dtype in (torch.float8_e4m3fn,):
        raise SegQuantError(f"{spec.name}: weight dtype {module.weight.dtype} is not a float dtype SegQuant "
                            "can quantize (use float32, float16 or bfloat16)")
    if module.weight.device.type == "meta":
        raise SegQuantError(f"{spec.name}: weights are on the meta device; load real weights before quantizing")


def prepare_linear(module: nn.Linear, spec: LayerSpec) -> nn.Linear:
    """Attach a per-segment observer (in place)."""
    _check_module(module, spec)
    module.segquant_observer = SegmentAmaxObserver(segments=spec.in_segments, name=spec.name)
    module.segquant_spec = spec
    module.__class__ = ObservedSegQuantLinear
    return module


def unprepare_linear(module: nn.Module) -> None:
    """Undo ``prepare_linear`` (used to leave a model unchanged when a later step fails)."""
    if isinstance(module, ObservedSegQuantLinear):
        del module.segquant_observer
        del module.segquant_spec
        module.__class__ = nn.Linear


def convert_linear(module: nn.Linear, spec: LayerSpec, stats: ActivationStats | None,
                   smooth: Tensor | None = None) -> SegQuantLinear:
    """Quantize ``module`` in place. ``stats`` (of the smoothed input when ``smooth`` is given) are required
    for static activation scales; ``smooth`` holds the SmoothQuant factors when the options smooth."""
    if isinstance(module, ObservedSegQuantLinear):
        del module.segquant_observer
        module.__class__ = nn.Linear
    _check_module(module, spec)
    if spec.options.activation == "static" and stats is None:
        raise SegQuantError(f"{spec.name}: static activation scales need calibration data")
    if spec.smoothed != (smooth is not None):
        raise SegQuantError(f"{spec.name}: SmoothQuant alpha {spec.options.smoothquant_alpha} needs "
                            f"{'its factors' if spec.smoothed else 'no factors'} from calibration")
    multiple = kernel_multiple(spec.options.precision)
    unaligned = [s for s in (spec.out_features, *spec.in_segments) if s % multiple]
    if unaligned:
        logger.info("%s: sizes %s are not multiples of %d; the %s weight is zero-padded for the kernel",
                    spec.name, unaligned, multiple, spec.options.precision)
    w = module.weight.detach().float()
    device = w.device
    buffers: dict[str, Tensor] = {}
    if stats is not None:
        act, neg = stats.scales(spec.layer(), spec.options.precision)
        buffers["act_scale"], buffers["neg_scale"] = act.to(device), neg.to(device)
        buffers["neg_ratio"] = (neg / act).to(device)
    if spec.options.activation == "static" and spec.options.realisation == "folded":
        w, buffers["col_scale"] = fold_activation_scales(w, buffers["act_scale"], spec.in_segments, smooth)
        buffers["dual_mask"] = torch.cat([torch.full((size,), i in spec.dual_segments, dtype=torch.bool)
                                          for i, size in enumerate(spec.in_segments)]).to(device)
    elif smooth is not None:
        w = w / smooth.to(device)
        buffers["smooth"] = smooth.to(device)
    scale = scale_from_amax(weight_amax(w, spec.out_segments, spec.options.weight_granularity == "per_channel"),
                            spec.options.precision)
    q = codes(w, scale, spec.options.precision)
    buffers["weight_scale"] = pad_to(scale.float(), 0, multiple, value=1.0).t().contiguous()  # (1, N)
    if spec.options.activation == "static" and spec.options.realisation == "folded":
        buffers["qweight"] = _pad_weight(q, multiple)
    else:
        for i, (lo, hi) in enumerate(spec.bounds):
            buffers[f"qweight_{i}"] = _pad_weight(q[:, lo:hi].contiguous(), multiple)
    del module.weight
    for name, value in buffers.items():
        module.register_buffer(name, value)
    module.segquant_spec = spec
    module.__class__ = SegQuantLinear
    return module


def _pad_weight(q: Tensor, multiple: int) -> Tensor:
    int_view = q.view(torch.int8) if q.dtype == torch.float8_e4m3fn else q
    padded = pad_to(pad_to(int_view, 0, multiple), 1, multiple)
    return padded.view(q.dtype) if q.dtype == torch.float8_e4m3fn else padded
