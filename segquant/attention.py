"""Low-precision attention, the reference numerics: what an FP8 attention kernel (cuDNN's FP8 SDPA, an FP8
flash-attention kernel) or an INT8 ``Q K^T`` one (SageAttention's) computes, in float32, so that its quality can
be measured on any device before a kernel runs.

``Q``, ``K`` and ``V`` are quantized to FP8 e4m3 with dynamic scales (one per head, or one per tensor); ``K`` is
first centred over the keys (softmax is invariant to a per-query shift of the logits, and
``q . (k - m) = q . k - q . m`` shifts every logit of a query by the same amount, so centring changes nothing but
the range that FP8 must cover); the softmax probabilities ``P`` are quantized to e4m3 before ``P V`` (in [0, 1],
one scale of 1/448), as FP8 kernels feed the second GEMM.

``fp8_attention_scope(model)`` makes a diffusers model's attention use these numerics during its forward passes
(the attention processors' ``dispatch_attention_fn``, and ``F.scaled_dot_product_attention``), for evaluation;
``fp8_attention_scope(model, attend=kernel)`` routes it to a kernel instead (a backend's FP8 attention kernel).
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import SegQuantError
from .formats import fake_quant, quantize, scale_from_amax

GRANULARITIES = ("per_head", "per_tensor", "per_block")
QK_FORMATS = ("fp8", "int8")
V_FORMATS = ("fp8", None)


@dataclass(frozen=True)
class FP8AttentionSpec:
    """How the low-precision attention quantizes.

    Attributes:
        granularity: the dynamic scales of Q and K: ``per_head`` (one per batch item and head), ``per_tensor``, or
            ``per_block`` (one per head and block of ``block`` tokens, as SageAttention does). V always gets one
            per head (one per tensor with ``per_tensor``).
        block: tokens per scale block with ``per_block``.
        qk_format: the codes of Q and K: ``fp8`` (e4m3) or ``int8`` (the ``Q K^T`` GEMM in INT8).
        v_format: ``fp8`` (e4m3 V and, with ``quantize_p``, P: an FP8 ``P V``) or None (``P V`` in float).
        center_k: subtract each head's mean key (over the keys) before quantizing K.
        quantize_p: quantize the softmax probabilities to e4m3 before an FP8 ``P V``.
    """

    granularity: str = "per_head"
    center_k: bool = True
    quantize_p: bool = True
    qk_format: str = "fp8"
    v_format: str | None = "fp8"
    block: int = 64

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise SegQuantError(f"FP8 attention granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.qk_format not in QK_FORMATS:
            raise SegQuantError(f"FP8 attention qk_format must be one of {QK_FORMATS}, got {self.qk_format!r}")
        if self.v_format not in V_FORMATS:
            raise SegQuantError(f"FP8 attention v_format must be 'fp8' or None, got {self.v_format!r}")
        if self.block < 1:
            raise SegQuantError(f"FP8 attention block must be >= 1 token, got {self.block}")


def block_codes(x: Tensor, fmt: str, block: int) -> tuple[Tensor, Tensor]:
    """``x`` ``(B, H, S, D)`` on ``fmt``'s grid with one dynamic scale per head and block of ``block`` tokens: the
    codes ``(B, H, S_pad, D)`` as float32 values (zero rows past S) and the scales ``(B, H, S_pad / block)``. An
    attention kernel takes these codes and scales; the reference multiplies them back."""
    b, h, s, d = x.shape
    pad = -s % block
    blocks = F.pad(x.float(), (0, 0, 0, pad)).reshape(b, h, (s + pad) // block, block, d)
    scale = scale_from_amax(blocks.abs().amax(dim=(3, 4)), fmt)
    return quantize(blocks, scale[..., None, None], fmt).reshape(b, h, s + pad, d), scale


def head_codes(x: Tensor, fmt: str) -> tuple[Tensor, Tensor]:
    """``x`` ``(B, H, S, D)`` on ``fmt``'s grid with one dynamic scale per batch item and head: the codes as float32
    values and the scales ``(B, H)``. An attention kernel takes these codes and scales; the reference multiplies
    them back."""
    scale = scale_from_amax(x.float().abs().amax(dim=(2, 3)), fmt)
    return quantize(x, scale[..., None, None], fmt), scale


def _fake(x: Tensor, fmt: str, granularity: str, block: int) -> Tensor:
    """``x`` ``(B, H, S, D)`` through ``fmt`` with dynamic scales of ``granularity``."""
    if granularity == "per_tensor":
        return fake_quant(x, scale_from_amax(x.abs().amax(), fmt), fmt)
    if granularity == "per_head":
        codes, scale = head_codes(x, fmt)
        return (codes * scale[..., None, None]).to(x.dtype)
    codes, scale = block_codes(x, fmt, block)
    return (codes * scale.repeat_interleave(block, dim=2)[..., None])[:, :, :x.shape[2]].to(x.dtype)


def fp8_attention(query: Tensor, key: Tensor, value: Tensor, spec: FP8AttentionSpec = FP8AttentionSpec(),
                  scale: float | None = None, layout: str = "bshd") -> Tensor:
    """Attention with FP8 Q, K, V (and P), no mask, no dropout.

    Args:
        query, key, value: ``(B, S, H, D)`` (``layout="bshd"``, diffusers' ``dispatch_attention_fn``) or
            ``(B, H, S, D)`` (``"bhsd"``, ``F.scaled_dot_product_attention``); keys and values may have their own
            sequence length.
        scale: the logits' scale; default ``1 / sqrt(D)``.
    Returns:
        The output in ``query``'s layout and dtype.
    Raises:
        SegQuantError: on another layout, or tensors that are not 4-D with matching batch, heads and head dim.
    """
    if layout not in ("bshd", "bhsd"):
        raise SegQuantError(f"FP8 attention layout must be 'bshd' or 'bhsd', got {layout!r}")
    if any(t.dim() != 4 for t in (query, key, value)):
        raise SegQuantError(f"FP8 attention takes 4-D query, key and value, got {tuple(query.shape)}, "
                            f"{tuple(key.shape)}, {tuple(value.shape)}")
    q, k, v = (t.float() if layout == "bhsd" else t.float().transpose(1, 2) for t in (query, key, value))
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise SegQuantError(f"FP8 attention: query {tuple(query.shape)}, key {tuple(key.shape)} and value "
                            f"{tuple(value.shape)} do not fit ({layout})")
    if spec.center_k:
        k = k - k.mean(dim=2, keepdim=True)
    q, k = (_fake(t, spec.qk_format, spec.granularity, spec.block) for t in (q, k))
    logits = (q @ k.transpose(-1, -2)) * (scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    p = torch.softmax(logits, dim=-1)
    if spec.v_format is not None:
        v = _fake(v, spec.v_format, "per_tensor" if spec.granularity == "per_tensor" else "per_head", spec.block)
        if spec.quantize_p:
            p = fake_quant(p, torch.tensor(1.0 / 448.0), "fp8")
    out = p @ v
    return (out if layout == "bhsd" else out.transpose(1, 2)).to(query.dtype)


Attend = Callable[[Tensor, Tensor, Tensor, "float | None"], Tensor]
"""An attention kernel: ``(query, key, value, scale) -> output``, all ``(B, S, H, D)``, no mask."""


def _reference(spec: FP8AttentionSpec) -> Attend:
    return lambda query, key, value, scale: fp8_attention(query, key, value, spec, scale, layout="bshd")


def _instead_of(original, attend: Attend, layout: str):
    """An SDPA-signature function that runs ``attend`` on ``layout`` tensors (``bhsd`` ones as ``(B, S, H, D)``
    views); a call with a mask, dropout, a causal mask or grouped-query heads goes to ``original``."""

    def call(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if attn_mask is not None or dropout_p or is_causal or kwargs.get("enable_gqa"):
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, **kwargs)
        if layout == "bshd":
            return attend(query, key, value, scale)
        return attend(*(t.transpose(1, 2) for t in (query, key, value)), scale).transpose(1, 2)

    return call


@contextlib.contextmanager
def _patched(model: torch.nn.Module, attend: Attend) -> Iterator[None]:
    """During the block: ``F.scaled_dot_product_attention`` (``(B, H, S, D)``) and the ``dispatch_attention_fn``
    (``(B, S, H, D)``) of every module that defines one of the model's attention processors run ``attend``."""
    owners = [(F, "scaled_dot_product_attention", "bhsd")]
    modules = {type(m.processor).__module__ for m in model.modules() if hasattr(m, "processor")}
    owners += [(sys.modules[name], "dispatch_attention_fn", "bshd") for name in sorted(modules)
               if hasattr(sys.modules.get(name), "dispatch_attention_fn")]
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in owners]
    try:
        for (owner, attr, layout), (_, _, original) in zip(owners, saved):
            setattr(owner, attr, _instead_of(original, attend, layout))
        yield
    finally:
        for owner, attr, original in saved:
            setattr(owner, attr, original)


class fp8_attention_scope:  # noqa: N801 - used like a function: ``with fp8_attention_scope(model): ...``
    """Run ``model``'s attention with FP8 numerics (``fp8_attention`` with ``spec``: float32 math with FP8
    rounding, for evaluation) or through ``attend`` (a low-precision kernel, which owns its numerics), inside a
    ``with`` block, or, after ``enable()``, in every forward pass until ``disable()`` (forward pre/post hooks)."""

    def __init__(self, model: torch.nn.Module, spec: FP8AttentionSpec | None = None, attend: Attend | None = None):
        if not any(hasattr(m, "processor") for m in model.modules()):
            raise SegQuantError(f"{type(model).__name__} has no attention processors (a diffusers model has them)")
        if spec is not None and attend is not None:
            raise SegQuantError("fp8_attention_scope takes a spec (the reference numerics) or a kernel, not both: "
                                "a kernel owns its numerics")
        if attend is not None and not callable(attend):
            raise SegQuantError(f"fp8_attention_scope: attend must be callable, got {type(attend).__name__}")
        if attend is None:
            spec = spec if spec is not None else FP8AttentionSpec()
            attend = _reference(spec)
        self.model, self.spec, self.attend = model, spec, attend
        self._stack: contextlib.ExitStack | None = None
        self._hooks: list = []

    def __enter__(self) -> fp8_attention_scope:
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(_patched(self.model, self.attend))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._stack = None

    def enable(self) -> fp8_attention_scope:
        """Patch around every forward pass of the model (pre-hook enters, post-hook leaves)."""
        if self._hooks:
            return self
        self._hooks = [self.model.register_forward_pre_hook(self._before),
                       self.model.register_forward_hook(self._after, always_call=True)]
        return self

    def _before(self, *_) -> None:  # a pre-hook that returns something replaces the forward's arguments
        self.__enter__()

    def _after(self, *_) -> None:
        if self._stack is not None:
            self.__exit__()

    def disable(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
