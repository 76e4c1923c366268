"""Per-segment SmoothQuant, the reciprocal scale form and reference mode's plan conventions: hand-computed
values and bad input."""

import pytest
import torch

import segquant
from segquant import LinearPlan, QuantizeOptions, SegmentAmaxObserver, SegQuantError
from segquant import numerics as nx
from segquant import reference_mode
from segquant.backend import Capabilities, check_supported
from segquant.calib import segment_calibration
from segquant.numerics import per_segment_linear

INT8 = nx.QuantSpec(scale_form="reciprocal", smoothing="per_segment")


def calibrated(layer, x, weight, alpha):
    obs = SegmentAmaxObserver(layer)
    obs.update(x)
    return segment_calibration(obs, weight, layer, alpha, "reciprocal")


def test_divisors_are_the_reference_formula():
    weight = torch.tensor([[1.0, 4.0], [2.0, 1.0]])  # max |W| per input channel: 2, 4
    d = nx.smoothquant_divisors(weight, torch.tensor([4.0, 1.0]), 0.5)
    assert torch.allclose(d, torch.tensor([2 / 2 ** 0.5, 1 / 2]))
    assert nx.smoothquant_divisors(weight, torch.tensor([0.0, 1.0]), 0.5)[0] == 1  # d <= 2^-31 -> 1
    assert torch.allclose(d * nx.smoothquant_factors(weight, torch.tensor([4.0, 1.0]), 0.5), torch.ones(2))


def test_reciprocal_scales():
    assert nx.scale_from_amax(torch.tensor(2.0), "int8", form="reciprocal") == 63.5
    assert nx.scale_from_amax(torch.tensor(2.0), "int8", negative=True, form="reciprocal") == 64
    # 63.5 rounds half to even: 64 codes of 1/63.5
    x_hat = nx.fake_quant(torch.tensor([2.0, 1.0]), torch.tensor(63.5), "int8", "reciprocal")
    assert torch.equal(x_hat, torch.tensor([2.0, 64 / 63.5]))


def test_output_segments_smooth_quantize_on_their_own():
    """alpha 0: d_b = 1 / max|W_b| per output row block. Block 0 (W [2, 1]): x / d = [2, 1] (amax 2, r 63.5),
    W d = [1, 1]: y0 = 2 + 64/63.5. Block 1 (W [1, 4]): x / d = [1, 4] (r 31.75), W d = [1, 1]: y1 = 32/31.75 + 4."""
    layer = LinearPlan(2, 2, out_segments=(1, 1), name="adaln")
    weight, x = torch.tensor([[2.0, 1.0], [1.0, 4.0]]), torch.tensor([[1.0, 1.0]])
    factors, stats = calibrated(layer, x, weight, 0.0)
    assert torch.equal(factors, torch.tensor([[0.5, 1.0], [1.0, 0.25]]))
    y = nx.reference_linear(x, weight, None, layer, INT8, stats, factors)
    assert torch.allclose(y, torch.tensor([[2 + 64 / 63.5, 32 / 31.75 + 4]]), rtol=0, atol=1e-6)
    # per layer: one d = 1 / [2, 4]: x / d = [2, 4] (r 31.75), W d = [[1, .25], [.5, 1]] (r 127)
    per_layer = nx.QuantSpec(scale_form="reciprocal")
    stats1, d = segquant.calib.static_calibration(_observer(layer, x), weight, 0.0, "reciprocal")
    y1 = nx.reference_linear(x, weight, None, layer, per_layer, stats1, d)
    assert torch.allclose(y1, torch.tensor([[64 / 31.75 + 4 * 32 / 127, 64 / 31.75 * 64 / 127 + 4]]), atol=1e-6)


def _observer(layer, x):
    obs = SegmentAmaxObserver(layer)
    obs.update(x)
    return obs


def test_input_segments_get_their_own_weight_scale():
    """alpha 1: d = max|x| = [2, 4], x / d = [1, 1]; W d = [[1, .25], [.5, .5]]. Per input segment the weight
    columns have amax 1 and 0.5: column 1 is quantized with r 254 (.25 -> 64/254, .5 exact)."""
    layer = LinearPlan(2, 2, in_segments=(1, 1), name="proj_out")
    weight, x = torch.tensor([[0.5, 0.0625], [0.25, 0.125]]), torch.tensor([[2.0, 4.0]])
    factors, stats = calibrated(layer, x, weight, 1.0)
    y = per_segment_linear(x, weight, torch.tensor([1.0, -1.0]), layer, INT8, stats, factors)
    assert torch.allclose(y, torch.tensor([[1 + 64 / 254 + 1, 64 / 127 + 0.5 - 1]]), rtol=0, atol=1e-6)


def test_without_smoothing_per_segment_changes_nothing():
    layer = LinearPlan(8, 6, out_segments=(3, 3), name="l")
    torch.manual_seed(0)
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    stats = nx.activation_stats(x, layer.in_segments)
    a = nx.reference_linear(x, w, None, layer, INT8, stats, None)
    b = nx.reference_linear(x, w, None, layer, nx.QuantSpec(scale_form="reciprocal"), stats, None)
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [dict(smoothing="per_block"), dict(scale_form="inverse"),
                                 dict(realisation="folded", smoothing="per_segment"),
                                 dict(realisation="folded", scale_form="reciprocal")])
def test_bad_options_are_refused(bad):
    with pytest.raises(SegQuantError, match="smoothing|scale_form"):
        QuantizeOptions(**bad)
    with pytest.raises(SegQuantError):
        nx.QuantSpec(**{k: v for k, v in bad.items()})


def test_per_segment_factors_of_the_wrong_shape_are_refused():
    layer = LinearPlan(2, 2, out_segments=(1, 1), name="adaln")
    x = torch.ones(1, 2)
    stats = [nx.activation_stats(x, (2,))] * 2
    with pytest.raises(segquant.PlanError, match="one row per output segment"):
        per_segment_linear(x, torch.ones(2, 2), None, layer, INT8, stats, torch.ones(3, 2))


class _PlainBackend:
    name = "plain"
    capabilities = Capabilities(precisions=("int8_w8a8",))


def test_a_backend_without_per_segment_smoothing_refuses_it():
    plan = segquant.SegQuantPlan({"l": LinearPlan(4, 4, name="l")}).with_precision("int8_w8a8")
    with pytest.raises(SegQuantError, match="backend plain implements smoothing per_layer, not 'per_segment'"):
        check_supported(_PlainBackend(), plan, reference_mode.reference_options(0.5))
    with pytest.raises(SegQuantError, match="scale_form"):
        check_supported(_PlainBackend(), plan, QuantizeOptions(scale_form="reciprocal"))
    check_supported(_PlainBackend(), plan, QuantizeOptions(smoothquant_alpha=0.5))


def test_reference_plan_conventions():
    unequal = LinearPlan(160, 32, in_segments=(32, 128), dual_scale=True, dual_scale_segments=(1,), name="a")
    assert reference_mode.reference_layer(unequal).in_segments == (160,)
    assert not reference_mode.reference_layer(unequal).dual_scale
    partial = LinearPlan(64, 32, in_segments=(32, 32), dual_scale=True, dual_scale_segments=(1,), name="b")
    assert reference_mode.reference_layer(partial) == partial.replace(dual_scale=False)
    whole = LinearPlan(32, 96, out_segments=(32, 32, 32), dual_scale=True, high_precision=True, name="c")
    assert reference_mode.reference_layer(whole) == whole.replace(high_precision=False)
