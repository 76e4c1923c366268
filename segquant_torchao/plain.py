"""Plain layers on torchao's own configs: a layer the plan neither segments nor dual-scales, with dynamic
per-token activations and per-channel weights, is exactly what torchao's dynamic configs do; it gets their
tensor (``Int8Tensor``, ``Float8Tensor``) and kernels instead of a ``SegQuantTensor``."""

from __future__ import annotations

import torch
from torchao.core.config import AOBaseConfig

from .tensor import SegLinearSpec


def fp8_supported(device: torch.device) -> bool:
    """Whether torchao's float8 tensors run on ``device`` (CUDA compute capability 8.9 or newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def plain_config(spec: SegLinearSpec, device: torch.device) -> AOBaseConfig | None:
    """torchao's config for a plain dynamic layer on ``device``, or None where SegQuant's own tensor runs it
    (a segmented, DualScale, smoothed, per-tensor or static layer; the fused kernels; fp8 where torchao's float8
    tensors need a newer GPU)."""
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig,
                                      Int8DynamicActivationInt8WeightConfig, PerRow)
    from torchao.float8.inference import Float8MMConfig

    o = spec.options
    if (o.activation != "dynamic" or o.weight_granularity != "per_channel" or o.kernel != "naive"
            or len(spec.in_segments) != 1 or spec.dual_segments or spec.smoothed):
        return None
    if o.precision == "int8":
        return Int8DynamicActivationInt8WeightConfig()
    if fp8_supported(device):
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(),
                                                         mm_config=Float8MMConfig(use_fast_accum=o.fast_accum))
    return None
