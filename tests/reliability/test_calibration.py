"""Calibration that cannot give a usable scale is an error naming the layers, on both backends, before any
layer changes."""

import copy

import pytest
import torch

pytest.importorskip("diffusers")

import segquant  # noqa: E402
from segquant import SegQuantError  # noqa: E402
from segquant.calib import SegmentAmaxObserver, check_calibration  # noqa: E402
from _models import build_tiny  # noqa: E402


def zeroed(kwargs):
    return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in kwargs.items()}


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_check_calibration_names_unreached_and_zero_layers():
    layer = segquant.LinearPlan(8, 4, in_segments=(4, 4), name="a")
    seen, unseen = SegmentAmaxObserver(layer), SegmentAmaxObserver(layer)
    seen.update(torch.cat([torch.zeros(3, 4), torch.randn(3, 4)], dim=1))
    with pytest.raises(SegQuantError, match="calibration reached no data for 1 layer\\(s\\), e.g. b"):
        check_calibration({"a": seen, "b": unseen})
    with pytest.raises(SegQuantError, match="calibration saw only zeros in 1 layer\\(s\\): a \\(input segment 0\\)"):
        check_calibration({"a": seen})
    seen.update(torch.randn(3, 8))
    check_calibration({"a": seen})
    constant = SegmentAmaxObserver(layer)
    constant.update(torch.ones(5, 8))
    with pytest.raises(SegQuantError, match="without variation: 1 of 2 layers \\(e.g. c\\)"):
        check_calibration({"a": seen, "c": constant})
    varied = [SegmentAmaxObserver(layer) for _ in range(3)]
    for obs in varied:
        obs.update(torch.randn(4, 8))
    check_calibration({"a": seen, "b": varied[0], "d": varied[1], "c": constant})  # one constant layer is fine


@pytest.mark.parametrize("backend", ["torchao", "modelopt"])
def test_all_zero_calibration_data_is_refused(backend):
    pytest.importorskip("torchao" if backend == "torchao" else "modelopt")
    import segquant_modelopt  # noqa: F401 - registers the ModelOpt algorithm
    from segquant.recipe import load_recipe

    model = build_tiny("FluxTransformer2DModel")
    kwargs = segquant.example_inputs(model)
    plan = load_recipe("mnist-flux/int8_w8a8").apply(segquant.analyze(model, **kwargs))
    before = state(model)

    def zeros_loop(m):
        m(**zeroed(kwargs))

    target = copy.deepcopy(model)
    with pytest.raises(SegQuantError, match="calibration saw only zeros in|calibration data without variation"):
        segquant.get_backend(backend).quantize(target, plan, segquant.QuantizeOptions(show_progress=False), zeros_loop)
    after = target.state_dict()  # both backends' transactions leave the model as it was
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("backend", ["torchao", "modelopt"])
def test_keep_degenerate_keeps_a_zero_range_layer_in_high_precision(backend, caplog):
    pytest.importorskip("torchao" if backend == "torchao" else "modelopt")
    from segquant.recipe import load_recipe

    model = build_tiny("FluxTransformer2DModel")
    dead = "transformer_blocks.0.ff.net.2"  # its input is GELU(0) = 0 once the layer before it outputs zeros
    with torch.no_grad():
        model.transformer_blocks[0].ff.net[0].proj.weight.zero_()
        model.transformer_blocks[0].ff.net[0].proj.bias.zero_()
    kwargs = segquant.example_inputs(model)
    plan = load_recipe("mnist-flux/int8_w8a8").apply(segquant.analyze(model, **kwargs))
    assert plan[dead].quantized
    backend_ = segquant.get_backend(backend)
    strict = copy.deepcopy(model)
    zeros = f"calibration saw only zeros in 1 layer\\(s\\): {dead} \\(input segment 0\\).*keep_degenerate"
    with pytest.raises(SegQuantError, match=zeros):
        backend_.quantize(strict, plan, segquant.QuantizeOptions(show_progress=False), lambda m: m(**kwargs))
    options = segquant.QuantizeOptions(show_progress=False, keep_degenerate=True)
    with caplog.at_level("WARNING", logger="segquant.calib"):
        quantized = backend_.quantize(copy.deepcopy(model), plan, options, lambda m: m(**kwargs))
    layers = backend_.quantized_linears(quantized)
    assert dead not in layers and set(layers) == set(plan.quantized_layers()) - {dead}
    assert "keeping 1 layer(s) in high precision" in caplog.text and dead in caplog.text
    with torch.no_grad():
        assert torch.isfinite(quantized(**kwargs)[0]).all()


def test_quantize_options_refuse_a_non_boolean_keep_degenerate():
    with pytest.raises(SegQuantError, match="QuantizeOptions.keep_degenerate must be True or False, got 'yes'"):
        segquant.QuantizeOptions(keep_degenerate="yes")
