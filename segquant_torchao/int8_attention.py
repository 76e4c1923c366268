"""INT8 ``Q K^T`` attention (SageAttention's numerics) as a Triton flash-attention kernel: Q and K as int8 codes with
one scale per head and 64-token block (K centred over the keys first), ``S = (q k^T) * s_q * s_k`` from an int32
dot, an online softmax in float32 and ``P V`` in fp16 (as SageAttention; fp16 rather than bf16 also keeps the
kernel checkable on Triton's CPU interpreter, which has no bf16 dot). The numbers are those of
``segquant.attention.fp8_attention`` with ``FP8AttentionSpec(qk_format="int8", granularity="per_block",
v_format=None)``, apart from P and V in fp16:
on mnist-flux that spec costs -0.09 dB [-0.40, +0.25] on top of the FP8 recipe
(benchmarks/results/fp8_attention_quality.md). No mask, no dropout, not causal.

``int8_attention`` runs the kernel on CUDA (and on Triton's interpreter for CPU tensors when
``TRITON_INTERPRET=1``), the float reference otherwise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from segquant import SegQuantError
from segquant.attention import FP8AttentionSpec, block_codes, fp8_attention

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton
    HAS_TRITON = False

BLOCK = 64
"""Tokens per Q/K scale block, and the kernel's tile along both sequence dims."""
REFERENCE_SPEC = FP8AttentionSpec(qk_format="int8", granularity="per_block", v_format=None, block=BLOCK)


def quantize_per_block(x: Tensor, block: int = BLOCK) -> tuple[Tensor, Tensor]:
    """``x`` ``(B, H, S, D)`` -> int8 codes ``(B, H, S_pad, D)`` (zero rows past S) and float32 scales
    ``(B, H, S_pad / block)``: the reference's codes (``segquant.attention.block_codes``), as int8."""
    codes, scale = block_codes(x, "int8", block)
    return codes.to(torch.int8), scale


TILES = ((64, 64), (128, 64), (64, 128), (128, 128))
"""(rows of Q, keys) per program the CUDA autotuner tries: multiples of ``BLOCK``, each row and key reading the
scale of its own block."""

if HAS_TRITON:

    @triton.jit
    def _int8_attention_kernel(q_ptr, k_ptr, v_ptr, qs_ptr, ks_ptr, o_ptr, S_Q, S_K, SQ_PAD, SK_PAD, qk_scale,
                               stride_qh, stride_qs, stride_kh, stride_ks, stride_vh, stride_vs, stride_oh, stride_os,
                               HEAD_DIM: tl.constexpr, SCALE_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        n_qscales = SQ_PAD // SCALE_BLOCK
        n_kscales = SK_PAD // SCALE_BLOCK
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        rows = offs_m < SQ_PAD  # codes are zero-padded to whole scale blocks; a tile may reach past them
        q = tl.load(q_ptr + bh * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :], mask=rows[:, None],
                    other=0)
        # qk_scale holds 1/sqrt(d) * log2(e): the softmax runs on exp2
        q_scale = tl.load(qs_ptr + bh * n_qscales + offs_m // SCALE_BLOCK, mask=rows, other=0.0) * qk_scale
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
        for start in range(0, S_K, BLOCK_N):
            keys = start + offs_n
            padded = keys < SK_PAD
            k = tl.load(k_ptr + bh * stride_kh + keys[:, None] * stride_ks + offs_d[None, :], mask=padded[:, None],
                        other=0)
            k_scale = tl.load(ks_ptr + bh * n_kscales + keys // SCALE_BLOCK, mask=padded, other=0.0)
            s = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32) * q_scale[:, None] * k_scale[None, :]
            s = tl.where((keys < S_K)[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + bh * stride_vh + keys[:, None] * stride_vs + offs_d[None, :],
                        mask=(keys < S_K)[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v.to(tl.float16), out_dtype=tl.float32)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(o_ptr + bh * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=(offs_m < S_Q)[:, None])

    _tuned_kernel = triton.autotune(
        configs=[triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=st)
                 for m, n in TILES for w in (4, 8) for st in (2, 3, 4) if not (m == 128 and n == 128 and st == 4)],
        key=["S_Q", "S_K", "HEAD_DIM"])(_int8_attention_kernel)


def _kernel_usable(t: Tensor) -> bool:
    if not HAS_TRITON:
        return False
    interpreting = type(_int8_attention_kernel).__name__ == "InterpretedFunction"
    return t.is_cuda or (interpreting and t.device.type == "cpu")


def tuned_config() -> dict | None:
    """The CUDA autotuner's latest choice for ``int8_attention`` (tiles, warps, stages), None before it has tuned
    (or without triton): what benchmarks record next to their timings."""
    best = getattr(_tuned_kernel, "best_config", None) if HAS_TRITON else None
    if best is None:
        return None
    return dict(best.kwargs, num_warps=best.num_warps, num_stages=best.num_stages)


def int8_attention(query: Tensor, key: Tensor, value: Tensor, scale: float | None = None,
                   tiles: tuple[int, int] | None = None) -> Tensor:
    """Attention with INT8 ``Q K^T`` (per-64-token-block scales, K centred) and an fp16 ``P V``.

    Args:
        query: ``(B, H, S_q, D)``; key, value: ``(B, H, S_k, D)``; D a power of two from 16 to 256.
        scale: the logits' scale; default ``1 / sqrt(D)``.
        tiles: ``(rows, keys)`` per program, each a multiple of ``BLOCK`` (one of ``TILES``); default: the
            autotuner's choice on CUDA, ``(BLOCK, BLOCK)`` on the interpreter.
    Returns:
        ``(B, H, S_q, D)`` in ``query.dtype``.
    Raises:
        SegQuantError: on shapes that do not fit or an unsupported head dim.
    """
    if any(t.dim() != 4 for t in (query, key, value)) or query.shape[:2] != key.shape[:2] \
            or key.shape != value.shape or query.shape[-1] != key.shape[-1]:
        raise SegQuantError(f"int8_attention takes (B, H, S, D) query, key and value of one batch, head count and "
                            f"head dim; got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    d = query.shape[-1]
    if d < 16 or d > 256 or d & (d - 1):
        raise SegQuantError(f"int8_attention needs a head dim that is a power of two from 16 to 256, got {d}")
    if tiles is not None and tuple(tiles) not in TILES:
        raise SegQuantError(f"int8_attention tiles must be one of {list(TILES)}, got {tiles}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if not _kernel_usable(query):
        return fp8_attention(query, key, value, REFERENCE_SPEC, scale, layout="bhsd")
    b, h, s_q, _ = query.shape
    s_k = key.shape[2]
    key = key.float() - key.float().mean(dim=2, keepdim=True)
    q8, q_scale = quantize_per_block(query)
    k8, k_scale = quantize_per_block(key)
    q8, k8 = q8.reshape(b * h, -1, d), k8.reshape(b * h, -1, d)
    v = value.to(torch.float16).reshape(b * h, s_k, d).contiguous()
    out = torch.empty(b * h, s_q, d, dtype=query.dtype, device=query.device)
    launch = (q8, k8, v, q_scale.contiguous(), k_scale.contiguous(), out, s_q, s_k, q8.shape[1], k8.shape[1],
              scale * math.log2(math.e), q8.stride(0), q8.stride(1), k8.stride(0), k8.stride(1),
              v.stride(0), v.stride(1), out.stride(0), out.stride(1))
    if query.is_cuda and tiles is None:
        _tuned_kernel[lambda meta: (triton.cdiv(s_q, meta["BLOCK_M"]), b * h)](*launch, HEAD_DIM=d, SCALE_BLOCK=BLOCK)
    else:
        block_m, block_n = tiles or (BLOCK, BLOCK)
        _int8_attention_kernel[(triton.cdiv(s_q, block_m), b * h)](*launch, HEAD_DIM=d, SCALE_BLOCK=BLOCK,
                                                                   BLOCK_M=block_m, BLOCK_N=block_n)
    return out.reshape(b, h, s_q, d)
