"""segquant_torchao on CPU: every quantized layer against segquant.numerics, compile, round trips,
the diffusers loading path and bad input. The GPU counterpart is benchmarks/torchao_gpu.py."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

pytest.importorskip("torchao")
pytest.importorskip("diffusers")

import segquant  # noqa: E402
from segquant import LinearPlan, PlanError, SegQuantError  # noqa: E402
from segquant import numerics as nx  # noqa: E402
from segquant.recording import record_linears  # noqa: E402
from segquant_torchao import (SegLinearConfig, SegLinearSpec, SegQuantConfig, SegQuantOptions,  # noqa: E402
                              SegQuantTensor, calibration_from, quantize, quantized_layers)
from torchao.utils import TorchAOBaseTensor  # noqa: E402
from _models import build_tiny  # noqa: E402

# Same codes as the reference; only the accumulation order differs (fp32 in both).
RTOL, ATOL = 1e-4, 1e-5


def tiny(name="FluxTransformer2DModel", seed=0):
    model = build_tiny(name, seed=seed)
    kwargs = segquant.example_inputs(model)
    return model, kwargs, segquant.analyze(model, **kwargs)


def capture_inputs(model, kwargs):
    """Every Linear's first input."""
    with record_linears(model) as rec, torch.no_grad():
        model(**kwargs)
    return {name: xs[0] for name, xs in rec.inputs.items()}


def calibration_from_run(model, kwargs, plan, **options):
    """The calibration of a static prepare on a copy of ``model``."""
    prepared = copy.deepcopy(model)
    quantize(prepared, SegQuantConfig(plan, activation="static", step="prepare", **options))
    with torch.no_grad():
        prepared(**kwargs)
    return calibration_from(prepared)


def static_quantize(model, kwargs, plan, **options):
    quantize(model, SegQuantConfig(plan, activation="static", step="prepare", **options))
    with torch.no_grad():
        model(**kwargs)
    calibration = calibration_from(model)
    quantize(model, SegQuantConfig(plan, activation="static", step="convert", **options))
    return calibration


def torchao_layer(float_layer, layer_plan, spec):
    """A plain layer as torchao's own dynamic config quantizes it (int8: Int8DynamicActivationInt8WeightConfig)."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    assert layer_plan.is_plain and spec.weight_format == "int8" and spec.act_granularity == "per_token"
    expected = copy.deepcopy(float_layer)
    quantize_(expected, Int8DynamicActivationInt8WeightConfig())
    return expected


def check_layers(model, quantized, plan, inputs, spec, calibration=None):
    """SegQuant layers against segquant.numerics; plain layers on torchao's tensors against torchao itself."""
    modules = dict(model.named_modules())
    checked = 0
    for name, layer in quantized_layers(quantized).items():
        x = inputs[name]
        if not isinstance(layer.weight, SegQuantTensor):
            expected_layer = torchao_layer(modules[name], plan[name], spec)
            assert type(layer.weight) is type(expected_layer.weight), name
            with torch.no_grad():
                torch.testing.assert_close(layer(x), expected_layer(x), rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
            checked += 1
            continue
        stats = None
        if calibration is not None:
            c = calibration[name]
            stats = nx.ActivationStats(*(torch.tensor(c[k]) for k in ("amax", "pos_amax", "neg_amax")))
        float_layer = modules[name]
        expected = nx.reference_linear(x, float_layer.weight, float_layer.bias, plan[name], spec, stats)
        with torch.no_grad():
            got = layer(x)
        torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")
        checked += 1
    assert checked == len(plan.quantized_layers())
    return checked


@pytest.mark.parametrize("model_name", ["FluxTransformer2DModel", "SD3Transformer2DModel"])
@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_dynamic_layers_match_reference(model_name, precision):
    model, kwargs, plan = tiny(model_name)
    inputs = capture_inputs(model, kwargs)
    quantized = copy.deepcopy(model)
    quantize(quantized, SegQuantConfig(plan, precision=precision))
    spec = nx.QuantSpec(weight_format=precision, weight_granularity="per_channel", act_format=precision,
                        act_granularity="per_token")
    check_layers(model, quantized, plan, inputs, spec)


@pytest.mark.parametrize("model_name", ["FluxTransformer2DModel", "SD3Transformer2DModel"])
@pytest.mark.parametrize("precision", ["fp8", "int8"])
@pytest.mark.parametrize("realisation", ["folded", "split_k"])
def test_static_layers_match_reference(model_name, precision, realisation):
    model, kwargs, plan = tiny(model_name)
    inputs = capture_inputs(model, kwargs)
    quantized = copy.deepcopy(model)
    calibration = static_quantize(quantized, kwargs, plan, precision=precision, realisation=realisation,
                                  weight_granularity="per_tensor")
    spec = nx.QuantSpec(weight_format=precision, weight_granularity="per_tensor", act_format=precision,
                        realisation=realisation)
    check_layers(model, quantized, plan, inputs, spec, calibration)
    # the tolerance would catch a wrong scale: the same layer without its segments is far off
    name = "single_transformer_blocks.0.proj_out" if "Flux" in model_name else "transformer_blocks.0.norm1.linear"
    layer, x = dict(quantized.named_modules())[name], inputs[name]
    float_layer = dict(model.named_modules())[name]
    plain = nx.reference_linear(x, float_layer.weight, float_layer.bias,
                                LinearPlan(float_layer.in_features, float_layer.out_features), spec)
    with torch.no_grad():
        assert not torch.allclose(layer(x), plain, rtol=RTOL, atol=ATOL)


def test_dual_scale_and_segments_are_used():
    model, kwargs, plan = tiny()
    quantized = copy.deepcopy(model)
    quantize(quantized, SegQuantConfig(plan, precision="int8"))
    proj_out = quantized.single_transformer_blocks[0].proj_out
    assert type(proj_out) is nn.Linear and isinstance(proj_out.weight, SegQuantTensor)
    assert proj_out.weight.spec.in_segments == (32, 128) and proj_out.weight.spec.dual_segments == (1,)
    ablated = copy.deepcopy(model)
    quantize(ablated, SegQuantConfig(plan, precision="int8", seg_linear=False, dual_scale=False, activation="static",
                                     calibration=calibration_from_run(model, kwargs, plan, precision="int8",
                                                                      seg_linear=False, dual_scale=False)))
    assert ablated.single_transformer_blocks[0].proj_out.weight.spec.in_segments == (160,)
    assert ablated.single_transformer_blocks[0].proj_out.weight.spec.dual_segments == ()
    # dynamic and plain (no segments, no DualScale): torchao's own int8 tensor
    dynamic = copy.deepcopy(model)
    quantize(dynamic, SegQuantConfig(plan, precision="int8", seg_linear=False, dual_scale=False))
    assert type(dynamic.single_transformer_blocks[0].proj_out.weight).__name__ == "Int8Tensor"


def test_plain_int8_layers_stay_segquant_tensors_on_cuda():
    """torchao's Int8Tensor cannot run a compiled layer with 16 rows or fewer on CUDA (torch._int_mm); SegQuant's
    own int8 GEMM pads small M, so plain int8 layers on CUDA keep a SegQuantTensor (decided without a GPU)."""
    from segquant_torchao.plain import plain_config

    spec = SegLinearSpec("x", 64, 256, (64,), (256,), (), SegQuantOptions(precision="int8", kernel="naive"))
    assert type(plain_config(spec, torch.device("cpu"))).__name__ == "Int8DynamicActivationInt8WeightConfig"
    assert plain_config(spec, torch.device("cuda")) is None


def test_config_takes_a_saved_plan(tmp_path):
    model, kwargs, plan = tiny()
    plan.save(tmp_path / "plan.json")
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    quantize(a, SegQuantConfig(str(tmp_path / "plan.json"), precision="int8"))
    quantize(b, SegQuantConfig(plan, precision="int8"))
    with torch.no_grad():
        torch.testing.assert_close(a(**kwargs)[0], b(**kwargs)[0], rtol=0, atol=0)
    with pytest.raises(SegQuantError, match="plan must be a SegQuantPlan"):
        SegQuantConfig(42)


def test_skip_keeps_layers_in_high_precision():
    model, kwargs, plan = tiny()
    quantize(model, SegQuantConfig(plan, skip=["proj_out", "x_embedder"]))
    assert not isinstance(model.proj_out.weight, TorchAOBaseTensor)
    assert not isinstance(model.x_embedder.weight, TorchAOBaseTensor)
    assert plan["proj_out"].high_precision  # the analysis keeps the model's output layer already
    assert len(quantized_layers(model)) == len(plan.quantized_layers()) - 1


class Block(nn.Module):
    """A FLUX single block in miniature: adaLN chunk, cat([attn, gelu(mlp)]) -> proj_out."""

    def __init__(self, d=32, mlp=64):
        super().__init__()
        self.mod = nn.Linear(d, 3 * d)
        self.qkv = nn.Linear(d, 3 * d)
        self.mlp = nn.Linear(d, mlp)
        self.proj_out = nn.Linear(d + mlp, d)

    def forward(self, x, emb):
        shift, scale, gate = self.mod(nn.functional.silu(emb)).chunk(3, dim=-1)
        h = x * (1 + scale[:, None]) + shift[:, None]
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        attn = nn.functional.scaled_dot_product_attention(q, k, v)
        return x + gate[:, None] * self.proj_out(torch.cat([attn, nn.functional.gelu(self.mlp(h))], dim=-1))


@pytest.mark.parametrize("activation", ["dynamic", "static"])
def test_compile_fullgraph_in_inference_mode(activation):
    torch.manual_seed(0)
    block = Block().eval()
    x, emb = torch.randn(2, 24, 32), torch.randn(2, 32)
    plan = segquant.analyze(block, x, emb)
    assert plan["proj_out"].dual_scale_segments == (1,)
    if activation == "static":
        quantize(block, SegQuantConfig(plan, activation="static", step="prepare"))
        with torch.no_grad():
            block(x, emb)
        quantize(block, SegQuantConfig(plan, activation="static", step="convert"))
    else:
        quantize(block, SegQuantConfig(plan))
    with torch.inference_mode():
        eager = block(x, emb)
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(x, emb)
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_compile_with_inductor(precision):
    torch.manual_seed(0)
    block = Block().eval()
    x, emb = torch.randn(2, 24, 32), torch.randn(2, 32)
    quantize(block, SegQuantConfig(segquant.analyze(block, x, emb), precision=precision))
    with torch.inference_mode():
        eager = block(x, emb)
        compiled = torch.compile(block, fullgraph=True)(x, emb)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_config_dict_round_trip():
    from torchao.core.config import config_from_dict, config_to_dict

    model, kwargs, plan = tiny()
    config = SegQuantConfig(plan, precision="int8", skip=["proj_out"], dual_scale=False)
    restored = config_from_dict(config_to_dict(config))
    assert type(restored) is SegQuantConfig and restored.plan == config.plan
    assert list(restored.fqn_to_config) == list(config.fqn_to_config)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    quantize(a, config)
    quantize(b, restored)
    with torch.no_grad():
        torch.testing.assert_close(a(**kwargs)[0], b(**kwargs)[0], rtol=0, atol=0)


def test_state_dict_round_trip():
    model, kwargs, plan = tiny()
    source = copy.deepcopy(model)
    calibration = static_quantize(source, kwargs, plan, precision="fp8")
    other, _, _ = tiny(seed=1)  # different float weights: everything must come from the state dict
    quantize(other, SegQuantConfig(plan, precision="fp8", activation="static", calibration=calibration))
    other.load_state_dict(source.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(other(**kwargs)[0], source(**kwargs)[0], rtol=0, atol=0)


def test_diffusers_from_pretrained_quantizes(tmp_path):
    from diffusers import FluxTransformer2DModel, TorchAoConfig

    model, kwargs, plan = tiny()
    model.save_pretrained(tmp_path)
    config = SegQuantConfig(plan, precision="int8")
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path, quantization_config=TorchAoConfig(config),
                                                    dtype=torch.float32)
    direct = copy.deepcopy(model)
    quantize(direct, SegQuantConfig(plan, precision="int8"))
    assert set(quantized_layers(loaded)) == set(quantized_layers(direct)) == set(plan.quantized_layers())
    for name, layer in quantized_layers(loaded).items():
        assert type(layer.weight) is type(quantized_layers(direct)[name].weight)
        if isinstance(layer.weight, SegQuantTensor):
            assert layer.weight.spec == quantized_layers(direct)[name].weight.spec
    with torch.no_grad():
        torch.testing.assert_close(loaded(**kwargs)[0], direct(**kwargs)[0], rtol=0, atol=0)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def _assert_unchanged(model, before):
    state, types = before
    assert [type(m) for m in model.modules()] == types
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)


def test_bad_input_leaves_model_unchanged():
    model, kwargs, plan = tiny()
    before = _state(model)
    other_plan = tiny("SD3Transformer2DModel")[2]
    with pytest.raises(PlanError, match="made for SD3Transformer2DModel, the model is a FluxTransformer2DModel"):
        quantize(model, SegQuantConfig(other_plan))
    foreign = other_plan.to_dict()
    foreign["model_class"] = ""
    with pytest.raises(PlanError, match="timestep_embedder.linear_1: the plan says 256->16, the module is 256->32"):
        quantize(model, SegQuantConfig(foreign))
    wrong = plan.to_dict()
    wrong["layers"]["proj_out"]["in_features"] = 64
    wrong["layers"]["proj_out"]["in_segments"] = [64]
    with pytest.raises(PlanError, match="proj_out: the plan says 64->"):
        quantize(model, SegQuantConfig(wrong))
    with pytest.raises(SegQuantError, match="convert before prepare"):
        quantize(model, SegQuantConfig(plan, activation="static", step="convert"))
    _assert_unchanged(model, before)
    quantize(model, SegQuantConfig(plan, activation="static", step="prepare"))
    with pytest.raises(SegQuantError, match="calibration reached no data for 49 layer"):
        quantize(model, SegQuantConfig(plan, activation="static", step="convert"))
    assert not quantized_layers(model)
    with pytest.raises(SegQuantError, match="precision must be one of"):
        SegQuantConfig(plan, precision="int4")
    with pytest.raises(SegQuantError, match="needs a plan"):
        SegQuantConfig()
    with pytest.raises(PlanError, match="high-precision pattern 'nothing' matches no layer"):
        SegQuantConfig(plan, skip=["nothing"])
    with pytest.raises(SegQuantError, match="dynamic activation scales need no prepare step"):
        SegLinearConfig(options=SegQuantOptions(activation="dynamic"), step="prepare")


def test_unsupported_dtype_and_double_quantization():
    from torchao.quantization import quantize_

    model, kwargs, plan = tiny()
    quantize(model, SegQuantConfig(plan))
    with pytest.raises(SegQuantError, match="already quantized \\(SegQuantTensor\\); quantize a fresh copy"):
        quantize(model, SegQuantConfig(plan))
    layer = nn.Linear(16, 16).to(torch.float8_e4m3fn)
    config = SegLinearConfig(name="l", in_features=16, out_features=16)
    with pytest.raises(SegQuantError, match="l: weight dtype torch.float8_e4m3fn is not a float dtype"):
        quantize_(layer, config)
    with torch.device("meta"):
        meta_layer = nn.Linear(16, 16)
    with pytest.raises(SegQuantError, match="meta device"):
        quantize_(meta_layer, config)
    good = nn.Linear(16, 16)
    quantize_(good, config)
    with pytest.raises(SegQuantError, match="l: input has last dim 8, the layer takes 16"):
        good(torch.randn(2, 8))


def test_kernel_shape_handling():
    from segquant_torchao.kernels import codes, pad_to, scaled_mm

    x = torch.randn(5, 20)
    assert pad_to(x, 1, 16).shape == (5, 32) and torch.equal(pad_to(x, 1, 16)[:, :20], x)
    assert pad_to(x, 0, 8, minimum=24).shape == (24, 20)
    assert pad_to(x, 1, 4) is x
    w = torch.randn(24, 20)
    for precision, multiple in (("fp8", 16), ("int8", 8)):
        # K = 20 is not a kernel multiple: the weight is padded once, the activation per call;
        # int8 with M = 5 (<= 16) is padded to 24 rows instead of a silent slow path
        ws = nx.scale_from_amax(w.abs().amax(1, keepdim=True), precision)
        qw = pad_to(codes(w, ws, precision).view(torch.int8), 1, multiple)
        qw = qw.view(torch.float8_e4m3fn) if precision == "fp8" else qw
        xs = nx.scale_from_amax(x.abs().amax(1, keepdim=True), precision)
        y = scaled_mm(codes(x, xs, precision), qw, xs, ws.t(), torch.float32)
        expected = nx.fake_quant(x, xs, precision) @ nx.fake_quant(w, ws, precision).t()
        torch.testing.assert_close(y, expected, rtol=RTOL, atol=ATOL)
    with pytest.raises(TypeError, match="fp8 or int8 codes"):
        scaled_mm(x, w, xs, ws.t(), torch.float32)


def test_unaligned_layer_shapes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 36), nn.SiLU(), nn.Linear(36, 10))
    x = torch.randn(3, 20)
    plan = segquant.analyze(model, x, analysis_options=segquant.AnalysisOptions(keep_output_layer=False))
    for precision in ("fp8", "int8"):
        q = copy.deepcopy(model)
        quantize(q, SegQuantConfig(plan, precision=precision))
        with torch.no_grad():
            h = nn.functional.silu(model[0](x))
            spec = nx.QuantSpec(weight_format=precision, weight_granularity="per_channel", act_format=precision,
                                act_granularity="per_token")
            torch.testing.assert_close(q[2](h), nx.reference_linear(h, model[2].weight, model[2].bias, plan["2"], spec),
                                       rtol=RTOL, atol=ATOL)
            assert q(x).shape == (3, 10)


def test_calibration_must_match_the_plan():
    """Calibrated with the segmented plan, converted with SegLinear off: a clear error, not wrong scales."""
    model, kwargs, plan = tiny()
    calibration = static_quantize(copy.deepcopy(model), kwargs, plan)
    before = _state(model)
    with pytest.raises(PlanError, match="calibration amax has shape \\(2,\\), "
                                        "the plan has 1 input segments"):
        quantize(model, SegQuantConfig(plan, activation="static", seg_linear=False, calibration=calibration))
    partial = {name: {"amax": c["amax"]} for name, c in calibration.items()}
    with pytest.raises(SegQuantError, match="calibration needs amax, pos_amax and neg_amax"):
        quantize(model, SegQuantConfig(plan, activation="static", calibration=partial))
    _assert_unchanged(model, before)


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_empty_batch_through_every_realisation(precision):
    model, kwargs, plan = tiny()
    layer_plan = plan["single_transformer_blocks.0.proj_out"]
    x = torch.randn(4, layer_plan.in_features)
    for options in ({}, {"activation": "static", "realisation": "folded"},
                    {"activation": "static", "realisation": "split_k"}):
        layer = copy.deepcopy(model.single_transformer_blocks[0].proj_out)
        stats = nx.activation_stats(x, layer_plan.in_segments)
        amax = {k: getattr(stats, k).tolist() for k in ("amax", "pos_amax", "neg_amax")} if options else {}
        from torchao.quantization import quantize_

        quantize_(layer, SegLinearConfig(name="p", in_features=160, out_features=32, in_segments=[32, 128],
                                         dual_scale_segments=[1], options=SegQuantOptions(precision=precision, **options),
                                         **amax))
        with torch.no_grad():
            assert layer(torch.zeros(0, 160)).shape == (0, 32)


def test_an_applied_plan_decides_the_options():
    from segquant.recipe import load_recipe

    model, kwargs, plan = tiny()
    applied = load_recipe("mnist-flux/int8_w8a8").apply(plan)
    config = SegQuantConfig(applied)
    assert (config.options.precision, config.options.activation, config.options.weight_granularity) == \
        ("int8", "static", "per_tensor")
    assert set(config.layer_configs()) == set(applied.quantized_layers())
    with pytest.raises(SegQuantError, match="the plan's precision int8_w8a8 is precision=int8"):
        SegQuantConfig(applied, precision="fp8")
    with pytest.raises(SegQuantError, match="skip, seg_linear and dual_scale would change it"):
        SegQuantConfig(applied, skip=["x_embedder"] if not applied["x_embedder"].high_precision else ["norm_out.*"])
    assert SegQuantConfig(plan, precision="int8_w8a8").options == config.options  # a registry name works too
    for bad, message in (({"skip": "proj_out"}, "skip must be a list"), ({"seg_linear": "no"}, "seg_linear must be"),
                         ({"calibration": {"a": 3}}, "calibration maps layer names"),
                         ({"bogus": 1}, "fields of SegQuantOptions")):
        with pytest.raises(SegQuantError, match=message):
            SegQuantConfig(plan, **bad)
    with pytest.raises(PlanError, match="does not exist"):
        SegQuantConfig("no/such/plan.json")


def test_a_failed_calibration_leaves_the_model_unchanged():
    from segquant.recipe import load_recipe

    model, kwargs, plan = tiny()
    before = _state(model)
    applied = load_recipe("mnist-flux/int8_w8a8").apply(plan)
    backend = segquant.get_backend("torchao")

    def broken(m):
        m(**kwargs)
        raise RuntimeError("disk on fire")

    with pytest.raises(SegQuantError, match="forward_loop raised RuntimeError during calibration: disk on fire"):
        backend.quantize(model, applied, segquant.QuantizeOptions(), broken)
    _assert_unchanged(model, before)
    with pytest.raises(SegQuantError, match="calibration reached no data for 41 layer"):
        backend.quantize(model, applied, segquant.QuantizeOptions(), lambda m: None)
    _assert_unchanged(model, before)


def test_repeated_blocks_share_one_compiled_graph():
    """Regional compile (diffusers' compile_repeated_blocks): the layers' names take no part in the weights'
    metadata, so one compiled block serves every block instead of recompiling per block."""
    from torch._dynamo.utils import counters

    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block() for _ in range(4)])

        def forward(self, x, emb):
            for block in self.blocks:
                x = block(x, emb)
            return x

    torch.manual_seed(0)
    model = Blocks().eval()
    x, emb = torch.randn(2, 24, 32), torch.randn(2, 32)
    plan = segquant.analyze(model, x, emb)
    quantize(model, SegQuantConfig(plan, activation="static", step="prepare"))
    with torch.no_grad():
        model(x, emb)
    quantize(model, SegQuantConfig(plan, activation="static"))
    torch._dynamo.reset()
    counters.clear()
    for block in model.blocks:
        block.compile(fullgraph=True, backend="eager")
    with torch.inference_mode():
        model(x.clone(), emb.clone())
    assert counters["stats"]["unique_graphs"] == 1


def test_folded_layers_multiply_by_the_stored_reciprocal():
    """A folded layer multiplies its input by ``col_inv``: one value for an input without segments (so the producer
    of the input quantizes without a per-column load), one per column where the segments' scales differ; a weight
    saved before ``col_inv`` was stored derives it and computes the same output."""
    from segquant_torchao.tensor import column_multiplier

    model, kwargs, plan = tiny()
    static_quantize(model, kwargs, plan, precision="fp8", realisation="folded")
    layers = quantized_layers(model)
    plain = layers["single_transformer_blocks.0.attn.to_q"].weight
    segmented = layers["single_transformer_blocks.0.proj_out"].weight
    assert plain.col_inv.shape == (1,) and plain.col_scale.shape == (plain.shape[1],)
    torch.testing.assert_close(plain.col_inv.expand_as(plain.col_scale), 1.0 / plain.col_scale, rtol=0, atol=0)
    assert segmented.col_inv.shape == segmented.col_scale.shape and segmented.col_inv.unique().numel() > 1
    torch.testing.assert_close(segmented.col_inv, 1.0 / segmented.col_scale, rtol=0, atol=0)
    x = torch.randn(3, segmented.shape[1])
    names, _ = segmented.__tensor_flatten__()
    inner = {n: getattr(segmented, n) for n in names if n != "col_inv"}
    old = SegQuantTensor(spec=segmented.spec, dtype=segmented.dtype, **inner)  # as loaded from an older checkpoint
    torch.testing.assert_close(old.col_inv, segmented.col_inv, rtol=0, atol=0)
    torch.testing.assert_close(F.linear(x, old), F.linear(x, segmented), rtol=0, atol=0)
    # the shape is the spec's, not the values': equal divisors on a segmented layer stay per column
    assert column_multiplier(torch.full((5,), 4.0), plain.spec).tolist() == [0.25]
    assert column_multiplier(torch.full((5,), 4.0), segmented.spec).tolist() == [0.25] * 5
    # a weight unpickled from before col_inv (torchao's __setstate__ skips __init__) divides by col_scale
    unpickled = SegQuantTensor(spec=segmented.spec, dtype=segmented.dtype, **inner)
    unpickled.col_inv = None
    torch.testing.assert_close(F.linear(x, unpickled), F.linear(x, segmented), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_multiplying_by_the_reciprocal_gives_the_dividing_codes_but_at_rounding_ties(precision):
    """``x * (1 / d)`` is within one float32 rounding of ``x / d``: the codes differ only where the quotient sits that
    close to a rounding boundary of the format (a few in a million), and then by one step."""
    from segquant_torchao.kernels import codes

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1_000_000, generator=gen) * 4
    for d in (0.0123, 0.05, 0.3, 1.7):
        divisor = torch.tensor([d])
        by_division = codes(x, divisor, precision).float()
        by_product = codes(x * (1.0 / divisor), 1.0, precision).float()
        differ = by_division != by_product
        assert differ.float().mean() < 2e-5, d
        if differ.any():  # one step of the format apart: e4m3's spacing at that magnitude, or 1 for int8
            gap = (by_division - by_product).abs()[differ]
            step = 1.0 if precision == "int8" else 2.0 ** (torch.floor(torch.log2(by_division.abs()[differ])) - 3)
            assert torch.all(gap <= step * 1.0001), d
