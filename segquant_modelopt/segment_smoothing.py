"""Reference-mode arithmetic in ModelOpt's fake quantization: per-segment SmoothQuant and the reciprocal scale form.

``QuantizeOptions(smoothing="per_segment")`` and/or ``scale_form="reciprocal"`` (``segquant.reference_mode``)
quantize every static layer through ``segquant.numerics.per_segment_inputs``/``per_segment_weight``: the layer keeps its float weight, and its two
quantizers take the roles ``input_tiles`` and ``weight_tiles``:

- the input quantizer smooths ``x`` once per output block ``b`` (one block unless per-segment smoothing meets an
  output-segmented layer) and fake-quantizes each input segment with that block's ranges;
- the weight quantizer smooths the rows of block ``b`` the same way and fake-quantizes them, one scale per output
  segment, or (per-segment smoothing) per (output segment, input segment) tile.

With several blocks the input quantizer returns the blocks side by side, ``(..., B*K)``, and the weight quantizer
a block-diagonal ``(N, B*K)`` weight whose row block ``b`` holds block ``b``'s weight in columns ``b*K..``: the
Linear's one ``F.linear`` then computes ``y_b = x_hat_b @ W_hat_b.T`` for every block (the zero tiles add exact
zeros). This is a fake-quantization mode for parity with the paper's reference code: ONNX export and
checkpoints refuse it (``check_exportable``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from segquant import LinearPlan, SegmentAmaxObserver, SegQuantError
from segquant.calib import segment_calibration, static_calibration
from segquant.numerics import ActivationStats, QuantFormat, fake_quant, per_segment_inputs, per_segment_weight, \
    scale_from_amax, smooth_weight, weight_amax
from segquant.options import DEFAULT_SCALE_FORM, DEFAULT_SMOOTHING

ROLES = ("input_tiles", "weight_tiles")


def is_reference_arithmetic(smoothing: str, scale_form: str) -> bool:
    """True when the options need this module (anything but per-layer smoothing in the step form)."""
    return (smoothing, scale_form) != (DEFAULT_SMOOTHING, DEFAULT_SCALE_FORM)


@dataclass
class ReferenceSettings:
    """Calibrated state of one layer: ``factors`` ``(B, K)`` (ones without smoothing), one ``ActivationStats`` per
    block, whether weight scales are per input-segment tile, and the scale form."""

    layer: LinearPlan
    factors: Tensor
    stats: list[ActivationStats]
    tiled: bool
    per_channel: bool
    form: str


def reference_settings(name: str, module: nn.Module, layer: LinearPlan, observer: SegmentAmaxObserver,
                       alpha: float | None, smoothing: str, form: str) -> ReferenceSettings:
    """The settings of one static layer (nothing is changed yet)."""
    if layer.shift is not None:
        raise SegQuantError(f"{name}: smoothing={smoothing!r}, scale_form={form!r} (reference mode) has no "
                            "activation shift; drop the shift from the plan (plan.ablate(shift=False))")
    w = module.weight.detach().float()
    per_channel = module.weight_quantizer.axis == 0
    if alpha is None:
        return ReferenceSettings(layer, torch.ones(1, layer.in_features, device=w.device), [observer.stats()],
                                 False, per_channel, form)
    if smoothing == "per_segment":
        factors, stats = segment_calibration(observer, w, layer, alpha, form)
        return ReferenceSettings(layer, factors, stats, True, per_channel, form)
    stats, factors = static_calibration(observer, w, alpha, form)
    return ReferenceSettings(layer, factors[None], [stats], False, per_channel, form)


def apply_reference(module: nn.Module, s: ReferenceSettings) -> None:
    """Give the layer's quantizers (already ``segquant_modelopt.quantizer.mark``-ed) the ``input_tiles`` and
    ``weight_tiles`` roles of ``s``."""
    layer = s.layer
    device = module.weight.device
    factors = s.factors.to(device)
    weights = module.weight_quantizer
    weights._segquant_role = "weight_tiles"
    weights._segquant_out_segments = list(layer.out_segments)
    weights._segquant_segments = list(layer.in_segments)
    weights._segquant_dual_segments = []
    weights._segquant_folded = False
    weights._segquant_weight_granularity = "per_channel" if s.per_channel else "per_tensor"
    weights._segquant_tiled = s.tiled
    weights._segquant_scale_form = s.form
    weights._set_buffer("_segquant_tile_factors", factors)
    _set_amax(weights, weight_amax(smooth_weight(module.weight.detach(), factors[0], s.form), layer.out_segments,
                                   s.per_channel).to(device), 0)
    inputs = module.input_quantizer
    inputs._segquant_role = "input_tiles"
    inputs._segquant_segments = list(layer.in_segments)
    inputs._segquant_dual_segments = list(layer.dual_scale_segments) if layer.dual_scale else []
    inputs._segquant_out_segments = list(layer.out_segments)
    inputs._segquant_folded = False
    inputs._segquant_scale_form = s.form
    inputs._set_buffer("_segquant_tile_factors", factors)
    for key, field in (("_segquant_tile_amax", "amax"), ("_segquant_tile_pos", "pos_amax"),
                       ("_segquant_tile_neg", "neg_amax")):
        inputs._set_buffer(key, torch.stack([getattr(st, field) for st in s.stats]).to(device))
    _set_amax(inputs, inputs._segquant_tile_amax.amax().reshape(()), None)


def _set_amax(quantizer: nn.Module, amax: Tensor, axis: int | None) -> None:
    if hasattr(quantizer, "_amax"):
        delattr(quantizer, "_amax")
    quantizer.axis = axis
    quantizer.amax = amax


def _plan(q: nn.Module, in_features: int, out_features: int) -> LinearPlan:
    dual = list(getattr(q, "_segquant_dual_segments", []))
    return LinearPlan(in_features, out_features, tuple(q._segquant_segments), tuple(q._segquant_out_segments),
                      dual_scale=bool(dual), dual_scale_segments=tuple(dual))


def tiles_forward(q: nn.Module, fmt: QuantFormat, x: Tensor) -> Tensor:
    """The fake quantization of a quantizer with an ``input_tiles`` or ``weight_tiles`` role."""
    factors = q._segquant_tile_factors
    blocks = factors.shape[0]
    if q._segquant_role == "weight_tiles":
        layer = _plan(q, x.shape[1], x.shape[0])
        per_channel = q._segquant_weight_granularity == "per_channel"
        if q._segquant_tiled:
            parts = per_segment_weight(x, layer, factors, fmt, per_channel, q._segquant_scale_form)
        else:
            w = smooth_weight(x, factors[0], q._segquant_scale_form)
            amax = weight_amax(w, layer.out_segments, per_channel)
            parts = [fake_quant(w, scale_from_amax(amax, fmt, form=q._segquant_scale_form), fmt,
                                q._segquant_scale_form)]
        if blocks == 1:
            return torch.cat(parts, dim=0).to(x.dtype)
        out = x.new_zeros(x.shape[0], blocks * x.shape[1], dtype=torch.float32)
        row = 0
        for b, part in enumerate(parts):
            out[row:row + part.shape[0], b * x.shape[1]:(b + 1) * x.shape[1]] = part
            row += part.shape[0]
        return out.to(x.dtype)
    layer = _plan(q, x.shape[-1], sum(q._segquant_out_segments))
    stats = [ActivationStats(a, p, n) for a, p, n in zip(q._segquant_tile_amax, q._segquant_tile_pos,
                                                        q._segquant_tile_neg)]
    if blocks == 1:
        layer = layer.replace(out_segments=())
    parts = per_segment_inputs(x, layer, stats, factors, fmt, q._segquant_scale_form)
    return torch.cat(parts, dim=-1).to(x.dtype)


def check_exportable(model: nn.Module) -> None:
    """Refuse ONNX export and checkpoints of a model quantized in reference mode (a fake-quantization mode)."""
    found = [n for n, m in model.named_modules() if getattr(m, "_segquant_role", None) in ROLES]
    if found:
        raise SegQuantError(f"{found[0]} ({len(found)} quantizers) was quantized with per-segment smoothing or the "
                            "reciprocal scale form (segquant.reference_mode), a fake-quantization mode for parity "
                            "with the paper's reference code: it has no ONNX export or checkpoint. Quantize with "
                            "the default QuantizeOptions to export")


__all__ = ["ReferenceSettings", "apply_reference", "check_exportable", "is_reference_arithmetic",
           "reference_settings", "tiles_forward"]
