"""The activation shift on torchao: every shifted layer against ``segquant.numerics.reference_linear`` (static and
dynamic scales, both realisations, with DualScale, per channel), the bias ``b + W_hat c`` folded at convert time,
per-layer SmoothQuant alpha, the backend's save/load round trip, and the refusal of a dynamic shift without
calibration."""

import copy

import pytest
import torch

pytest.importorskip("torchao")

import segquant  # noqa: E402
from segquant import QuantizeOptions, SegQuantError  # noqa: E402
from segquant import numerics as nx  # noqa: E402
from segquant.recording import record_linears  # noqa: E402
from segquant_torchao import SegQuantConfig, SegQuantTensor, calibration_from, quantize, segquant_layers  # noqa: E402
from test_contract import analysed_tiny_plan, backend_or_skip, loop_over, tiny_inputs  # noqa: E402

# The same codes as the reference; only float32 accumulation order differs. A wrong scale or a missing
# ``W_hat c`` moves outputs by orders of magnitude more (checked below).
RTOL, ATOL = 1e-4, 1e-5
# ... except where the float32 value to round lands within an ulp of a rounding boundary and the two computations
# (``x * (1 / col_scale) - c / a`` here, ``(x - c) / a`` there) round it apart: one code, one token's row of the output.
# Shift and DualScale on one segment make s- nearly s+, and such near ties on the negative side happen.
FLIPPED_ROWS, FLIP_SIZE = 0.02, 0.01
FLUX = "FluxTransformer2DModel"


def differing_rows(got, expected):
    """The tokens (output rows) where ``got`` and ``expected`` differ beyond accumulation order, and how many."""
    bad = ~torch.isclose(got, expected, rtol=RTOL, atol=ATOL * expected.abs().max().item())
    rows = bad.reshape(-1, bad.shape[-1]).any(-1)
    return int(rows.sum()), rows.numel()


def assert_matches(got, expected, name):
    """``got`` equals ``expected`` up to float32 accumulation, but for a rare code flipped at a rounding boundary
    (one token, or ``FLIPPED_ROWS`` of them, by at most ``FLIP_SIZE`` of the output's range)."""
    bad, rows = differing_rows(got, expected)
    assert bad <= max(1, FLIPPED_ROWS * rows), f"{name}: {bad} of {rows} tokens differ"
    torch.testing.assert_close(got, expected, rtol=0, atol=FLIP_SIZE * expected.abs().max().item(),
                               msg=lambda m: f"{name}: {m}")


def layer_inputs(model, batches):
    with record_linears(model) as rec, torch.no_grad():
        model(**batches[0])
    return {name: xs[0] for name, xs in rec.inputs.items()}


def stats_of(calibration, name):
    c = calibration[name]
    center = torch.tensor(c["center"]) if "center" in c else None
    return nx.ActivationStats(*(torch.tensor(c[k]) for k in ("amax", "pos_amax", "neg_amax")), center=center)


def quantized(model, batches, plan, **options):
    """``plan`` on a copy of ``model`` through prepare -> calibrate -> convert; returns it and its calibration."""
    q = copy.deepcopy(model)
    quantize(q, SegQuantConfig(plan, step="prepare", **options))
    loop_over(batches)(q)
    calibration = calibration_from(q)
    quantize(q, SegQuantConfig(plan, step="convert", **options))
    return q, calibration


def check_shifted_layers(model, q, plan, calibration, spec, inputs):
    """Every SegQuant layer equals the reference; a shifted one differs from its unshifted reference and from the
    reference without the bias correction. Returns how many shifted layers were checked."""
    floats, shifted = dict(model.named_modules()), 0
    for name, layer in segquant_layers(q).items():
        x, ref = inputs[name], floats[name]
        stats = stats_of(calibration, name) if name in calibration else None
        expected = nx.reference_linear(x, ref.weight, ref.bias, plan[name], spec, stats)
        with torch.no_grad():
            got = layer(x)
        assert_matches(got, expected, name)
        if plan[name].shift is None:
            assert layer.weight.center is None, name
            continue
        shifted += 1
        assert stats is not None and stats.center.abs().max() > 0, name
        no_correction = expected - (layer.bias - (ref.bias if ref.bias is not None else 0)).detach()
        bad, rows = differing_rows(got, no_correction)
        assert bad > rows / 2, name
        unshifted_stats = nx.activation_stats(x.reshape(-1, x.shape[-1]), plan[name].in_segments) \
            if spec.act_granularity == "per_tensor" else None
        unshifted = nx.reference_linear(x, ref.weight, ref.bias, plan[name].replace(shift=None,
                                        dual_scale=plan[name].dual_scale,
                                        dual_scale_segments=plan[name].dual_scale_segments,
                                        activation=plan[name].activation), spec, unshifted_stats)
        bad, rows = differing_rows(got, unshifted)
        assert bad > rows / 2, name
    return shifted


@pytest.mark.parametrize("precision", ["int8", "fp8"])
@pytest.mark.parametrize("realisation", ["split_k", "folded"])
def test_static_shift_with_dual_scale_matches_reference(precision, realisation):
    model, batches = tiny_inputs(FLUX)
    plan = analysed_tiny_plan(FLUX).with_shift("per_tensor")  # shift and DualScale on the same segments
    assert any(plan[n].dual_scale and plan[n].shift for n in plan.shifted())
    q, calibration = quantized(model, batches, plan, precision=precision, activation="static",
                               realisation=realisation, weight_granularity="per_tensor")
    spec = nx.QuantSpec(weight_format=precision, weight_granularity="per_tensor", act_format=precision,
                        realisation=realisation)
    assert check_shifted_layers(model, q, plan, calibration, spec, layer_inputs(model, batches)) == \
        len(plan.shifted())


def test_static_per_channel_shift_without_dual_scale_and_the_bias():
    model, batches = tiny_inputs(FLUX)
    plan = analysed_tiny_plan(FLUX).with_shift("per_channel", keep_dual_scale=False)
    assert plan.shifted() and not plan.dual_scaled()
    q, calibration = quantized(model, batches, plan, precision="int8", activation="static")
    spec = nx.QuantSpec(weight_format="int8", weight_granularity="per_channel", act_format="int8")
    assert check_shifted_layers(model, q, plan, calibration, spec, layer_inputs(model, batches)) == \
        len(plan.shifted())
    floats, layers = dict(model.named_modules()), segquant_layers(q)
    for name in plan.shifted():  # the bias is b + W_hat c; c varies per channel; the GEMM weight is unchanged
        weight, center = layers[name].weight, stats_of(calibration, name).center
        assert center.unique().numel() > 2, name
        torch.testing.assert_close(layers[name].bias, nx.shift_bias(weight.gemm_weight(), floats[name].bias, center))
        assert torch.equal(weight.center, center)


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_dynamic_shift_takes_its_centres_from_calibration(precision):
    model, batches = tiny_inputs(FLUX)
    plan = analysed_tiny_plan(FLUX).with_shift("per_channel")
    q, calibration = quantized(model, batches, plan, precision=precision)  # dynamic: only shifted layers prepared
    assert sorted(calibration) == sorted(plan.shifted())
    spec = nx.QuantSpec(weight_format=precision, weight_granularity="per_channel", act_format=precision,
                        act_granularity="per_token")
    assert check_shifted_layers(model, q, plan, calibration, spec, layer_inputs(model, batches)) == \
        len(plan.shifted())
    again = copy.deepcopy(model)  # the calibration as data converts a float model directly
    quantize(again, SegQuantConfig(plan, precision=precision, calibration=calibration))
    x = layer_inputs(model, batches)[plan.shifted()[0]]
    with torch.no_grad():
        torch.testing.assert_close(segquant_layers(again)[plan.shifted()[0]](x), segquant_layers(q)[plan.shifted()[0]](x),
                                   rtol=0, atol=0)


def test_dynamic_shift_without_calibration_is_refused_before_any_change():
    model, batches = tiny_inputs(FLUX)
    plan = analysed_tiny_plan(FLUX).with_shift("per_tensor")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SegQuantError, match=f"{plan.shifted()[0]}: convert before prepare \\(its activation shift "
                                            "takes the centres from calibration.*step='prepare'"):
        quantize(model, SegQuantConfig(plan, precision="int8"))
    assert not segquant_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(SegQuantError, match="need no prepare step"):
        SegQuantConfig(analysed_tiny_plan(FLUX), precision="int8", step="prepare")


def test_backend_uses_the_plans_per_layer_alpha_and_shift():
    backend = backend_or_skip("torchao")
    model, batches = tiny_inputs(FLUX)
    plan = analysed_tiny_plan(FLUX).with_shift("per_tensor").with_precision("int8_w8a8")
    own, unset = plan.shifted()[0], plan.shifted()[1]
    plan = plan.override(own, smoothquant_alpha=0.2)
    q = backend.quantize(copy.deepcopy(model), plan, QuantizeOptions(smoothquant_alpha=0.5), loop_over(batches))
    inputs, floats, layers = layer_inputs(model, batches), dict(model.named_modules()), segquant_layers(q)
    spec = segquant.get_precision("int8_w8a8").quant_spec("split_k")
    for name, alpha in ((own, 0.2), (unset, 0.5)):
        observer = segquant.SegmentAmaxObserver(plan[name])
        for batch in batches:
            with record_linears(model, [name]) as rec, torch.no_grad():
                model(**batch)
            observer.update(rec.inputs[name][0])
        smooth = nx.smoothquant_factors(floats[name].weight, observer.channel_stats().amax, alpha)
        torch.testing.assert_close(layers[name].weight.smooth, smooth, rtol=1e-6, atol=0)
        x = inputs[name]
        expected = nx.reference_linear(x, floats[name].weight, floats[name].bias, plan[name], spec,
                                       observer.stats(smooth), smooth)
        with torch.no_grad():
            assert_matches(layers[name](x), expected, name)
    no_smoothing = backend.quantize(copy.deepcopy(model), plan, QuantizeOptions(), loop_over(batches))
    assert [n for n, m in segquant_layers(no_smoothing).items() if m.weight.smooth is not None] == [own]


@pytest.mark.parametrize("realisation", ["split_k", "folded"])
def test_backend_save_load_keeps_centre_and_bias(tmp_path, realisation):
    backend = backend_or_skip("torchao")
    model, batches = tiny_inputs(FLUX)
    plan = analysed_tiny_plan(FLUX).with_shift("per_tensor").with_precision("int8_w8a8")
    options = QuantizeOptions(smoothquant_alpha=0.5, realisation=realisation)
    q, _ = backend.quantize_and_save(copy.deepcopy(model), plan, options, loop_over(batches), tmp_path, "transformer")
    loaded = backend.load(tmp_path, "transformer", FLUX, lambda: None, torch.float32)
    name = plan.shifted()[0]
    a, b = segquant_layers(q)[name], segquant_layers(loaded)[name]
    assert isinstance(b.weight, SegQuantTensor) and b.weight.center is not None
    assert torch.equal(a.weight.center, b.weight.center) and torch.equal(a.bias, b.bias)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batches[0])[0], q(**batches[0])[0], rtol=0, atol=0)


def test_quantizing_while_loading_folds_the_centre_into_the_loaded_bias(tmp_path):
    """diffusers' ``from_pretrained(..., quantization_config=TorchAoConfig(SegQuantConfig(calibration=...)))`` of a
    float checkpoint: each Linear converts as its weight arrives, after its bias (a bias still on meta is refused
    by name rather than corrected wrongly)."""
    from diffusers import FluxTransformer2DModel, TorchAoConfig

    model, batches = tiny_inputs(FLUX)
    plan = analysed_tiny_plan(FLUX).with_shift("per_tensor")
    q, calibration = quantized(model, batches, plan, precision="int8", activation="static")
    model.save_pretrained(tmp_path)
    config = SegQuantConfig(plan, precision="int8", activation="static", calibration=calibration)
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path, quantization_config=TorchAoConfig(config),
                                                    dtype=torch.float32)
    name = plan.shifted()[0]
    assert torch.equal(segquant_layers(loaded)[name].bias, segquant_layers(q)[name].bias)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batches[0])[0], q(**batches[0])[0], rtol=0, atol=0)


@pytest.mark.parametrize("realisation", ["split_k", "folded"])
def test_a_shifted_layer_compiles_with_inductor(realisation):
    """``torch.compile(fullgraph=True)`` of a shifted static layer (the centre's subtraction fuses into the
    quantization) computes what eager does."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32),
                              torch.nn.Linear(32, 16)).eval()  # the output layer stays in high precision
    x = torch.randn(2, 24, 32)
    plan = segquant.analyze(mlp, x).with_shift("per_tensor", keep_dual_scale=False).with_precision("int8_w8a8")
    assert plan.shifted() == ["2"]
    q, _ = quantized(mlp, [{"input": x}], plan, precision="int8", activation="static", realisation=realisation)
    with torch.inference_mode():
        eager = q(x)
        compiled = torch.compile(q, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
