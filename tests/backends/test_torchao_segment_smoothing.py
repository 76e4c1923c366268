"""Per-segment SmoothQuant (``QuantizeOptions(smoothing="per_segment")``) on torchao: every layer against the oracle
``segquant.numerics.per_segment_linear`` (an output-segmented layer, an input-segmented one, DualScale on one input
segment; int8 and fp8), a whole tiny FLUX through the public backend API against ModelOpt's fake quantization, the
save/load and calibration-as-data round trips, and the refusals (dynamic activations, the folded realisation, an
activation shift, the reciprocal scale form, calibration of the other smoothing)."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

pytest.importorskip("torchao")
pytest.importorskip("diffusers")

import segquant  # noqa: E402
from segquant import LinearPlan, QuantizeOptions, SegQuantError, SegQuantPlan  # noqa: E402
from segquant import numerics as nx  # noqa: E402
from segquant import reference_mode  # noqa: E402
from segquant.backend import Capabilities, check_supported  # noqa: E402
from segquant.options import SMOOTHINGS  # noqa: E402
from segquant_torchao import SegQuantConfig, SegQuantOptions, SegQuantTensor, calibration_from, quantize, \
    segquant_layers  # noqa: E402
from test_contract import analysed_tiny_plan, assert_realises, backend_or_skip, loop_over, tiny_inputs  # noqa: E402

# The same codes as the oracle; only float32 accumulation order differs. A wrong scale (or per-layer smoothing)
# moves outputs by orders of magnitude more (checked below).
RTOL, ATOL = 1e-4, 1e-5
ALPHA = 0.5
FLUX = "FluxTransformer2DModel"
PRECISIONS = ("int8_w8a8", "int8_perchannel", "fp8")


class OneLinear(nn.Module):
    def __init__(self, layer: LinearPlan, weight: torch.Tensor):
        super().__init__()
        self.proj = nn.Linear(layer.in_features, layer.out_features)
        with torch.no_grad():
            self.proj.weight.copy_(weight)

    def forward(self, x):
        return self.proj(x)


def _channels(k, outliers, scale):
    """A per-channel magnitude: ones, with a few outlier channels (SmoothQuant's reason to be)."""
    profile = torch.ones(k)
    profile[list(outliers)] = scale
    return profile


def adaln_case():
    """Output-segmented (adaLN-like, three output segments): each segment's rows weight other input channels, so each
    gets its own smoothing factors."""
    layer = LinearPlan(32, 96, out_segments=(32, 32, 32), name="proj")
    rows = [torch.randn(32, 32) * _channels(32, cols, 12.0) * gain
            for cols, gain in (((0, 1), 1.0), ((10, 11), 0.05), ((20, 21, 22), 4.0))]

    def x():
        return torch.randn(3, 16, 32) * _channels(32, (1, 5, 20), 25.0)
    return layer, torch.cat(rows), x


def cat_case():
    """Input-segmented (a concatenation of two parts with very different ranges), one output segment."""
    layer = LinearPlan(64, 32, in_segments=(32, 32), name="proj")
    weight = torch.randn(32, 64) * torch.cat([torch.full((32,), 0.3), _channels(32, (3,), 10.0)])

    def x():
        return torch.cat([torch.randn(3, 16, 32) * 0.05, torch.randn(3, 16, 32) * _channels(32, (7, 8), 30.0)], -1)
    return layer, weight, x


def dual_case():
    """DualScale on input segment 1 (a SiLU output), two output segments."""
    layer = LinearPlan(64, 48, in_segments=(32, 32), out_segments=(24, 24), dual_scale=True, dual_scale_segments=(1,),
                       activation="silu", name="proj")
    weight = torch.cat([torch.randn(24, 64) * _channels(64, (2, 40), 8.0), torch.randn(24, 64) * 0.2])

    def x():
        return torch.cat([torch.randn(3, 16, 32) * _channels(32, (4,), 20.0),
                          nn.functional.silu(torch.randn(3, 16, 32) * 6.0)], dim=-1)
    return layer, weight, x


CASES = {"output_segments": adaln_case, "input_segments": cat_case, "dual_scale": dual_case}


def build(case):
    torch.manual_seed(0)
    layer, weight, x = CASES[case]()
    return layer, OneLinear(layer, weight).eval(), [x() for _ in range(2)], x()


def backend_quantized(model, layer, precision, batches, smoothing="per_segment", alpha=ALPHA):
    plan = SegQuantPlan({"proj": layer}).with_precision(precision)
    options = QuantizeOptions(smoothquant_alpha=alpha, smoothing=smoothing, show_progress=False)
    return backend_or_skip("torchao").quantize(copy.deepcopy(model), plan, options,
                                               lambda m: [m(b) for b in batches])


def oracle(model, layer, precision, batches, x):
    """``per_segment_linear`` with factors and ranges computed here from the calibration data: ``d_b`` from the
    weight rows of output segment ``b``, the ranges of ``x * d_b`` per input segment."""
    seen = torch.cat([b.reshape(-1, layer.in_features) for b in batches])
    weight = model.proj.weight.detach()
    factors = torch.stack([nx.smoothquant_factors(w_b, seen.abs().amax(0), ALPHA)
                           for w_b in weight.split(list(layer.out_segments))])
    stats = [nx.activation_stats(seen * d, layer.in_segments) for d in factors]
    spec = dataclasses.replace(segquant.get_precision(precision).quant_spec(), smoothing="per_segment")
    return nx.per_segment_linear(x, weight, model.proj.bias.detach(), layer, spec, stats, factors), factors


def close(got, expected):
    return torch.allclose(got, expected, rtol=RTOL, atol=ATOL * expected.abs().max().item())


def agree(got, expected, flips=0.01):
    """Two backends' whole-model outputs: ``close`` but for at most ``flips`` of the elements, which stay within 4x the
    tolerance. Float kernels that round differently from one processor to another can move a quantized input across a
    rounding boundary in one backend and not in the other: one code apart, in a few outputs (1 of 256 on an AMD EPYC),
    where a wrong scale moves every output of its tile."""
    allowed = ATOL * expected.abs().max().item() + RTOL * expected.abs()
    err = (got - expected).abs()
    return bool((err > allowed).float().mean() <= flips and (err <= 4 * allowed).all())


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_layer_equals_the_oracle(case, precision):
    layer, model, batches, x = build(case)
    q = backend_quantized(model, layer, precision, batches)
    expected, factors = oracle(model, layer, precision, batches, x)
    weight = q.proj.weight
    assert isinstance(weight, SegQuantTensor) and weight.spec.tiled
    assert weight.smooth.shape == (len(layer.out_segments), layer.in_features)
    torch.testing.assert_close(weight.smooth, factors, rtol=1e-6, atol=0)
    spec = segquant.get_precision(precision)  # the codes times their tile scales, smoothing undone
    blocks = nx.per_segment_weight(model.proj.weight.detach(), layer, factors, spec.weight_format,
                                   spec.weight_granularity == "per_channel")
    fake = torch.cat([w_b * d for w_b, d in zip(blocks, factors)])
    torch.testing.assert_close(weight.dequantize(), fake, rtol=1e-6, atol=1e-7 * fake.abs().max().item())
    with torch.no_grad():
        got = q(x)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL * expected.abs().max().item())
    assert not close(model(x).detach(), expected)  # it did quantize


@pytest.mark.parametrize("precision", ["int8_w8a8", "fp8"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_per_layer_smoothing_is_another_layer(case, precision):
    """Per-layer smoothing (one factor set, one weight scale per output segment) misses the oracle by far more than
    the tolerance (but for fp8 on the input-segmented layer: with one factor set, a tile's scale changes little in a
    floating-point format); without an alpha the two smoothings are the same layer."""
    layer, model, batches, x = build(case)
    expected, _ = oracle(model, layer, precision, batches, x)
    with torch.no_grad():
        per_layer = backend_quantized(model, layer, precision, batches, "per_layer")(x)
        if (case, precision) != ("input_segments", "fp8"):
            assert (per_layer - expected).abs().max() > 20 * ATOL * expected.abs().max()
        a = backend_quantized(model, layer, precision, batches, "per_segment", None)(x)
        b = backend_quantized(model, layer, precision, batches, "per_layer", None)(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_the_fused_kernel_option_computes_the_same(precision):
    """``SegQuantConfig`` directly, with ``kernel="fused"`` (the Triton GEMMs on CUDA, their torch fallback here)."""
    layer, model, batches, x = build("dual_scale")
    options = dict(precision=precision, activation="static", weight_granularity="per_tensor", smoothquant_alpha=ALPHA,
                   smoothing="per_segment", kernel="fused")
    q = copy.deepcopy(model)
    quantize(q, SegQuantConfig(SegQuantPlan({"proj": layer}), step="prepare", **options))
    for b in batches:
        q(b)
    quantize(q, SegQuantConfig(SegQuantPlan({"proj": layer}), **options))
    expected, _ = oracle(model, layer, "int8_w8a8" if precision == "int8" else "fp8", batches, x)
    with torch.no_grad():
        torch.testing.assert_close(q(x), expected, rtol=RTOL, atol=ATOL * expected.abs().max().item())


def test_a_wrong_scale_fails_the_tolerance():
    """The tolerance catches one tile's scale off by 1%: the check above has teeth."""
    layer, model, batches, x = build("dual_scale")
    q = backend_quantized(model, layer, "int8_w8a8", batches)
    expected, _ = oracle(model, layer, "int8_w8a8", batches, x)
    with torch.no_grad():
        q.proj.weight.act_scale[1, 0] *= 1.01
        assert not close(q(x), expected)
        assert not agree(q(x), expected)  # nor does the whole-model check's allowance for isolated code flips


@pytest.fixture(scope="module")
def flux():
    model, batches = tiny_inputs(FLUX)
    return model, batches


@pytest.mark.parametrize("precision", ["int8_w8a8", "fp8"])
def test_a_tiny_flux_matches_modelopt(flux, precision):
    """Through the public backend API: the plan is realised as planned, every smoothed output-segmented layer has one
    factor set per output segment, and the whole model's output is ModelOpt's per-segment fake quantization (not its
    per-layer one)."""
    pytest.importorskip("modelopt.torch.quantization")
    model, batches = flux
    plan = analysed_tiny_plan(FLUX).with_precision(precision)
    outputs = {}
    for backend_name in ("torchao", "modelopt"):
        backend = backend_or_skip(backend_name)
        for smoothing in SMOOTHINGS:
            options = QuantizeOptions(smoothquant_alpha=ALPHA, smoothing=smoothing, show_progress=False)
            q = backend.quantize(copy.deepcopy(model), plan, options, loop_over(batches))
            if backend_name == "torchao" and smoothing == "per_segment":
                assert_realises(backend, q, plan)
                segmented = [n for n in plan.output_segmented() if n in plan.quantized_layers()]
                assert segmented
                for name, layer in segquant_layers(q).items():
                    assert layer.weight.smooth.shape == (len(plan[name].out_segments), plan[name].in_features), name
            with torch.no_grad():
                outputs[backend_name, smoothing] = q(**batches[0])[0]
    expected = outputs["modelopt", "per_segment"]
    assert agree(outputs["torchao", "per_segment"], expected)
    assert not agree(outputs["torchao", "per_layer"], expected)
    assert not agree(outputs["modelopt", "per_layer"], expected)


def test_save_load_and_calibration_as_data(flux, tmp_path):
    """The checkpoint (diffusers save_pretrained/from_pretrained) and ``calibration_from`` + ``SegQuantConfig(
    calibration=...)`` give back the same layers, bit for bit."""
    model, batches = flux
    backend = backend_or_skip("torchao")
    plan = analysed_tiny_plan(FLUX).with_precision("int8_w8a8")
    options = QuantizeOptions(smoothquant_alpha=ALPHA, smoothing="per_segment", show_progress=False)
    q, _ = backend.quantize_and_save(copy.deepcopy(model), plan, options, loop_over(batches), tmp_path, "transformer")
    loaded = backend.load(tmp_path, "transformer", FLUX, lambda: None, torch.float32)
    name = "transformer_blocks.0.norm1.linear"
    assert segquant_layers(loaded)[name].weight.spec.tiled
    assert backend.quantized_linears(loaded) == backend.quantized_linears(q)
    ao = dict(precision="int8", activation="static", weight_granularity="per_tensor", smoothquant_alpha=ALPHA,
              smoothing="per_segment")
    prepared = copy.deepcopy(model)
    quantize(prepared, SegQuantConfig(plan, step="prepare", **ao))
    loop_over(batches)(prepared)
    calibration = calibration_from(prepared)
    assert torch.tensor(calibration[name]["amax"]).shape == (6, 1)
    again = quantize(copy.deepcopy(model), SegQuantConfig(plan, calibration=calibration, **ao))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batches[0])[0], q(**batches[0])[0], rtol=0, atol=0)
        torch.testing.assert_close(again(**batches[0])[0], q(**batches[0])[0], rtol=0, atol=0)


# ---- refusals ----------------------------------------------------------------------------------------------------

class _DynamicBackend:
    name = "dyn"
    capabilities = Capabilities(precisions=("w4a8",), smoothings=SMOOTHINGS)


def test_dynamic_activations_are_refused():
    with pytest.raises(SegQuantError, match="smoothing='per_segment' needs static activations"):
        SegQuantOptions(precision="int8", smoothing="per_segment")
    with pytest.raises(SegQuantError, match="smoothing='per_segment' needs static activations"):
        SegQuantConfig(SegQuantPlan({"proj": LinearPlan(8, 8, name="proj")}), precision="int8",
                       smoothing="per_segment")
    plan = SegQuantPlan({"proj": LinearPlan(8, 8, name="proj")}).with_precision("w4a8")
    with pytest.raises(SegQuantError, match="per_segment' needs calibrated static activations; precision w4a8"):
        check_supported(_DynamicBackend(), plan, QuantizeOptions(smoothing="per_segment"))


def test_the_folded_realisation_is_refused():
    with pytest.raises(SegQuantError, match="realisation='split_k'"):
        SegQuantOptions(precision="int8", activation="static", realisation="folded", smoothing="per_segment")
    with pytest.raises(SegQuantError, match="realisation 'folded' supports smoothing='per_layer'"):
        QuantizeOptions(realisation="folded", smoothing="per_segment")


def test_an_activation_shift_is_refused_by_name_before_any_change(flux):
    model, batches = flux
    backend = backend_or_skip("torchao")
    plan = analysed_tiny_plan(FLUX).with_shift("per_tensor").with_precision("int8_w8a8")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    options = QuantizeOptions(smoothquant_alpha=ALPHA, smoothing="per_segment", show_progress=False)
    with pytest.raises(SegQuantError, match=f"{plan.shifted()[0]}: per-segment SmoothQuant .* no activation shift"):
        backend.quantize(model, plan, options, loop_over(batches))
    assert not segquant_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_reciprocal_scale_form_is_refused():
    backend = backend_or_skip("torchao")
    assert "per_segment" in backend.capabilities.smoothings
    plan = SegQuantPlan({"proj": LinearPlan(8, 8, name="proj")}).with_precision("int8_w8a8")
    with pytest.raises(SegQuantError, match="backend torchao implements scale_form step, not 'reciprocal'"):
        check_supported(backend, plan, reference_mode.reference_options(ALPHA))


def test_calibration_of_the_other_smoothing_is_refused_by_name():
    layer, model, batches, _ = build("output_segments")
    plan = SegQuantPlan({"proj": layer})
    per_layer = dict(precision="int8", activation="static", smoothquant_alpha=ALPHA)
    prepared = copy.deepcopy(model)
    quantize(prepared, SegQuantConfig(plan, step="prepare", **per_layer))
    for b in batches:
        prepared(b)
    calibration = calibration_from(prepared)
    with pytest.raises(SegQuantError, match="proj: the calibration's SmoothQuant factors do not fit .*per_segment"):
        quantize(copy.deepcopy(model), SegQuantConfig(plan, calibration=calibration, smoothing="per_segment",
                                                      **per_layer))
    flat = {"proj": {**calibration["proj"], "smooth": [calibration["proj"]["smooth"]] * 3}}
    with pytest.raises(SegQuantError, match=r"proj: per-segment SmoothQuant calibration holds 3 x 1 ranges"):
        quantize(copy.deepcopy(model), SegQuantConfig(plan, calibration=flat, smoothing="per_segment", **per_layer))
