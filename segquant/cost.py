"""Cost-aware plans: keep DualScale and input segments only where their SQNR gain pays for their time.

Per layer, the gain of a feature is the SQNR (dB, against the float layer on calibration inputs) with the
whole plan entry minus the SQNR with that one feature switched off (a marginal gain; segments and DualScale
are judged independently). Its cost is the extra GEMM time it adds, as a fraction of the model's total
quantized GEMM time, from a FLOP model (``CostModel``) or from measured per-layer factors:
- DualScale, naive M-doubled GEMM (``folded`` realisation): one more full GEMM per DualScale segment;
- DualScale on split-K segments (``split_k``/dynamic): the DualScale segments' share of K done twice;
- DualScale on the fused kernel: that share times the measured ``fused_dual_factor`` (1.0 = MMA doubled);
- input segments: free when folded into the weight, ``segment_overhead`` of the layer per extra split-K GEMM.
A feature is kept when ``gain > 0`` and ``gain / (100 * cost) >= threshold`` (dB per percent of GEMM time).

Example:
    >>> inputs = capture_linear_inputs(model, calibration_batches)
    >>> gains = layer_gains(model, plan, inputs, QuantSpec("fp8", "per_channel", "fp8"))
    >>> plan2 = select(plan, gains, CostModel(kernel="fused", fused_dual_factor=0.4), threshold=0.5)
    >>> for p in sweep(plan, gains, CostModel(), [0, 0.1, 1, 10]): print(p)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .errors import SegQuantError
from .options import DEFAULT_KERNEL, DEFAULT_REALISATION, KERNELS, REALISATIONS, check_choice
from .numerics import QuantSpec, activation_stats, reference_linear, sqnr_db
from .plan import LinearPlan, SegQuantPlan
from .recording import record_linears

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class LayerGain:
    """What DualScale and input segments buy on one layer.

    Args:
        name: module name.
        tokens: rows (M) of the calibration input, for the FLOP model.
        sqnr_db: SQNR of the full plan entry against the float layer.
        dual_gain_db: SQNR gain of DualScale (0 when the entry has none).
        seg_gain_db: SQNR gain of the input segments (0 when unsegmented).
    """

    name: str
    tokens: int
    sqnr_db: float
    dual_gain_db: float = 0.0
    seg_gain_db: float = 0.0


@dataclass(frozen=True)
class CostModel:
    """Extra GEMM time of DualScale and segments, relative to the layer's plain quantized GEMM.

    Args:
        kernel: ``"naive"`` (torch's GEMMs) or ``"fused"`` (the Triton DualScale GEMM). Default naive.
        realisation: static input segments ``"split_k"`` (default, as everywhere) or ``"folded"`` (one GEMM:
            what the torchao speed benchmark runs); dynamic scales are split-K.
        fused_dual_factor: extra time of the fused kernel's DualScale share, per unit of that share's plain
            GEMM time; measure it (``kernel_bench.py``: fused / plain - 1 on a fully DualScale layer). Default 1.
        segment_overhead: extra time per additional split-K GEMM, as a fraction of the layer. Default 0.1.
        tokens: M for layers absent from the gains (default 4608, FLUX at 1024x1024).
        measured: ``{layer: (dual_extra, seg_extra)}`` relative extra times that replace the model's.
    """

    kernel: str = DEFAULT_KERNEL
    realisation: str = DEFAULT_REALISATION
    fused_dual_factor: float = 1.0
    segment_overhead: float = 0.1
    tokens: int = 4608
    measured: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice(self.kernel, KERNELS, "CostModel.kernel")
        check_choice(self.realisation, REALISATIONS, "CostModel.realisation")
        if self.fused_dual_factor < 0 or self.segment_overhead < 0:
            raise SegQuantError("CostModel factors must be non-negative")

    def base(self, layer: LinearPlan, tokens: int) -> float:
        """FLOPs of the layer's plain GEMM."""
        return 2.0 * tokens * layer.in_features * layer.out_features

    def extra(self, layer: LinearPlan) -> tuple[float, float]:
        """``(DualScale, segments)`` extra time of ``layer`` relative to its plain GEMM."""
        if layer.name in self.measured:
            dual, seg = self.measured[layer.name]
            return float(dual), float(seg)
        dual = 0.0
        if layer.dual_scale:
            share = sum(layer.in_segments[i] for i in layer.dual_scale_segments) / layer.in_features
            if self.kernel == "fused":
                dual = self.fused_dual_factor * share
            elif self.realisation == "folded":
                dual = float(len(layer.dual_scale_segments))
            else:
                dual = share
        seg = 0.0
        if len(layer.in_segments) > 1 and self.realisation == "split_k":
            seg = self.segment_overhead * (len(layer.in_segments) - 1)
        return dual, seg


@dataclass(frozen=True)
class SweepPoint:
    """One threshold of ``sweep``: the features kept, their summed gain and their extra time."""

    threshold: float
    extra_time: float  # fraction of the plan's plain GEMM time
    gain_db: float
    dual_layers: int
    segmented_layers: int


def _merge_input_segments(layer: LinearPlan) -> LinearPlan:
    """The entry with one input segment (``LinearPlan.without_segments``: DualScale stays only if every merged
    segment had it). Output segments stay: the cost model prices input segments only, output ones are free."""
    return layer.without_segments().replace(out_segments=layer.out_segments)


def _kept(layer: LinearPlan, dual: bool, segments: bool) -> LinearPlan:
    """``layer`` with its input segments merged unless ``segments`` is kept and DualScale off unless ``dual``."""
    if len(layer.in_segments) > 1 and not segments:
        layer = _merge_input_segments(layer)
    if layer.dual_scale and not dual:
        layer = layer.replace(dual_scale=False)
    return layer


def _sqnr(x: Tensor, linear: nn.Linear, layer: LinearPlan, spec: QuantSpec, exact: Tensor) -> float:
    stats = None if spec.act_granularity == "per_token" else activation_stats(x, layer.in_segments)
    if spec.realisation == "folded" and stats is None:
        spec = QuantSpec(spec.weight_format, spec.weight_granularity, spec.act_format, spec.act_granularity, "split_k")
    y = reference_linear(x, linear.weight.detach().float(), None if linear.bias is None else linear.bias.float(),
                         layer, spec, stats)
    return sqnr_db(exact, y)


def layer_gains(model: nn.Module, plan: SegQuantPlan, inputs: Mapping[str, Tensor],
                spec: QuantSpec = QuantSpec(), tokens: Mapping[str, int] | None = None) -> dict[str, LayerGain]:
    """SQNR gains of DualScale and segments per layer, from calibration inputs (static scales are
    calibrated on the same inputs; ``spec.act_granularity="per_token"`` measures dynamic scales).

    Args:
        inputs: layer name -> ``(..., K)`` calibration inputs (``capture_linear_inputs``); layers without
            inputs are left out (they keep their plan entry).
        tokens: rows (M) per call of each layer, for the cost model, when ``inputs`` were subsampled
            (``capture_linear_inputs(rows=...)``); default: the rows of ``inputs``.
    """
    modules = dict(model.named_modules())
    gains = {}
    with torch.no_grad():
        for name, layer in plan.layers.items():
            gain = _layer_gain(name, layer, modules.get(name), inputs, spec, type(model).__name__)
            if gain is not None:
                gains[name] = gain if tokens is None or name not in tokens else \
                    dataclasses.replace(gain, tokens=int(tokens[name]))
    return gains


def _layer_gain(name: str, layer: LinearPlan, linear: nn.Module | None, inputs: Mapping[str, Tensor],
                spec: QuantSpec, model_class: str) -> LayerGain | None:
    if name not in inputs:
        return None
    if not isinstance(linear, nn.Linear):
        raise SegQuantError(f"{name}: in the plan but not an nn.Linear of {model_class}")
    w = linear.weight.detach().float()
    x = inputs[name].detach().to(w.device).float().reshape(-1, layer.in_features)
    exact = x @ w.t() + (0 if linear.bias is None else linear.bias.detach().float())
    full = _sqnr(x, linear, layer, spec, exact)
    dual = full - _sqnr(x, linear, layer.replace(dual_scale=False), spec, exact) if layer.dual_scale else 0.0
    seg = full - _sqnr(x, linear, _merge_input_segments(layer), spec, exact) if len(layer.in_segments) > 1 else 0.0
    logger.debug("%s: SQNR %.2f dB, DualScale %+.2f dB, segments %+.2f dB", name, full, dual, seg)
    return LayerGain(name, x.shape[0], full, _finite(dual), _finite(seg))


def _finite(v: float) -> float:
    return v if math.isfinite(v) else 0.0


def _decide(plan: SegQuantPlan, gains: Mapping[str, LayerGain], cost: CostModel,
            threshold: float) -> tuple[dict[str, tuple[bool, bool]], float, float]:
    """Per layer ``(keep DualScale, keep segments)``, the kept extra time fraction and the kept gain."""
    tokens = {n: (gains[n].tokens if n in gains else cost.tokens) for n in plan.layers}
    total = sum(cost.base(p, tokens[n]) for n, p in plan.layers.items()) or 1.0
    keep, extra, gain = {}, 0.0, 0.0
    for name, layer in plan.layers.items():
        g = gains.get(name)
        if g is None or layer.is_plain:
            continue
        dual_rel, seg_rel = cost.extra(layer)
        frac = cost.base(layer, tokens[name]) / total
        decision = []
        for has, gain_db, rel in ((layer.dual_scale, g.dual_gain_db, dual_rel),
                                  (len(layer.in_segments) > 1, g.seg_gain_db, seg_rel)):
            cost_pct = 100.0 * rel * frac
            ok = has and gain_db > 0 and (cost_pct == 0 or gain_db / cost_pct >= threshold)
            decision.append(ok)
            if ok:
                extra, gain = extra + rel * frac, gain + gain_db
        keep[name] = (decision[0], decision[1])
    return keep, extra, gain


def select(plan: SegQuantPlan, gains: Mapping[str, LayerGain], cost: CostModel, threshold: float) -> SegQuantPlan:
    """The plan with DualScale / input segments switched off where ``gain / cost < threshold``.

    Args:
        threshold: dB of SQNR per percent of the model's GEMM time; 0 keeps every feature that helps.
    """
    if threshold < 0 or math.isnan(threshold):
        raise SegQuantError(f"threshold must be >= 0 (dB per % of GEMM time), got {threshold}")
    keep, _, _ = _decide(plan, gains, cost, threshold)
    out = plan
    for name, (dual, segs) in keep.items():
        layer, kept = plan[name], _kept(plan[name], dual, segs)
        if kept != layer:
            out = out.override(name, in_segments=kept.in_segments, dual_scale=kept.dual_scale,
                               dual_scale_segments=kept.dual_scale_segments, activation=kept.activation)
    dropped = [n for n in plan.layers if out[n] != plan[n]]
    logger.info("cost-aware plan at threshold %g: changed %d of %d planned layers", threshold, len(dropped),
                sum(not p.is_plain for p in plan.layers.values()))
    return out


def sweep(plan: SegQuantPlan, gains: Mapping[str, LayerGain], cost: CostModel,
          thresholds: Iterable[float]) -> list[SweepPoint]:
    """The speed/quality curve: per threshold, the extra GEMM time and summed SQNR gain that stay."""
    points = []
    for t in thresholds:
        keep, extra, gain = _decide(plan, gains, cost, t)
        points.append(SweepPoint(t, extra, gain, sum(d for d, _ in keep.values()), sum(s for _, s in keep.values())))
    return points


def subsample_rows(x: Tensor, max_rows: int) -> Tensor:
    """At most ``max_rows`` evenly spaced rows of ``x`` flattened to ``(rows, K)``, chosen on its device."""
    flat = x.detach().reshape(-1, x.shape[-1])
    if flat.shape[0] > max_rows:
        flat = flat[torch.linspace(0, flat.shape[0] - 1, max_rows, device=flat.device).long()]
    return flat.cpu()


def capture_linear_inputs(model: nn.Module, batches: Sequence[Mapping[str, Any]], names: Iterable[str] | None = None,
                          max_rows: int = 4096, rows: dict[str, int] | None = None) -> dict[str, Tensor]:
    """Inputs of every (or the named) ``nn.Linear`` over calibration ``batches`` (kwargs of ``model``),
    flattened to ``(rows, K)`` on the CPU, at most ``max_rows`` rows per layer call and in all (evenly
    subsampled). ``rows``, when given, receives each layer's largest M of one call (for ``layer_gains``)."""

    def count_rows(name: str, x: Tensor) -> None:
        rows[name] = max(rows.get(name, 0), x.numel() // x.shape[-1])

    with record_linears(model, names, on_input=None if rows is None else count_rows,
                        transform=lambda x: subsample_rows(x, max_rows)) as recording, torch.no_grad():
        for batch in batches:
            model(**batch)
    return {name: subsample_rows(torch.cat(parts).float(), max_rows) for name, parts in recording.inputs.items()}
