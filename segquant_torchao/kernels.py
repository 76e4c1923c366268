"""GEMM wrappers over torch's own low-precision kernels (``torch._scaled_mm``, ``torch._int_mm``).

Activations are quantized here (codes + scales) and multiplied with pre-quantized weights stored
``(N, K)`` row-major. Shapes the kernels reject are padded, never silently sent to a slow path:
fp8 needs K and N multiples of 16 (weights are padded once, at convert time; activations' K per call),
int8 needs M > 16 and M, K, N multiples of 8.
"""

from __future__ import annotations

import torch
from torch import Tensor

from segquant.numerics import FP8_E4M3, INT8

FP8_DTYPE = torch.float8_e4m3fn
PRECISIONS = ("fp8", "int8")
_FORMATS = {"fp8": FP8_E4M3, "int8": INT8}


def kernel_multiple(precision: str) -> int:
    """K and N of a weight must be multiples of this for the kernel of ``precision``."""
    return 16 if precision == "fp8" else 8


def pad_to(x: Tensor, dim: int, multiple: int, minimum: int = 0, value: float = 0.0) -> Tensor:
    """Pad ``dim`` of ``x`` with ``value`` up to a multiple of ``multiple`` (and above ``minimum``)."""
    size = x.shape[dim]
    target = max(-(-size // multiple) * multiple, minimum)
    if target == size:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, target - size]
    return torch.nn.functional.pad(x, pad, value=value)


def codes(x: Tensor, scale: Tensor | float, precision: str, lo: float | None = None,
          hi: float | None = None) -> Tensor:
    """Quantize ``x / scale`` to fp8 e4m3 or int8 codes, clamped to ``[lo, hi]`` (default: the format's range)."""
    fmt = _FORMATS[precision]
    v = (x.float() / scale).clamp(fmt.qmin if lo is None else lo, fmt.qmax if hi is None else hi)
    return v.to(FP8_DTYPE) if precision == "fp8" else torch.round(v).to(torch.int8)


def positive_codes(x: Tensor, scale: Tensor | float, precision: str) -> Tensor:
    """DualScale's positive side: ``x+ / s+`` clamped to ``[0, qmax]``."""
    return codes(x.clamp(min=0), scale, precision, lo=0.0)


def negative_codes(x: Tensor, scale: Tensor | float, precision: str) -> Tensor:
    """DualScale's negative side: ``x- / s-`` clamped to ``[qmin, 0]``."""
    return codes(x.clamp(max=0), scale, precision, hi=0.0)


UNIT_ROWS = 1 << 18
"""Rows of the ``(UNIT_ROWS, 1)`` float32 ones cached per device (1 MiB; a longer buffer when a call needs more)."""
_UNIT_ROWS: dict[str, list[Tensor]] = {}


def cached_ones(m: int, device: torch.device) -> Tensor:
    """``(m, 1)`` float32 ones: a view of a buffer cached per device, for the GEMMs of layers whose activation scale
    is already in the weight's column scales (folded layers). Only custom ops call this, with the view never
    leaving them, so no compiled graph can write into the buffer. Filling a new tensor instead costs, under
    inductor, a kernel launch before every GEMM (about 420 in a FLUX.1-dev call: benchmarks/results/speed.md, runs
    h200-2026-12-01-b1-census and -unit-rows). A buffer outgrown stays alive (a CUDA graph captured with it still
    reads it); during CUDA graph capture with no buffer yet, the ones are made for that call only (captured with
    it), never cached."""
    buffers = _UNIT_ROWS.setdefault(str(device), [])
    if buffers and buffers[-1].shape[0] >= m:
        return buffers[-1][:m]
    ones = torch.ones(max(m, UNIT_ROWS), 1, dtype=torch.float32, device=device)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return ones[:m]
    buffers.append(ones)
    return ones[:m]


@torch.library.custom_op("segquant::scaled_mm_unit_rows", mutates_args=())
def _scaled_mm_unit_rows(a: Tensor, weight_t: Tensor, scale_b: Tensor, bias: Tensor | None, out_dtype: torch.dtype,
                         fast_accum: bool) -> Tensor:
    """``torch._scaled_mm`` with row scales of ones (``cached_ones``; a scalar one when ``scale_b`` is a scalar)."""
    ones = cached_ones(a.shape[0], a.device)
    scale_a = ones[:1].reshape(()) if scale_b.dim() == 0 else ones
    return torch._scaled_mm(a, weight_t, scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=out_dtype,
                            use_fast_accum=fast_accum)


@_scaled_mm_unit_rows.register_fake
def _(a, weight_t, scale_b, bias, out_dtype, fast_accum):
    return a.new_empty(a.shape[0], weight_t.shape[1], dtype=out_dtype)


def scaled_mm(a: Tensor, weight: Tensor, scale_a: Tensor | None, scale_b: Tensor, out_dtype: torch.dtype,
              bias: Tensor | None = None, fast_accum: bool = False) -> Tensor:
    """``(a * scale_a) @ (weight * scale_b).T + bias`` with fp32 accumulation, the bias in the epilogue.

    Args:
        a: ``(M, K)`` fp8 or int8 codes.
        weight: ``(N, K)`` codes of the same dtype, K and N already multiples of ``kernel_multiple``.
        scale_a: ``(M, 1)`` float32 row scales, or None for ones (``cached_ones``, read inside a custom op);
            scale_b: ``(1, N)`` float32 column scales. When both hold one value (any shape), the tensorwise GEMM
            runs with scalar scales.
        bias: ``(N,)`` or None; added inside the GEMM's epilogue where the kernel allows (one pass
            over the output instead of two).
    Returns:
        ``(M, N)`` in ``out_dtype``.
    """
    m, k = a.shape
    tensorwise = (scale_a is None or scale_a.numel() == 1) and scale_b.numel() == 1  # the tensorwise GEMM
    if tensorwise:
        scale_a = None if scale_a is None else scale_a.float().reshape(())
        scale_b = scale_b.float().reshape(())
    else:
        scale_a = None if scale_a is None else scale_a.float().expand(m, 1).contiguous()
        scale_b = scale_b.float().reshape(1, -1).contiguous()
    if k != weight.shape[1]:
        a = pad_to(a.view(torch.int8) if a.dtype == FP8_DTYPE else a, 1, weight.shape[1])
        a = a.view(FP8_DTYPE) if weight.dtype == FP8_DTYPE else a
    if bias is not None and bias.shape[0] != weight.shape[0]:
        bias = pad_to(bias, 0, weight.shape[0])
    if a.dtype == FP8_DTYPE:
        # cuBLASLt's row-wise scaled fp8 GEMM writes bf16 only; the CPU kernel writes any float dtype
        mm_dtype = torch.bfloat16 if a.is_cuda and out_dtype == torch.float32 and not tensorwise else out_dtype
        fused = bias is not None and bias.dtype == mm_dtype
        if scale_a is None:
            y = _scaled_mm_unit_rows(a, weight.t(), scale_b, bias if fused else None, mm_dtype, fast_accum)
        else:
            y = torch._scaled_mm(a, weight.t(), scale_a=scale_a, scale_b=scale_b, bias=bias if fused else None,
                                 out_dtype=mm_dtype, use_fast_accum=fast_accum)
        y = y if mm_dtype == out_dtype else y.to(out_dtype)
        return y + bias if bias is not None and not fused else y
    if a.dtype != torch.int8:
        raise TypeError(f"scaled_mm expects fp8 or int8 codes, got {a.dtype}")
    a_p = pad_to(a, 0, 8, minimum=24) if (m <= 16 or m % 8) else a
    acc = torch._int_mm(a_p, weight.t())[:m]
    y = acc.float() * scale_b if scale_a is None else acc.float() * scale_a * scale_b
    return (y + bias.float() if bias is not None else y).to(out_dtype)


def dual_scale_mm(q_pos: Tensor, q_neg: Tensor, weight: Tensor, s_pos: Tensor, s_neg: Tensor,
                  scale_b: Tensor, out_dtype: torch.dtype, fast_accum: bool = False) -> Tensor:
    """DualScale as ONE GEMM with M doubled: rows ``[q+ ; q-]`` with row scales ``[s+ ; s-]``, halves summed.

    ``s_pos``/``s_neg`` are ``(M, 1)`` (per token) or scalars (per tensor).
    """
    m = q_pos.shape[0]
    a = torch.cat([q_pos, q_neg], dim=0)
    scale_a = torch.cat([s_pos.float().expand(m, 1), s_neg.float().expand(m, 1)], dim=0)
    y = scaled_mm(a, weight, scale_a, scale_b, torch.float32, fast_accum=fast_accum)
    return (y[:m] + y[m:]).to(out_dtype)
