"""Plain layers on torchao's own configs: a layer the plan neither segments, dual-scales, shifts nor smooths, with
per-channel weights and dynamic per-token activations, is what torchao's dynamic configs do; it gets their tensor
(``Int8Tensor``, ``Float8Tensor``) and kernels instead of a ``SegQuantTensor``.

Static layers stay on ``SegQuantTensor``: torchao 0.18's ``Int8StaticActivationInt8WeightConfig`` asserts that
its scale has the activation's rank (a transformer's 3-D activations fail in ``Int8Tensor.from_hp``), and its
static float8 config is a prototype that refuses CPU tensors; the static fp8 path here is also the one
``benchmarks/speed.py`` measures.

Plain int8 layers on CUDA stay on ``SegQuantTensor`` as well: under ``torch.compile`` torchao 0.18's ``Int8Tensor``
lowers to ``torch._int_mm``, which needs more than 16 rows, so a layer that sees one row per image (FLUX's pooled
text and timestep embedders at batch 2) fails to run (H200, ``benchmarks/torchao_gpu_roundtrip.py``); SegQuant's
int8 GEMM pads small M."""

from __future__ import annotations

import torch
from torchao.core.config import AOBaseConfig

from .tensor import SegLinearSpec


def fp8_supported(device: torch.device) -> bool:
    """Whether torchao's float8 tensors run on ``device`` (CUDA compute capability 8.9 or newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def plain_config(spec: SegLinearSpec, device: torch.device) -> AOBaseConfig | None:
    """torchao's config for a plain dynamic layer on ``device``, or None where SegQuant's own tensor runs it
    (a static, segmented, DualScale, smoothed, shifted or per-tensor-weight layer; the fused kernels; fp8 where
    torchao's float8 tensors need a newer GPU)."""
    from torchao.float8.inference import Float8MMConfig
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig,
                                      Int8DynamicActivationInt8WeightConfig, PerRow)

    o = spec.options
    if (o.activation != "dynamic" or o.weight_granularity != "per_channel" or o.kernel != "naive"
            or len(spec.in_segments) != 1 or spec.dual_segments or spec.smoothed or spec.shift is not None):
        return None
    if o.precision == "int8":  # on CUDA, see the module docstring
        return None if device.type == "cuda" else Int8DynamicActivationInt8WeightConfig()
    if fp8_supported(device):
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(),
                                                         mm_config=Float8MMConfig(use_fast_accum=o.fast_accum))
    return None
