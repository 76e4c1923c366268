"""Cost-aware plans: the cost model, the selection at a threshold and the sweep, on synthetic gains and on
the tiny FLUX transformer's calibration inputs."""

import math

import pytest
import torch

import segquant
from segquant import LinearPlan, SegQuantError, SegQuantPlan
from segquant.cost import CostModel, LayerGain, capture_linear_inputs, layer_gains, select, sweep
from segquant.numerics import QuantSpec
from _models import build_tiny

M = 100


def synthetic_plan():
    return SegQuantPlan({
        "down": LinearPlan(64, 16, dual_scale=True, activation="gelu"),                 # all of K DualScale
        "proj": LinearPlan(80, 16, in_segments=(16, 64), dual_scale=True, dual_scale_segments=(1,),
                           activation="gelu"),                                          # 80% of K DualScale
        "qkv": LinearPlan(16, 48),                                                      # plain
    })


def synthetic_gains():
    return {"down": LayerGain("down", M, 30.0, dual_gain_db=0.2),
            "proj": LayerGain("proj", M, 30.0, dual_gain_db=3.0, seg_gain_db=1.0),
            "qkv": LayerGain("qkv", M, 40.0)}


def test_cost_model_extra_time():
    plan = synthetic_plan()
    folded = CostModel(realisation="folded")
    assert folded.extra(plan["down"]) == (1.0, 0.0)  # M doubled: one more GEMM, folded segments free
    assert folded.extra(plan["proj"]) == (1.0, 0.0)
    assert CostModel(realisation="split_k").extra(plan["proj"]) == pytest.approx((0.8, 0.1))
    assert CostModel(kernel="fused", realisation="folded", fused_dual_factor=0.5).extra(plan["proj"]) == \
        pytest.approx((0.4, 0.0))
    assert CostModel(measured={"proj": (0.3, 0.05)}).extra(plan["proj"]) == (0.3, 0.05)
    assert CostModel().extra(plan["qkv"]) == (0.0, 0.0)
    with pytest.raises(SegQuantError, match="kernel must be one of"):
        CostModel(kernel="cutlass")
    with pytest.raises(SegQuantError, match="non-negative"):
        CostModel(segment_overhead=-1)


def test_select_keeps_what_pays():
    plan, gains = synthetic_plan(), synthetic_gains()
    cost = CostModel(realisation="split_k")
    flops = {n: 2 * M * p.in_features * p.out_features for n, p in plan.layers.items()}
    total = sum(flops.values())
    # dB per percent of GEMM time: down 0.2 / (100 * 1.0 * share), proj 3.0 / (100 * 0.8 * share)
    down_ratio = 0.2 / (100 * flops["down"] / total)
    proj_ratio = 3.0 / (100 * 0.8 * flops["proj"] / total)
    assert down_ratio < proj_ratio
    mid = (down_ratio + proj_ratio) / 2
    chosen = select(plan, gains, cost, mid)
    assert not chosen["down"].dual_scale
    assert chosen["proj"].dual_scale and chosen["proj"].in_segments == (16, 64)
    assert chosen["qkv"] == plan["qkv"]
    assert select(plan, gains, cost, 0.0).layers == plan.layers  # every feature with a gain stays
    none = select(plan, gains, cost, math.inf)
    assert not none["down"].dual_scale and not none["proj"].dual_scale
    assert none["proj"].in_segments == (80,)  # split-K segments cost time too
    # folded segments are free: they stay at any threshold, and DualScale of a partial segment goes with them
    folded = select(plan, gains, CostModel(realisation="folded"), math.inf)
    assert folded["proj"].in_segments == (16, 64) and not folded["proj"].dual_scale
    with pytest.raises(SegQuantError, match="threshold must be >= 0"):
        select(plan, gains, cost, -1.0)


def test_select_drops_segments_without_gain():
    plan = synthetic_plan()
    gains = synthetic_gains()
    gains["proj"] = LayerGain("proj", M, 30.0, dual_gain_db=3.0, seg_gain_db=-0.1)
    chosen = select(plan, gains, CostModel(), 0.0)
    # segments removed; DualScale covered 64 of 80 columns only, so it cannot stay on the merged segment
    assert chosen["proj"].in_segments == (80,) and not chosen["proj"].dual_scale


def test_sweep_is_monotone():
    plan, gains = synthetic_plan(), synthetic_gains()
    points = sweep(plan, gains, CostModel(realisation="split_k"), [0.0, 0.01, 0.1, 1.0, 10.0, math.inf])
    assert [p.threshold for p in points] == [0.0, 0.01, 0.1, 1.0, 10.0, math.inf]
    extras, totals = [p.extra_time for p in points], [p.gain_db for p in points]
    assert extras == sorted(extras, reverse=True) and totals == sorted(totals, reverse=True)
    assert points[0].gain_db == pytest.approx(4.2) and points[0].dual_layers == 2 and points[0].segmented_layers == 1
    assert points[-1].extra_time == 0 and points[-1].gain_db == 0
    # the fused kernel makes DualScale cheaper: at the same threshold at least as much gain stays, for less time
    fused = sweep(plan, gains, CostModel(kernel="fused", fused_dual_factor=0.3, realisation="split_k"), [0.0, 1.0])
    assert fused[0].extra_time < points[0].extra_time
    assert fused[1].gain_db >= points[3].gain_db


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_gains_on_tiny_flux(precision):
    model = build_tiny("FluxTransformer2DModel", seed=0)
    kwargs = segquant.example_inputs(model)
    plan = segquant.analyze(model, **kwargs)
    inputs = capture_linear_inputs(model, [kwargs])
    spec = QuantSpec(precision, "per_channel", precision, "per_tensor", "folded")
    gains = layer_gains(model, plan, inputs, spec)
    assert set(gains) == set(plan.layers)
    proj_name = "single_transformer_blocks.0.proj_out"
    scaled = layer_gains(model, plan, {proj_name: inputs[proj_name]}, spec, tokens={proj_name: 4608})
    assert scaled[proj_name].tokens == 4608 and scaled[proj_name].dual_gain_db == gains[proj_name].dual_gain_db
    proj = gains["single_transformer_blocks.0.proj_out"]
    # GELU's negative side on its own scale is the point of DualScale; fp8's exponent already keeps
    # small values, so its gain is smaller than int8's
    assert proj.dual_gain_db > (0.5 if precision == "int8" else 0.05)
    assert all(g.dual_gain_db == 0 for n, g in gains.items() if not plan[n].dual_scale)
    assert all(g.seg_gain_db == 0 for n, g in gains.items() if len(plan[n].in_segments) == 1)
    cheap = select(plan, gains, CostModel(), math.inf)
    assert not cheap.dual_scaled()
    assert select(plan, gains, CostModel(), 0.0).dual_scaled()
    points = sweep(plan, gains, CostModel(), [0.0, 1.0, math.inf])
    assert points[0].extra_time > points[-1].extra_time == 0
    # the selected plan is a valid plan: it serialises and reloads
    assert SegQuantPlan.from_json(cheap.to_json()).layers == cheap.layers


def test_capture_linear_inputs_subsamples():
    lin = torch.nn.Sequential(torch.nn.Linear(4, 3))

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l = lin

        def forward(self, x):
            return self.l(x)

    rows = {}
    inputs = capture_linear_inputs(Wrap(), [{"x": torch.randn(5, 7, 4)}, {"x": torch.randn(2, 4)}], max_rows=10,
                                   rows=rows)
    assert inputs["l.0"].shape == (10, 4) and rows == {"l.0": 35}
    assert capture_linear_inputs(Wrap(), [{"x": torch.randn(3, 4)}], names=["other"]) == {}
