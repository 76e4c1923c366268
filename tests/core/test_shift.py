"""The activation shift as a plan option: plan fields, recipe switch, calibration centres, reference numerics."""

import pytest
import torch
import torch.nn.functional as F

from segquant import LinearPlan, PlanError, SegmentAmaxObserver, SegQuantError, SegQuantPlan
from segquant import numerics as nx
from segquant.recipe import Recipe


def _layer(**kw):
    base = dict(in_features=24, out_features=8, in_segments=(8, 16), name="blk.proj_out")
    return LinearPlan(**{**base, **kw})


def _gelu_input(rows=64, k=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.gelu(torch.randn(rows, k, generator=g) * 3)


def test_shift_defaults_to_every_input_segment_and_round_trips():
    layer = _layer(shift="per_tensor")
    assert layer.shift_segments == (0, 1) and not layer.is_plain
    plan = SegQuantPlan({"blk.proj_out": _layer(shift="per_channel", shift_segments=[1], smoothquant_alpha=0.3)})
    again = SegQuantPlan.from_json(plan.to_json())
    assert again == plan and again["blk.proj_out"].shift_segments == (1,)
    assert again["blk.proj_out"].smoothquant_alpha == 0.3
    assert plan.shifted() == ["blk.proj_out"] and "1 shifted" in plan.summary()
    assert "per_channel seg 1" in str(plan)


@pytest.mark.parametrize("kwargs, message", [
    (dict(shift="per_row"), "unknown shift 'per_row'"),
    (dict(shift_segments=[0]), "shift_segments \\[0\\] given but shift is null"),
    (dict(shift="per_tensor", shift_segments=[2]), "shift_segments \\[2\\] out of range for 2 input segments"),
    (dict(shift="per_tensor", shift_segments="0"), "shift_segments must be a list of segment indices"),
    (dict(smoothquant_alpha=1.5), "smoothquant_alpha must be a number in \\[0, 1\\]"),
    (dict(smoothquant_alpha=True), "smoothquant_alpha must be a number in \\[0, 1\\]"),
])
def test_bad_shift_fields_are_refused(kwargs, message):
    with pytest.raises(PlanError, match=message):
        _layer(**kwargs)


def test_bad_shift_in_a_plan_file_names_the_file_and_key():
    data = {"version": 3, "layers": {"x": {"in_features": 2, "out_features": 2, "shift": "sometimes"}}}
    with pytest.raises(PlanError, match="plan.json: x: shift"):
        SegQuantPlan.from_dict(data, "plan.json")


def test_without_segments_keeps_a_shift_only_when_every_segment_had_it():
    assert _layer(shift="per_tensor").without_segments().shift == "per_tensor"
    assert _layer(shift="per_tensor", shift_segments=[1]).without_segments().shift is None


def test_with_shift_moves_activation_inputs_and_ablate_removes_it():
    plan = SegQuantPlan({"a": _layer(dual_scale=True, dual_scale_segments=[1], activation="gelu"),
                         "b": LinearPlan(8, 8, name="b")})
    both = plan.with_shift("per_tensor")
    assert both["a"].shift_segments == (1,) and both["a"].dual_scale_segments == (1,)
    assert both["b"] == plan["b"]
    only = plan.with_shift("per_channel", keep_dual_scale=False)
    assert only["a"].shift == "per_channel" and not only["a"].dual_scale and only["a"].activation == "gelu"
    assert only.ablate(shift=False)["a"].is_plain is False  # still input-segmented
    assert only.ablate(shift=False, seg_linear=False)["a"].is_plain
    with pytest.raises(PlanError, match="unknown shift"):
        plan.with_shift("sideways")


def test_recipe_shift_and_choose_are_validated_and_applied():
    plan = SegQuantPlan({"a": _layer(dual_scale=True, dual_scale_segments=[1], activation="gelu")}, model_class="M")
    recipe = Recipe(name="m/int8", model_class="M", config="c", precision="int8_w8a8", shift="per_tensor",
                    dual_scale=False)
    applied = recipe.apply(plan)
    assert applied["a"].shift_segments == (1,) and not applied["a"].dual_scale
    with pytest.raises(SegQuantError, match="shift must be one of per_tensor, per_channel"):
        Recipe(name="m/int8", model_class="M", config="c", precision="int8_w8a8", shift="yes")
    with pytest.raises(SegQuantError, match="choose must be one of fixed, auto"):
        Recipe(name="m/int8", model_class="M", config="c", precision="int8_w8a8", choose="sometimes")
    with pytest.raises(SegQuantError, match="shift"):
        Recipe.from_dict(dict(name="m/int8", model_class="M", config="c", precision="int8_w8a8", shift=True))


def test_shifted_ranges_per_tensor_and_per_channel():
    ch = nx.ActivationStats(torch.tensor([4.0, 2.0, 1.0]), torch.tensor([4.0, 2.0, 1.0]), torch.tensor([0.2, 0.0, 1.0]))
    per_tensor = nx.shifted_ranges(ch, [2, 1], [0], "per_tensor")
    assert torch.allclose(per_tensor.center, torch.tensor([1.9, 1.9, 0.0]))  # centre of [-0.2, 4]
    assert torch.allclose(per_tensor.amax[:2], torch.tensor([2.1, 1.9])) and per_tensor.amax[2] == 1.0
    per_channel = nx.shifted_ranges(ch, [2, 1], [0, 1], "per_channel")
    assert torch.allclose(per_channel.center, torch.tensor([1.9, 1.0, 0.0]))
    assert torch.allclose(per_channel.amax, torch.tensor([2.1, 1.0, 1.0]))
    with pytest.raises(SegQuantError, match="shift must be one of"):
        nx.shifted_ranges(ch, [3], [0], "per_row")


def test_observer_centres_the_shifted_segments_only():
    x = _gelu_input()
    layer = _layer(shift="per_tensor", shift_segments=[1])
    obs = SegmentAmaxObserver(layer)
    obs.update(x)
    stats = obs.stats()
    lo, hi = x[:, 8:].min().clamp(max=0), x[:, 8:].max()
    assert torch.all(stats.center[:8] == 0) and torch.allclose(stats.center[8:], (lo + hi) / 2)
    assert torch.allclose(stats.amax[1], (hi - lo) / 2) and stats.amax[0] == x[:, :8].abs().max()
    stats.check(layer)
    with pytest.raises(PlanError, match="calibration center has shape \\(3,\\)"):
        nx.ActivationStats(stats.amax, stats.pos_amax, stats.neg_amax, torch.zeros(3)).check(layer)


def _calibrated(layer, x, smooth=None):
    obs = SegmentAmaxObserver(layer)
    obs.update(x)
    return obs.stats(smooth)


@pytest.mark.parametrize("realisation", ["split_k", "folded"])
@pytest.mark.parametrize("dual", [False, True])
def test_reference_linear_with_shift_is_a_plain_gemm_plus_a_bias(realisation, dual):
    x, w, b = _gelu_input(), torch.randn(8, 24), torch.randn(8)
    layer = _layer(shift="per_tensor", dual_scale=dual, activation="gelu" if dual else None)
    stats = _calibrated(layer, x)
    spec = nx.QuantSpec(realisation=realisation)
    y = nx.reference_linear(x, w, b, layer, spec, stats)
    # the same input quantization as a fake-quant module: Q(x - c) + c, through the dequantized weight
    x_hat = nx.fake_quant_input(x, nx.INT8, layer.in_segments, layer.dual_scale_segments, stats)
    codes = nx.fake_quant_input(x, nx.INT8, layer.in_segments, layer.dual_scale_segments, stats, add_center=False)
    assert torch.allclose(x_hat - codes, stats.center.expand_as(x), atol=1e-6)
    if realisation == "split_k":
        w_hat = nx.fake_quant(w, nx.scale_from_amax(nx.weight_amax(w, layer.out_segments, False), "int8"), "int8")
        assert torch.allclose(y, F.linear(x_hat, w_hat, b), atol=1e-4)
        assert torch.allclose(y, F.linear(codes, w_hat, nx.shift_bias(w_hat, b, stats.center)), atol=1e-4)
    exact = F.linear(x, w, b)
    unshifted = nx.reference_linear(x, w, b, layer.replace(shift=None, dual_scale=dual,
                                                           activation="gelu" if dual else None),
                                    spec, _calibrated(layer.replace(shift=None), x))
    assert (y - exact).pow(2).mean() < (unshifted - exact).pow(2).mean()


def test_shift_with_per_token_scales_and_smoothing():
    x, w = _gelu_input(), torch.randn(8, 24)
    layer = _layer(shift="per_channel")
    smooth = nx.smoothquant_factors(w, x.abs().amax(0), 0.5)
    stats = _calibrated(layer, x, smooth)
    y = nx.reference_linear(x, w, None, layer, nx.QuantSpec(act_granularity="per_token"), stats, smooth)
    xs = x * smooth - stats.center
    parts = [nx.fake_quant_tensor(p, "int8", "per_token") for p in xs.split([8, 16], dim=-1)]
    w_s = w / smooth
    w_hat = nx.fake_quant(w_s, nx.scale_from_amax(nx.weight_amax(w_s, (8,), False), "int8"), "int8")
    expected = (torch.cat(parts, -1) + stats.center) @ w_hat.t()
    assert torch.allclose(y, expected, atol=1e-4)
