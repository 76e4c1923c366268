"""What a ``SegQuantTensor`` computes for ``F.linear(x, w, bias)``: its realisations and kernels.

Realisations (see SPEC sections 2-3):
- static ``folded``: per-segment activation scales folded into the weight columns; one GEMM, with M
  doubled (rows ``[q+ ; q-]``) when some input segment is DualScale.
- static ``split_k``: one GEMM per input segment, ``y = sum_s a_s (W_s q_s)``.
- ``dynamic``: per-token scales per segment (split-K), DualScale with per-token ``s+``/``s-``.
- per-segment SmoothQuant (static split-K, ``SegLinearSpec.tiled``): one split-K GEMM per output segment, each on
  the input smoothed by that segment's factors, with its own activation and weight scales; outputs concatenated.

Activation shift (any realisation): the weight's ``center`` is subtracted from the input in the elementwise
step that quantizes it (``torch.compile`` fuses the two) and the layer's bias already holds ``b + W_hat c``
(set at convert time), so the GEMMs are the plain ones; dynamic scales are those of ``x - c``.

Kernels (``SegQuantOptions.kernel``): ``naive`` runs every GEMM on ``torch._scaled_mm``/``torch._int_mm`` and
DualScale with M doubled; ``fused`` runs DualScale GEMMs on the fused Triton kernel (one code tensor, the
sign selects the scale; ``triton_gemm.py``) and int8 GEMMs on the Triton int8 GEMM, fp8 plain GEMMs staying on
cuBLAS. Under ``fused`` the activations are still quantized by torch ops, which ``torch.compile`` fuses into
the producer of ``x`` (the GELU/SiLU), a pass the Triton GEMM cannot see into.

``w`` below is always a ``SegQuantTensor`` (its inner tensors and ``spec`` are read directly).
"""

from __future__ import annotations

import torch
from torch import Tensor

from segquant import SegQuantError
from segquant.numerics import scale_from_amax

from .kernels import codes, dual_scale_mm, negative_codes, pad_to, positive_codes, scaled_mm


def seg_linear(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, w, bias)`` for a SegQuant weight, in ``x``'s dtype."""
    spec = w.spec
    if x.shape[-1] != spec.in_features:
        raise SegQuantError(f"{spec.name}: input has last dim {x.shape[-1]}, the layer takes {spec.in_features}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, spec.in_features)
    if spec.folded:
        y = _folded(w, x2, bias)  # the SmoothQuant factors are folded into col_scale
    elif spec.tiled:
        y = _tiled(w, x2, bias, x.dtype)
    else:
        v = x2 * w.smooth if w.smooth is not None else x2
        y = _split(w, v - w.center if w.center is not None else v, bias, x.dtype)
    return y[:, :spec.out_features].reshape(*lead, spec.out_features)


def _folded(w: Tensor, x: Tensor, bias: Tensor | None) -> Tensor:
    spec = w.spec
    m = x.shape[0]
    # x / col_scale to within one float32 rounding (SegQuantTensor.col_inv); a weight unpickled from before col_inv
    # was stored (torchao's __setstate__ does not call __init__) has none and divides
    v = x.float() / w.col_scale if w.col_inv is None else x.float() * w.col_inv
    if w.center is not None:
        v = v - w.center  # in code units (linear._gemm_center)
    if spec.dual_segments and spec.options.kernel == "fused" and len(spec.dual_segments) == 1:
        return _folded_fused(w, x, v, bias)
    if spec.dual_segments:
        top = torch.where(w.dual_mask, v.clamp(min=0), v)
        rows = [codes(top, 1.0, spec.options.precision)]
        ratios = []
        for i in spec.dual_segments:
            lo, hi = spec.bounds[i]
            neg = torch.zeros_like(v)
            neg[:, lo:hi] = v[:, lo:hi].clamp(max=0) / w.neg_ratio[i]  # (smoothed x-) / s-
            rows.append(negative_codes(neg, 1.0, spec.options.precision))
            ratios.append(w.neg_ratio[i])
        a = torch.cat(rows, dim=0)
        scale_a = torch.cat([x.new_ones(m, 1, dtype=torch.float32)] +
                            [r.reshape(1, 1).expand(m, 1) for r in ratios], dim=0)
        y = scaled_mm(a, w.qdata, scale_a, w.weight_scale, torch.float32, fast_accum=spec.options.fast_accum)
        y = y.reshape(len(rows), m, y.shape[-1]).sum(0)
        return _add_bias(y, bias).to(x.dtype)
    a = codes(v, 1.0, spec.options.precision)
    if spec.options.kernel == "fused" and spec.options.precision == "int8":
        return _fused_gemm(a, w.qdata, None, w.weight_scale, x.dtype, bias)
    # row scales of ones (the activation scales are in col_inv): None, read from a cached buffer inside the GEMM's op
    return scaled_mm(a, w.qdata, None, w.weight_scale, x.dtype, bias, spec.options.fast_accum)


def _folded_fused(w: Tensor, x: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
    """ONE code tensor: inside the DualScale segment the negative codes are ``x / s-`` (weight columns
    carry ``s+``, so their accumulator is scaled by ``s- / s+``), everything else ``x / a_s``."""
    spec = w.spec
    i = spec.dual_segments[0]
    lo, hi = spec.bounds[i]
    neg = w.dual_mask & (v < 0)  # v has x's sign, or that of x - c when shifted
    q = codes(torch.where(neg, v / w.neg_ratio[i], v), 1.0, spec.options.precision)
    return _fused_gemm(q, w.qdata, None, w.weight_scale, x.dtype, bias, w.neg_ratio[i:i + 1], (lo, hi))


def _tiled(w: Tensor, x: Tensor, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """Per-segment SmoothQuant: block ``b`` (output segment) is the split-K GEMM of ``x * smooth[b]`` with its own
    activation and weight scales; the blocks' outputs side by side, then the bias."""
    ys = [_split(w, x * w.smooth[b], None, torch.float32, b)[:, :rows] for b, rows in enumerate(w.spec.blocks)]
    return _add_bias(torch.cat(ys, dim=-1), bias).to(out_dtype)


def _split(w: Tensor, x: Tensor, bias: Tensor | None, out_dtype: torch.dtype, block: int = 0) -> Tensor:
    """Split-K (and dynamic): ``x`` is the smoothed, shifted input (float32 when smoothed or shifted), the
    output is ``out_dtype`` (the layer input's dtype). ``block``: the rows of a tiled weight to multiply."""
    spec = w.spec
    dynamic = spec.options.activation == "dynamic"
    fused = spec.options.kernel == "fused"
    # one term: write out_dtype straight from the GEMM; several: accumulate in float32
    single = len(spec.bounds) == 1
    acc_dtype = out_dtype if single else torch.float32
    act_scale, neg_scale = w.block_scales(block)
    y = None
    for i, (lo, hi) in enumerate(spec.bounds):
        part = x[:, lo:hi]
        weight = w.segment_codes(i, block)
        w_scale = w.segment_weight_scale(i, block)
        if i in spec.dual_segments:
            xf = part.float()
            if dynamic:
                s_pos = scale_from_amax(xf.clamp(min=0).amax(-1, keepdim=True), spec.options.precision)
                s_neg = scale_from_amax((-xf).clamp(min=0).amax(-1, keepdim=True), spec.options.precision,
                                        negative=True)
            else:
                s_pos, s_neg = act_scale[i].reshape(1, 1), neg_scale[i].reshape(1, 1)
            if fused:
                q = _dual_codes(xf, s_pos, s_neg, spec.options.precision)
                out = _fused_gemm(q, weight, s_pos, w_scale, acc_dtype, bias if single else None, s_neg)
            else:
                q_pos = positive_codes(xf, s_pos, spec.options.precision)
                q_neg = negative_codes(xf, s_neg, spec.options.precision)
                out = dual_scale_mm(q_pos, q_neg, weight, s_pos, s_neg, w_scale, acc_dtype, spec.options.fast_accum)
                out = _add_bias(out, bias) if single else out
        else:
            if dynamic:
                scale = scale_from_amax(part.float().abs().amax(-1, keepdim=True), spec.options.precision)
            else:
                scale = act_scale[i].reshape(1, 1)
            q = codes(part, scale, spec.options.precision)
            if fused and spec.options.precision == "int8":
                out = _fused_gemm(q, weight, scale, w_scale, acc_dtype, bias if single else None)
            else:
                out = scaled_mm(q, weight, scale, w_scale, acc_dtype, bias if single else None,
                                spec.options.fast_accum)
        if single:
            return out.to(out_dtype)
        y = out if y is None else y + out
    return _add_bias(y, bias).to(out_dtype)


def _dual_codes(x: Tensor, s_pos: Tensor, s_neg: Tensor, precision: str) -> Tensor:
    """DualScale's one code tensor: ``x+ / s+`` where ``x >= 0``, ``x- / s-`` elsewhere."""
    return codes(torch.where(x >= 0, x / s_pos, x / s_neg), 1.0, precision)


def _fused_gemm(q: Tensor, weight: Tensor, s_pos: Tensor | None, w_scale: Tensor, out_dtype: torch.dtype,
                bias: Tensor | None, s_neg: Tensor | None = None, dual_range: tuple[int, int] | None = None) -> Tensor:
    from .triton_gemm import scaled_gemm

    return scaled_gemm(q, weight, s_pos, w_scale, out_dtype, bias=bias, s_neg=s_neg, dual_range=dual_range)


def _add_bias(y: Tensor, bias: Tensor | None) -> Tensor:
    if bias is None:
        return y
    if bias.shape[0] != y.shape[-1]:
        bias = pad_to(bias, 0, y.shape[-1])
    return y + bias
