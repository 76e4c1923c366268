"""FP8 attention on Hopper through FlashAttention-3's e4m3 forward kernel (the ``flash_attn_3`` extension).

Q, K and V are quantized to e4m3 with one dynamic scale per batch item and head, K first centred over the keys,
exactly as ``segquant.attention``'s reference quantizes them with ``FP8AttentionSpec()`` (``fp8_codes`` gives the
same values); the kernel takes the codes with the scales as its ``descale`` inputs and returns bf16. Its softmax
probabilities are rounded to e4m3 with a fixed offset of 2^8 rather than the reference's 448, so the outputs
differ from the reference by that rounding (attention_bench.md measures both against float32 attention).

FlashAttention-3 ships no wheel: ``benchmarks/fa3_build.py`` builds the reduced extension used here (forward
only, head dim 128, bf16 and e4m3, sm_90a) from its ``hopper/`` sources. ``load_fa3`` loads an installed
``flash_attn_3`` or a built library; ``fa3_fp8_attention`` is a custom op to torch.compile, so that the
quantization around it fuses into the kernels that produce Q, K and V.

    load_fa3("build/_C.so")
    scope = fp8_attention_scope(model, attend=fa3_fp8_attention).enable()
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from segquant.attention import head_codes
from segquant.errors import SegQuantError

E4M3 = torch.float8_e4m3fn


def fa3_loaded() -> bool:
    """Whether ``torch.ops.flash_attn_3.fwd`` is registered (an imported ``flash_attn_3`` or a loaded library)."""
    try:
        torch.ops.flash_attn_3.fwd
    except (AttributeError, RuntimeError):
        return False
    return True


def load_fa3(library: str | os.PathLike | None = None) -> None:
    """Register FlashAttention-3's operators: from ``library`` (a built ``_C.so``), else by importing an installed
    ``flash_attn_3``. Raises SegQuantError when neither is there."""
    if library is not None:
        if not os.path.isfile(library):
            raise SegQuantError(f"no FlashAttention-3 library at {library}")
        torch.ops.load_library(os.fspath(library))
    elif not fa3_loaded():
        try:
            import flash_attn_3._C  # noqa: F401 - registers torch.ops.flash_attn_3
        except ImportError as e:
            raise SegQuantError("FlashAttention-3 (flash_attn_3) is not installed: build its hopper/ extension "
                                "(benchmarks/fa3_build.py) and pass the library to load_fa3") from e
    if not fa3_loaded():
        raise SegQuantError(f"{library or 'flash_attn_3'} did not register torch.ops.flash_attn_3.fwd")


def fp8_codes(x: Tensor, centre: bool = False) -> tuple[Tensor, Tensor]:
    """``x`` ``(B, S, H, D)`` as e4m3 codes and its scales ``(B, H)`` (float32, one per batch item and head),
    centred over the tokens first with ``centre``: the reference's codes (``segquant.attention.head_codes``)."""
    xf = x.float()
    if centre:
        xf = xf - xf.mean(dim=1, keepdim=True)
    codes, scale = head_codes(xf.transpose(1, 2), "fp8")
    return codes.transpose(1, 2).to(E4M3), scale


@torch.library.custom_op("segquant::fa3_fp8_attention_codes", mutates_args=())
def _fa3_codes(q: Tensor, k: Tensor, v: Tensor, q_scale: Tensor, k_scale: Tensor, v_scale: Tensor,
               softmax_scale: float) -> Tensor:
    return torch.ops.flash_attn_3.fwd(q, k, v, q_descale=q_scale, k_descale=k_scale, v_descale=v_scale,
                                      softmax_scale=softmax_scale, num_splits=1, pack_gqa=False)[0]


@_fa3_codes.register_fake
def _(q, k, v, q_scale, k_scale, v_scale, softmax_scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=torch.bfloat16)


def fa3_fp8_attention(query: Tensor, key: Tensor, value: Tensor, scale: float | None = None) -> Tensor:
    """Attention of ``(B, S, H, D)`` query, key and value (bf16 or fp16, no mask) with FlashAttention-3's e4m3
    kernel; returns ``query``'s dtype. ``scale`` is the logits' (default ``1 / sqrt(D)``). An ``Attend`` for
    ``segquant.attention.fp8_attention_scope``."""
    if any(t.dim() != 4 for t in (query, key, value)):
        raise SegQuantError(f"fa3_fp8_attention takes (B, S, H, D) query, key and value, got {tuple(query.shape)}, "
                            f"{tuple(key.shape)}, {tuple(value.shape)}")
    b, _, h, d = query.shape
    if key.shape[0] != b or key.shape[2] != h or key.shape[3] != d or value.shape[:3] != key.shape[:3]:
        raise SegQuantError(f"fa3_fp8_attention: query {tuple(query.shape)}, key {tuple(key.shape)} and value "
                            f"{tuple(value.shape)} do not fit (B, S, H, D)")
    if query.dtype not in (torch.bfloat16, torch.float16):
        raise SegQuantError(f"fa3_fp8_attention takes bf16 or fp16 inputs, got {query.dtype}")
    (q, qs), (k, ks), (v, vs) = fp8_codes(query), fp8_codes(key, centre=True), fp8_codes(value)
    out = _fa3_codes(q, k, v, qs, ks, vs, scale if scale is not None else d ** -0.5)
    return out.to(query.dtype)
