"""Triton GEMMs for Hopper: a fused DualScale GEMM and a plain 8-bit GEMM with per-row x per-column scales.

DualScale (SPEC section 3) keeps ONE 8-bit code tensor ``q``; inside the DualScale K range ``[dual_lo,
dual_hi)`` the sign of a code selects its scale. The fused kernel loads each A tile and each weight tile
once, splits the A tile by sign in registers and issues two dots against the same weight tile into two
accumulators; the epilogue computes ``y = (acc+ * s+ + acc- * s-) * w_scale + bias``. K tiles wholly outside
the DualScale range take one dot (FLUX ``proj_out``: only its GELU segment pays the second dot).
Inside the range the MMA work is still doubled; what the fusion saves against the naive M-doubled GEMM is
the second pass over the weight, the concatenated activation and the extra output halves.

Codes: fp8 e4m3 (fp32 accumulation) or int8 (int32 accumulation). Both operands are K-major: activations
``(M, K)`` and weights ``(N, K)`` row-major, as ``torch._scaled_mm`` takes them. On Hopper and later the plain
GEMM loads both operands through TMA descriptors (``loads_for``): 8% less GEMM time per FLUX.1-dev call than
pointer loads at INT8 on the H200 (benchmarks/results/int8_gemm_sweep.md).

Every entry point runs on any device: CUDA tensors go to the Triton kernels when Triton is importable,
anything else to a float32 torch path with the same numbers (the CPU fallback). The GEMM is the custom op
``segquant::scaled_gemm`` with a fake implementation, so that ``torch.compile(fullgraph=True)`` sees through it.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton
    HAS_TRITON = False
try:
    from triton.tools.tensor_descriptor import TensorDescriptor

    HAS_TENSOR_DESCRIPTOR = True
except ImportError:  # pragma: no cover - triton before host TMA descriptors: pointer loads only
    HAS_TENSOR_DESCRIPTOR = False

FP8_DTYPE = torch.float8_e4m3fn
CODE_DTYPES = (FP8_DTYPE, torch.int8)
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}


def interpreting() -> bool:
    """True when this module's kernels run on Triton's CPU interpreter (``TRITON_INTERPRET=1`` before import)."""
    return HAS_TRITON and type(_scaled_gemm_kernel).__name__ == "InterpretedFunction"


def triton_usable(t: Tensor) -> bool:
    """Whether ``t``'s GEMM goes to the Triton kernel (CUDA, or the interpreter on the CPU)."""
    return HAS_TRITON and (t.is_cuda or (interpreting() and t.device.type == "cpu"))


if HAS_TRITON:

    @triton.jit
    def _tile_dot(a_ptr, w_ptr, offs_m, offs_n, offs_k, k0, M, N, K, stride_am, stride_wn, acc_p, acc_n,
                  dual_lo, dual_hi, IS_FP8: tl.constexpr, SPLIT: tl.constexpr):
        kk = k0 + offs_k
        a_mask = (offs_m[:, None] < M) & (kk[None, :] < K)
        w_mask = (kk[:, None] < K) & (offs_n[None, :] < N)
        a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + kk[None, :]
        w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + kk[:, None]
        if IS_FP8:
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
            w = tl.load(w_ptrs, mask=w_mask, other=0.0)
        else:
            a = tl.load(a_ptrs, mask=a_mask, other=0)
            w = tl.load(w_ptrs, mask=w_mask, other=0)
        if SPLIT:
            # the sign test on the code's bits: an integer compare (fp8 has no ordered compare)
            bits = a.to(tl.int8, bitcast=True) if IS_FP8 else a
            neg = (bits < 0) & (kk[None, :] >= dual_lo) & (kk[None, :] < dual_hi)
            zero = tl.zeros_like(bits)
            a_p = tl.where(neg, zero, bits)
            a_n = tl.where(neg, bits, zero)
            if IS_FP8:
                a_p = a_p.to(tl.float8e4nv, bitcast=True)
                a_n = a_n.to(tl.float8e4nv, bitcast=True)
            acc_p = tl.dot(a_p, w, acc_p, out_dtype=acc_p.dtype)
            acc_n = tl.dot(a_n, w, acc_n, out_dtype=acc_n.dtype)
        else:
            acc_p = tl.dot(a, w, acc_p, out_dtype=acc_p.dtype)
        return acc_p, acc_n

    @triton.jit
    def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """The output tile ``(pid_m, pid_n)`` of program (or persistent tile) ``pid``: ``GROUP_M`` row tiles per
        group, so that a group's programs reuse the weight tiles in L2."""
        num_m = tl.cdiv(M, BLOCK_M)
        per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
        first_m = (pid // per_group) * GROUP_M
        group_size = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (pid % per_group) % group_size, (pid % per_group) // group_size

    @triton.jit
    def store_scaled(y, offs_m, offs_n, M, N, ws_ptr, bias_ptr, out_ptr, stride_om, HAS_BIAS: tl.constexpr):
        """The GEMMs' epilogue: ``y`` (float32 sums already times their row scales) times the column scales, plus
        the bias, stored in ``out_ptr``'s dtype."""
        n_ok = offs_n < N
        y = y * tl.load(ws_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        tl.store(out, y.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & n_ok[None, :])

    @triton.jit
    def _scaled_gemm_kernel(a_ptr, w_ptr, out_ptr, sp_ptr, sn_ptr, ws_ptr, bias_ptr, M, N, K,
                            stride_am, stride_wn, stride_om, stride_sp, stride_sn, dual_lo, dual_hi,
                            IS_FP8: tl.constexpr, DUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            GROUP_M: tl.constexpr):
        pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        acc_type = tl.float32 if IS_FP8 else tl.int32
        acc_p = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_type)
        if DUAL:
            acc_n = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_type)
            # three K ranges: before, inside and after the DualScale range (tile-aligned outwards)
            lo = tl.minimum((dual_lo // BLOCK_K) * BLOCK_K, K)
            hi = tl.minimum(tl.cdiv(dual_hi, BLOCK_K) * BLOCK_K, K)
            for k0 in range(0, lo, BLOCK_K):
                acc_p, acc_n = _tile_dot(a_ptr, w_ptr, offs_m, offs_n, offs_k, k0, M, N, K, stride_am, stride_wn,
                                         acc_p, acc_n, dual_lo, dual_hi, IS_FP8, False)
            for k0 in range(lo, hi, BLOCK_K):
                acc_p, acc_n = _tile_dot(a_ptr, w_ptr, offs_m, offs_n, offs_k, k0, M, N, K, stride_am, stride_wn,
                                         acc_p, acc_n, dual_lo, dual_hi, IS_FP8, True)
            for k0 in range(hi, K, BLOCK_K):
                acc_p, acc_n = _tile_dot(a_ptr, w_ptr, offs_m, offs_n, offs_k, k0, M, N, K, stride_am, stride_wn,
                                         acc_p, acc_n, dual_lo, dual_hi, IS_FP8, False)
        else:
            acc_n = tl.zeros((1, 1), dtype=acc_type)  # unused: keeps the plain GEMM at one accumulator
            for k0 in range(0, K, BLOCK_K):
                acc_p, acc_n = _tile_dot(a_ptr, w_ptr, offs_m, offs_n, offs_k, k0, M, N, K, stride_am, stride_wn,
                                         acc_p, acc_n, dual_lo, dual_hi, IS_FP8, False)
        m_ok = offs_m < M
        s_p = tl.load(sp_ptr + offs_m * stride_sp, mask=m_ok, other=0.0)
        y = acc_p.to(tl.float32) * s_p[:, None]
        if DUAL:
            s_n = tl.load(sn_ptr + offs_m * stride_sn, mask=m_ok, other=0.0)
            y += acc_n.to(tl.float32) * s_n[:, None]
        store_scaled(y, offs_m, offs_n, M, N, ws_ptr, bias_ptr, out_ptr, stride_om, HAS_BIAS)

    def _configs(dual: bool) -> list:
        # two fp32 accumulators of 128x256 would spill: the dual kernel stays at 128x128 / 64x256 tiles
        shapes = [(128, 128, 128, 8, 4), (128, 128, 64, 8, 4), (64, 256, 128, 8, 3), (128, 64, 128, 4, 4)] if dual \
            else [(128, 256, 128, 8, 3), (128, 256, 64, 8, 4), (128, 128, 128, 8, 4), (256, 128, 64, 8, 3),
                  (64, 128, 128, 4, 4)]
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
                for m, n, k, w, s in shapes]

    _KEY = ["M", "N", "K", "IS_FP8", "HAS_BIAS"]
    # the autotuned kernels (DualScale and plain); public so that benchmarks can read their ``best_config``
    dual_tuned = triton.autotune(configs=_configs(True), key=_KEY)(_scaled_gemm_kernel)
    plain_tuned = triton.autotune(configs=_configs(False), key=_KEY)(_scaled_gemm_kernel)

    @triton.jit
    def _tma_gemm_kernel(a_desc, w_desc, out_ptr, sp_ptr, ws_ptr, bias_ptr, M, N, K, stride_om, stride_sp,
                         IS_FP8: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """The plain GEMM with both operands loaded through TMA descriptors (Hopper and later): the same
        grouping, sums and epilogue as ``_scaled_gemm_kernel`` without DualScale."""
        pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc_type = tl.float32 if IS_FP8 else tl.int32
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_type)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            a = a_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
            w = w_desc.load([pid_n * BLOCK_N, k * BLOCK_K])
            acc = tl.dot(a, w.T, acc, out_dtype=acc_type)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        y = acc.to(tl.float32) * tl.load(sp_ptr + offs_m * stride_sp, mask=offs_m < M, other=0.0)[:, None]
        store_scaled(y, offs_m, offs_n, M, N, ws_ptr, bias_ptr, out_ptr, stride_om, HAS_BIAS)

    def _tma_block_shapes(nargs: dict) -> None:
        """Autotuning pre-hook: each config's tile shape onto the host descriptors (the tutorial's pattern)."""
        nargs["a_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
        nargs["w_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]

    # benchmarks/results/int8_gemm_sweep.md (H200): the fastest TMA configs per FLUX shape
    TMA_CONFIGS = [(128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 128, 128, 8, 4), (128, 128, 128, 4, 5)]
    tma_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s,
                               pre_hook=_tma_block_shapes) for m, n, k, w, s in TMA_CONFIGS],
        key=_KEY)(_tma_gemm_kernel)


# ---- checks and the torch path -----------------------------------------------------------------------

def _row_scale(s: Tensor, m: int, what: str) -> Tensor:
    s = s.float().reshape(-1)
    if s.numel() not in (1, m):
        raise ValueError(f"{what} must hold 1 or M={m} scales, got {s.numel()}")
    return s.contiguous()


def _check_gemm(a: Tensor, weight: Tensor, w_scale: Tensor, bias: Tensor | None, dual_lo: int, dual_hi: int,
                out_dtype: torch.dtype) -> None:
    if a.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"scaled_gemm takes 2-D codes, got a {tuple(a.shape)} and weight {tuple(weight.shape)}")
    if a.dtype not in CODE_DTYPES or weight.dtype != a.dtype:
        raise TypeError(f"scaled_gemm takes fp8 e4m3 or int8 codes of one dtype, got {a.dtype} and {weight.dtype}")
    if weight.shape[1] < a.shape[1]:
        raise ValueError(f"weight has K={weight.shape[1]}, the activation K={a.shape[1]}")
    if w_scale.numel() != weight.shape[0]:
        raise ValueError(f"w_scale must hold N={weight.shape[0]} column scales, got {w_scale.numel()}")
    if bias is not None and bias.numel() > weight.shape[0]:
        raise ValueError(f"bias has {bias.numel()} entries, the weight N={weight.shape[0]}")
    if not 0 <= dual_lo <= dual_hi <= a.shape[1]:
        raise ValueError(f"DualScale range [{dual_lo}, {dual_hi}) is not inside K={a.shape[1]}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")


def _torch_gemm(a: Tensor, weight: Tensor, s_pos: Tensor, s_neg: Tensor, w_scale: Tensor, bias: Tensor | None,
                dual_lo: int, dual_hi: int, out_dtype: torch.dtype) -> Tensor:
    """The fallback: the same sums in float32 (codes are exact in float32)."""
    q = a.float()
    w = weight[:, :a.shape[1]].float()
    sp, sn = s_pos.reshape(-1, 1), s_neg.reshape(-1, 1)
    if dual_hi > dual_lo:
        dual = torch.zeros(a.shape[1], dtype=torch.bool, device=a.device)
        dual[dual_lo:dual_hi] = True
        neg = (q < 0) & dual
        y = (torch.where(neg, 0.0, q) @ w.t()) * sp + (torch.where(neg, q, 0.0) @ w.t()) * sn
    else:
        y = (q @ w.t()) * sp
    y = y * w_scale.float().reshape(1, -1)
    if bias is not None:
        y[:, :bias.numel()] += bias.float()
    return y.to(out_dtype)


def loads_for(a: Tensor, weight: Tensor, dual: bool) -> str:
    """How a GEMM loads its operands: ``tma`` (host TMA descriptors; plain GEMMs on a CUDA device of compute
    capability 9.0 or later, both operands' row strides 16-byte aligned) or ``pointer``. ``SEGQUANT_TRITON_LOADS``
    (``auto``, ``pointer``, ``tma``) overrides the choice (``tma`` also on Triton's interpreter)."""
    want = os.environ.get("SEGQUANT_TRITON_LOADS", "auto")
    if want not in ("auto", "pointer", "tma"):
        raise ValueError(f"SEGQUANT_TRITON_LOADS must be auto, pointer or tma, got {want!r}")
    if dual or want == "pointer" or not HAS_TENSOR_DESCRIPTOR:
        return "pointer"
    aligned = (a.stride(1) == 1 and weight.stride(1) == 1 and a.stride(0) % 16 == 0 and weight.stride(0) % 16 == 0
               and a.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0)
    if want == "tma":
        return "tma" if aligned else "pointer"
    return "tma" if aligned and a.is_cuda and torch.cuda.get_device_capability(a.device) >= (9, 0) else "pointer"


def _launch_tma(a: Tensor, weight: Tensor, s_pos: Tensor, w_scale: Tensor, bias: Tensor | None, out: Tensor,
                config: dict | None) -> None:
    m, k = a.shape
    n = weight.shape[0]
    w = weight[:, :k]  # a view: columns past K (padding) are never loaded
    a_desc = TensorDescriptor.from_tensor(a, [1, 1])  # block shapes: set per config
    w_desc = TensorDescriptor.from_tensor(w, [1, 1])
    args = (a_desc, w_desc, out, s_pos, w_scale.float().reshape(-1).contiguous(),
            bias if bias is not None else out, m, n, k, out.stride(0), 0 if s_pos.numel() == 1 else 1)
    flags = dict(IS_FP8=a.dtype == FP8_DTYPE, HAS_BIAS=bias is not None)
    if config is None and interpreting():
        config = INTERPRETER_CONFIG
    if config is not None:
        a_desc.block_shape = [config["BLOCK_M"], config["BLOCK_K"]]
        w_desc.block_shape = [config["BLOCK_N"], config["BLOCK_K"]]
        grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
        _tma_gemm_kernel[grid](*args, **flags, **config)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        tma_tuned[grid](*args, **flags)


def _launch_gemm(a: Tensor, weight: Tensor, s_pos: Tensor, s_neg: Tensor, w_scale: Tensor, bias: Tensor | None,
                 dual_lo: int, dual_hi: int, out_dtype: torch.dtype, config: dict | None = None) -> Tensor:
    m, k = a.shape
    n = weight.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if bias is not None and bias.numel() != n:
        bias = torch.nn.functional.pad(bias, (0, n - bias.numel()))
    dual = dual_hi > dual_lo
    a8 = a if a.stride(1) == 1 else a.contiguous()
    w8 = weight if weight.stride(1) == 1 else weight.contiguous()
    if loads_for(a8, w8, dual) == "tma":
        _launch_tma(a8, w8, s_pos, w_scale, bias, out, config)
        return out
    args = (a8, w8, out, s_pos, s_neg, w_scale.float().reshape(-1).contiguous(),
            bias if bias is not None else out, m, n, k, a8.stride(0), w8.stride(0), out.stride(0),
            0 if s_pos.numel() == 1 else 1, 0 if s_neg.numel() == 1 else 1, dual_lo, dual_hi)
    flags = dict(IS_FP8=a.dtype == FP8_DTYPE, DUAL=dual, HAS_BIAS=bias is not None)
    if config is None and interpreting():
        config = INTERPRETER_CONFIG  # autotuning times configs with CUDA events
    if config is not None:
        grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
        _scaled_gemm_kernel[grid](*args, **flags, **config)
    else:
        kernel = dual_tuned if dual else plain_tuned
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        kernel[grid](*args, **flags)
    return out


# ---- the custom op and the public entry points --------------------------------------------------------

def _with_ones(a: Tensor, s_pos: Tensor | None, s_neg: Tensor | None) -> tuple[Tensor, Tensor]:
    """The row scales a kernel takes: ``s_pos`` None means one (a view of ``kernels.cached_ones``, made inside the
    op so that no compiled graph holds it), ``s_neg`` None means ``s_pos``."""
    from .kernels import cached_ones

    s_pos = cached_ones(1, a.device).reshape(1) if s_pos is None else s_pos
    return s_pos, s_pos if s_neg is None else s_neg


@torch.library.custom_op("segquant::scaled_gemm", mutates_args=())
def _scaled_gemm_op(a: Tensor, weight: Tensor, s_pos: Tensor | None, s_neg: Tensor | None, w_scale: Tensor,
                    bias: Tensor | None, dual_lo: int, dual_hi: int, out_dtype: torch.dtype) -> Tensor:
    s_pos, s_neg = _with_ones(a, s_pos, s_neg)
    if triton_usable(a):
        return _launch_gemm(a, weight, s_pos, s_neg, w_scale, bias, dual_lo, dual_hi, out_dtype)
    return _torch_gemm(a, weight, s_pos, s_neg, w_scale, bias, dual_lo, dual_hi, out_dtype)


@_scaled_gemm_op.register_fake
def _(a, weight, s_pos, s_neg, w_scale, bias, dual_lo, dual_hi, out_dtype):
    return a.new_empty(a.shape[0], weight.shape[0], dtype=out_dtype)


def scaled_gemm(a: Tensor, weight: Tensor, s_pos: Tensor | None, w_scale: Tensor, out_dtype: torch.dtype,
                bias: Tensor | None = None, s_neg: Tensor | None = None, dual_range: tuple[int, int] | None = None,
                config: dict | None = None) -> Tensor:
    """``y = (q+ * s+ + q- * s-) @ weight.T * w_scale + bias``, ``q-`` = the negative codes inside ``dual_range``.

    Without ``s_neg`` it is the plain 8-bit GEMM ``(a * s_pos) @ (weight * w_scale).T + bias``.

    Args:
        a: ``(M, K)`` fp8 e4m3 or int8 codes; ONE tensor, the sign selects the scale inside ``dual_range``.
        weight: ``(N, K')`` codes of the same dtype, ``K' >= K`` (columns past K, e.g. padding, are unused).
        s_pos: row scales of the positive (or every) code: ``(M,)``/``(M, 1)`` per token or one per tensor; None
            for ones (folded layers, whose activation scales are in the weight's column scales).
        w_scale: ``(N,)``/``(1, N)`` float32 column (weight) scales.
        s_neg: scales of the negative codes inside ``dual_range``, shaped like ``s_pos``; None = plain GEMM.
        dual_range: ``(lo, hi)`` K range of DualScale columns; default all of K when ``s_neg`` is given.
        config: explicit Triton meta-parameters (BLOCK_M/N/K, GROUP_M) instead of autotuning (tests).
    Returns:
        ``(M, N)`` in ``out_dtype`` (float32, bfloat16 or float16).
    Raises:
        TypeError, ValueError: on codes of other dtypes or shapes that do not fit.
    """
    m, k = a.shape if a.dim() == 2 else (0, 0)
    if s_neg is None:
        lo, hi = 0, 0
    else:
        lo, hi = dual_range if dual_range is not None else (0, k)
    _check_gemm(a, weight, w_scale, bias, lo, hi, out_dtype)
    s_pos = None if s_pos is None else _row_scale(s_pos, m, "s_pos")
    s_neg = s_pos if s_neg is None else _row_scale(s_neg, m, "s_neg")
    if m == 0:
        return a.new_zeros(0, weight.shape[0], dtype=out_dtype)
    if config is not None:
        if not triton_usable(a):
            raise RuntimeError("an explicit Triton config needs a CUDA tensor or TRITON_INTERPRET=1")
        return _launch_gemm(a, weight, *_with_ones(a, s_pos, s_neg), w_scale, bias, lo, hi, out_dtype, config)
    return _scaled_gemm_op(a, weight, s_pos, s_neg, w_scale, bias, lo, hi, out_dtype)


def dual_scale_gemm(q: Tensor, weight: Tensor, s_pos: Tensor, s_neg: Tensor, w_scale: Tensor,
                    out_dtype: torch.dtype, bias: Tensor | None = None, dual_range: tuple[int, int] | None = None,
                    config: dict | None = None) -> Tensor:
    """The fused DualScale GEMM (see ``scaled_gemm``)."""
    return scaled_gemm(q, weight, s_pos, w_scale, out_dtype, bias=bias, s_neg=s_neg, dual_range=dual_range,
                       config=config)
