"""``SegQuantOptions``: every option of a SegQuant torchao layer, declared once.

``SegLinearConfig``, ``SegQuantConfig`` and the converted layer's ``LayerSpec`` all hold one of these; the
allowed values and defaults come from ``segquant.options`` and the precision registry.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from segquant import SegQuantError, get_precision
from segquant.options import (ACTIVATION_MODES, DEFAULT_KERNEL, DEFAULT_REALISATION, DEFAULT_SMOOTHING, KERNELS,
                              REALISATIONS, SMOOTHINGS, WEIGHT_GRANULARITIES, check_alpha, check_choice)

from .kernels import PRECISIONS as KERNEL_PRECISIONS

_KERNEL_PRECISION = {"int8": "int8", "fp8": "fp8", "fp8_e4m3": "fp8"}


@dataclass(frozen=True)
class SegQuantOptions:
    """How SegQuant layers are quantized on torchao.

    Args:
        precision: GEMM precision: ``"fp8"`` (e4m3, ``torch._scaled_mm``; default) or ``"int8"`` (``torch._int_mm``).
        activation: ``"dynamic"`` (per-token scales, no calibration; default) or ``"static"``.
        realisation: static input segments ``"split_k"`` (one GEMM per segment; default) or ``"folded"``
            into the weight (one GEMM).
        weight_granularity: ``"per_channel"`` (default) or ``"per_tensor"`` (one scale per output segment).
        fast_accum: fp8 GEMMs with Hopper's fast accumulation (default True, as torchao's fp8 inference).
        kernel: ``"naive"`` (torch's GEMMs, DualScale with M doubled; default) or ``"fused"`` (the Triton
            DualScale and int8 GEMMs of ``triton_gemm.py``; a torch fallback off CUDA).
        smoothquant_alpha: SmoothQuant alpha in [0, 1] (static activations only), or None (default).
        smoothing: ``"per_layer"`` (default) or ``"per_segment"`` SmoothQuant factors (``segquant.options.SMOOTHINGS``:
            the paper's reference code; static split-K activations, no activation shift): each output segment of a
            smoothed layer is its own sub-GEMM with its own factors, activation scales and one weight scale per
            input segment (``segquant.numerics.per_segment_linear``).
    """

    precision: str = "fp8"
    activation: str = "dynamic"
    realisation: str = DEFAULT_REALISATION
    weight_granularity: str = "per_channel"
    fast_accum: bool = True
    kernel: str = DEFAULT_KERNEL
    smoothquant_alpha: float | None = None
    smoothing: str = DEFAULT_SMOOTHING

    def __post_init__(self) -> None:
        check_choice(self.precision, KERNEL_PRECISIONS, "precision")
        check_choice(self.activation, ACTIVATION_MODES, "activation")
        check_choice(self.realisation, REALISATIONS, "realisation")
        check_choice(self.weight_granularity, WEIGHT_GRANULARITIES, "weight_granularity")
        check_choice(self.kernel, KERNELS, "kernel")
        if not isinstance(self.fast_accum, bool):
            raise SegQuantError(f"fast_accum must be true or false, got {self.fast_accum!r}")
        object.__setattr__(self, "smoothquant_alpha", check_alpha(self.smoothquant_alpha))
        if self.smoothquant_alpha is not None and self.activation == "dynamic":
            raise SegQuantError("SmoothQuant needs calibrated activation ranges: use activation='static' with "
                                "smoothquant_alpha, or drop smoothquant_alpha")
        check_choice(self.smoothing, SMOOTHINGS, "smoothing")
        if self.smoothing == "per_segment" and (self.activation, self.realisation) != ("static", "split_k"):
            raise SegQuantError(f"smoothing='per_segment' needs static activations and realisation='split_k' (got "
                                f"activation={self.activation!r}, realisation={self.realisation!r}); use "
                                f"smoothing={DEFAULT_SMOOTHING!r} or a static precision with split_k")

    def replace(self, **changes: Any) -> "SegQuantOptions":
        return dataclasses.replace(self, **changes)

    @classmethod
    def for_precision(cls, name: str, **changes: Any) -> "SegQuantOptions":
        """The options that realise a ``segquant.precision`` name (``int8_w8a8``, ``fp8`` ...), with ``changes``
        for what the precision leaves open (realisation, kernel, SmoothQuant alpha ...).

        Raises:
            SegQuantError: the precision needs a format torchao's kernels do not run (INT4 weights).
        """
        spec = get_precision(name)
        kernel_precision = _KERNEL_PRECISION.get(spec.weight_format)
        if kernel_precision is None or _KERNEL_PRECISION.get(spec.act_format) != kernel_precision:
            raise SegQuantError(f"precision {name} ({spec.weight_format} weights, {spec.act_format} activations) "
                                "has no torchao kernel here; the torchao backend runs int8 and fp8 W8A8")
        base = cls(precision=kernel_precision, activation=spec.activation, weight_granularity=spec.weight_granularity)
        fixed = {k: v for k, v in changes.items() if k in ("precision", "activation", "weight_granularity")
                 and v != getattr(base, k)}
        if fixed:
            raise SegQuantError(f"precision {name} fixes {sorted(fixed)}; got {fixed}")
        try:
            return base.replace(**changes)
        except TypeError as e:
            raise SegQuantError(f"{e}; the options are the fields of SegQuantOptions") from None
