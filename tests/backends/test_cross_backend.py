"""ModelOpt and torchao on the same applied plan: the same SmoothQuant, the same scales, the same integer codes,
and both equal to ``segquant.numerics`` per layer."""

import copy

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("modelopt.torch.quantization")
pytest.importorskip("torchao")

import segquant  # noqa: E402
from segquant import numerics as nx  # noqa: E402
from segquant.recipe import load_recipe  # noqa: E402
from segquant.recording import record_linears  # noqa: E402
from segquant_torchao import quantized_layers  # noqa: E402
from segquant_torchao.kernels import codes  # noqa: E402
from _models import build_tiny, seeded_batches  # noqa: E402

# The ModelOpt layers fake-quantize through segquant.numerics; torchao runs real int8 GEMMs with the same
# codes, so only float32 accumulation order differs.
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def case():
    model = build_tiny("FluxTransformer2DModel")
    batches = seeded_batches(model, 2, first_seed=200)

    def loop(m):
        with torch.no_grad():
            for batch in batches:
                m(**batch)

    recipe = load_recipe("mnist-flux/int8_w8a8")  # INT8 per-tensor static, SmoothQuant 0.5, split_k
    plan = recipe.apply(segquant.analyze(model, **batches[0]))
    options = recipe.quantize_options(show_progress=False)
    assert options.smoothquant_alpha == 0.5 and options.realisation == "split_k"
    mo = segquant.get_backend("modelopt").quantize(copy.deepcopy(model), plan, options, loop)
    ao = segquant.get_backend("torchao").quantize(copy.deepcopy(model), plan, options, loop)
    with record_linears(model) as rec, torch.no_grad():
        loop(model)
    return model, plan, mo, ao, rec.inputs


def test_torchao_applies_smoothquant_and_matches_the_reference(case):
    model, plan, _, ao, inputs = case
    spec = segquant.get_precision(plan.precision()).quant_spec("split_k")
    floats = dict(model.named_modules())
    layers = quantized_layers(ao)
    assert set(layers) == set(plan.quantized_layers())
    for name, layer in layers.items():
        assert layer.weight.spec.smoothed and layer.weight.smooth is not None, name
        smooth = layer.weight.smooth
        assert not torch.allclose(smooth, torch.ones_like(smooth)), name
        observer = segquant.SegmentAmaxObserver(plan[name])
        for x in inputs[name]:
            observer.update(x * smooth)
        x, ref = inputs[name][0], floats[name]
        expected = nx.reference_linear(x, ref.weight, ref.bias, plan[name], spec, observer.stats(), smooth=smooth)
        with torch.no_grad():
            got = layer(x)
        torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL * expected.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")
        unsmoothed = nx.reference_linear(x, ref.weight, ref.bias, plan[name], spec,
                                         nx.activation_stats(torch.cat([i.reshape(-1, x.shape[-1])
                                                                        for i in inputs[name]]),
                                                             plan[name].in_segments))
        assert not torch.allclose(got, unsmoothed, rtol=RTOL, atol=ATOL * expected.abs().max().item()), name


def test_modelopt_and_torchao_share_smoothing_scales_and_integer_codes(case):
    model, plan, mo, ao, inputs = case
    mo_modules, ao_layers = dict(mo.named_modules()), quantized_layers(ao)
    for name, layer in ao_layers.items():
        weight, mo_layer = layer.weight, mo_modules[name]
        spec = weight.spec
        inq = mo_layer.input_quantizer
        torch.testing.assert_close(inq.pre_quant_scale.float(), weight.smooth, rtol=1e-6, atol=0)
        # weight: ModelOpt holds W / s and its per-output-segment amax; torchao the int8 codes and scales
        w_scale = nx.scale_from_amax(mo_layer.weight_quantizer.amax.float(), "int8")
        mo_codes = nx.quantize(mo_layer.weight.detach().float(), w_scale, "int8")
        ao_codes = torch.cat([weight.segment_codes(i)[:spec.out_features, :hi - lo]
                              for i, (lo, hi) in enumerate(spec.bounds)], dim=1).float()
        assert torch.equal(mo_codes, ao_codes), name
        torch.testing.assert_close(w_scale.reshape(-1).expand(spec.out_features), weight.row_scales(),
                                   rtol=1e-6, atol=0)
        # activations: the same per-segment scales, hence the same codes for the same input
        mo_stats = segquant.numerics.ActivationStats(inq._segquant_seg_amax, inq._segquant_seg_pos,
                                                     inq._segquant_seg_neg)
        mo_scale, mo_neg = mo_stats.scales(plan[name], "int8")
        torch.testing.assert_close(mo_scale, weight.act_scale, rtol=1e-6, atol=0)
        if spec.dual_segments:  # the negative-side scale is stored only where DualScale reads it
            torch.testing.assert_close(mo_neg[list(spec.dual_segments)],
                                       weight.neg_scale[list(spec.dual_segments)], rtol=1e-6, atol=0)
        else:
            assert weight.neg_scale is None
        x = inputs[name][0].reshape(-1, spec.in_features) * weight.smooth
        for i, (lo, hi) in enumerate(spec.bounds):
            if i in spec.dual_segments:
                continue  # two code tensors, checked through the layer outputs above and below
            ao_q = codes(x[:, lo:hi], weight.act_scale[i], "int8").float()
            mo_q = nx.quantize(x[:, lo:hi], mo_scale[i], "int8")
            assert torch.equal(ao_q, mo_q), name


def test_both_backends_give_the_same_layer_outputs(case):
    model, plan, mo, ao, inputs = case
    mo_modules = dict(mo.named_modules())
    for name, layer in quantized_layers(ao).items():
        x = inputs[name][0]
        with torch.no_grad():
            a, b = layer(x), mo_modules[name](x)
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL * b.abs().max().item(), msg=lambda m: f"{name}: {m}")
