"""SegQuant weights as torchao tensors through the flows users run: diffusers save_pretrained/from_pretrained
(denoisers and whole pipelines), state_dict, .to(dtype)/.to(device), and plans that do not fit the model."""

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("torchao")
pytest.importorskip("diffusers")

import segquant  # noqa: E402
from segquant import PlanError, SegQuantError  # noqa: E402
from segquant_torchao import SegQuantConfig, SegQuantTensor, calibration_from, quantize, quantized_layers  # noqa: E402
from torchao.utils import TorchAOBaseTensor  # noqa: E402
from _models import build_tiny, build_tiny_flux_pipeline, build_tiny_sd3_pipeline  # noqa: E402

MODES = {"dynamic": {}, "static_split_k": {"activation": "static", "realisation": "split_k"},
         "static_folded": {"activation": "static", "realisation": "folded"}}


def quantized_copy(model, kwargs, plan, precision, mode):
    q = copy.deepcopy(model)
    options = dict(precision=precision, **MODES[mode])
    if options.get("activation") == "static":
        quantize(q, SegQuantConfig(plan, step="prepare", **options))
        with torch.no_grad():
            q(**kwargs)
    quantize(q, SegQuantConfig(plan, **options))
    return q


def weights_file(folder: Path) -> Path:
    files = list(Path(folder).glob("*.safetensors"))
    assert len(files) == 1, files
    return files[0]


def state_of(model):
    """A comparable snapshot: plain tensors as they are, quantized tensors by their inner tensors and spec."""
    out = {}
    for key, value in model.state_dict().items():
        if isinstance(value, TorchAOBaseTensor):
            names, attrs = value.__tensor_flatten__()
            out[key] = (type(value).__name__, repr(attrs), [getattr(value, n).clone() for n in names])
        else:
            out[key] = value.clone()
    return out


def same_bits(x, y):
    """Bit equality, fp8 codes included (compared as int8: fp8 has no equality kernel on every device)."""
    as_int = (lambda t: t.view(torch.int8) if t.dtype == torch.float8_e4m3fn else t)
    return torch.equal(as_int(x), as_int(y))


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], tuple):
            assert a[key][:2] == b[key][:2], key
            assert all(same_bits(x, y) for x, y in zip(a[key][2], b[key][2])), key
        else:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("model_name", ["FluxTransformer2DModel", "SD3Transformer2DModel"])
@pytest.mark.parametrize("precision", ["fp8", "int8"])
@pytest.mark.parametrize("mode", list(MODES))
def test_save_pretrained_round_trip_is_bit_identical(tmp_path, model_name, precision, mode):
    import diffusers

    model = build_tiny(model_name)
    kwargs = segquant.example_inputs(model)
    plan = segquant.analyze(model, **kwargs)
    q = quantized_copy(model, kwargs, plan, precision, mode)
    with torch.no_grad():
        expected = q(**kwargs)[0]
    q.save_pretrained(tmp_path)
    loaded = getattr(diffusers, model_name).from_pretrained(tmp_path, dtype=torch.float32)
    assert set(quantized_layers(loaded)) == set(plan.quantized_layers())
    assert_same_state(state_of(loaded), state_of(q))
    with torch.no_grad():
        assert torch.equal(loaded(**kwargs)[0], expected)


@pytest.mark.parametrize("precision,mode", [("fp8", "static_split_k"), ("int8", "dynamic")])
def test_checkpoint_stores_quantized_layers_in_8_bits(tmp_path, precision, mode):
    """bf16 weights against the quantized checkpoint: at least 90% of the ideal 8-bit saving. A FLUX at width
    256: on the 32-wide toy layers the per-row float32 scales (4 bytes a row) and each tensor's safetensors
    metadata (about 0.6 kB a layer) alone are more than 10% of a 32x32 layer's codes."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel.from_config(dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=64, num_attention_heads=4,
        joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=[16, 24, 24])).eval().to(torch.bfloat16)
    kwargs = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for k, v in segquant.example_inputs(model).items()}
    plan = segquant.analyze(model, **kwargs)
    model.save_pretrained(tmp_path / "bf16")
    q = quantized_copy(model, kwargs, plan, precision, mode)
    q.save_pretrained(tmp_path / "quantized")
    quantized_bytes = sum(dict(model.named_modules())[n].weight.numel() * 2 for n in plan.quantized_layers())
    saved = weights_file(tmp_path / "bf16").stat().st_size - weights_file(tmp_path / "quantized").stat().st_size
    assert saved >= 0.9 * quantized_bytes / 2, (saved, quantized_bytes)


def test_loading_with_the_quantization_config_the_user_passes(tmp_path):
    """The issue's flow: from_pretrained(..., quantization_config=TorchAoConfig(SegQuantConfig(plan))) of a
    saved SegQuant model loads the saved weights (the folder's own config wins, as diffusers documents)."""
    from diffusers import FluxTransformer2DModel, TorchAoConfig

    model = build_tiny("FluxTransformer2DModel")
    kwargs = segquant.example_inputs(model)
    plan = segquant.analyze(model, **kwargs)
    q = quantized_copy(model, kwargs, plan, "int8", "static_folded")
    q.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="already has a `quantization_config`"):
        loaded = FluxTransformer2DModel.from_pretrained(
            tmp_path, quantization_config=TorchAoConfig(SegQuantConfig(plan, precision="int8")),
            dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded(**kwargs)[0], q(**kwargs)[0])


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_pipeline_round_trip(tmp_path, family):
    """A whole pipeline with a SegQuant transformer: save_pretrained, then from_pretrained of the folder."""
    import diffusers

    build = {"flux": build_tiny_flux_pipeline, "sd3": build_tiny_sd3_pipeline}[family]
    pipe = build(tmp_path / "float")
    transformer = pipe.transformer
    kwargs = segquant.example_inputs(transformer)
    plan = segquant.analyze(transformer, **kwargs)
    pipe.transformer = quantized_copy(transformer, kwargs, plan, "fp8", "static_split_k")
    pipe.save_pretrained(tmp_path / "quantized")
    loaded = type(pipe).from_pretrained(tmp_path / "quantized", dtype=torch.float32)
    assert isinstance(loaded.transformer, getattr(diffusers, type(transformer).__name__))
    assert set(quantized_layers(loaded.transformer)) == set(plan.quantized_layers())
    with torch.no_grad():
        assert torch.equal(loaded.transformer(**kwargs)[0], pipe.transformer(**kwargs)[0])


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_state_dict_into_a_float_model_with_assign(precision):
    model = build_tiny("FluxTransformer2DModel")
    kwargs = segquant.example_inputs(model)
    plan = segquant.analyze(model, **kwargs)
    q = quantized_copy(model, kwargs, plan, precision, "static_split_k")
    fresh = build_tiny("FluxTransformer2DModel", seed=1)
    fresh.load_state_dict(q.state_dict(), assign=True)
    with torch.no_grad():
        assert torch.equal(fresh(**kwargs)[0], q(**kwargs)[0])


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(96, 32)

    def forward(self, x):
        return self.down(torch.cat([x, nn.functional.gelu(self.up(x))], dim=-1))


def test_to_dtype_and_device_keep_codes_and_scales():
    torch.manual_seed(0)
    block = Block()
    x = torch.randn(4, 8, 32)
    plan = segquant.analyze(block, x, analysis_options=segquant.AnalysisOptions(keep_output_layer=False))
    assert plan["down"].in_segments == (32, 64) and plan["down"].dual_scale_segments == (1,)
    float_weights = {name: getattr(block, name).weight.detach().clone() for name in ("up", "down")}
    fresh = copy.deepcopy(block)
    quantize(block, SegQuantConfig(plan, precision="fp8", activation="static", step="prepare"))
    with torch.no_grad():
        block(x)
    calibration = calibration_from(block)
    quantize(block, SegQuantConfig(plan, precision="fp8", activation="static"))
    before = state_of(block)
    with torch.no_grad():
        y32 = block(x)
        moved = copy.deepcopy(block).to("cpu")
        assert torch.equal(moved(x), y32)
        for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half()):
            low = cast(copy.deepcopy(block))
            assert isinstance(low.down.weight, SegQuantTensor) and low.down.weight.dtype in (torch.bfloat16,
                                                                                             torch.float16)
            for key, value in state_of(low).items():
                if isinstance(value, tuple):  # codes and scales untouched; only the logical dtype changed
                    assert all(same_bits(a, b) for a, b in zip(value[2], before[key][2])), key
            dtype = low.down.weight.dtype
            h = torch.cat([x, nn.functional.gelu(block.up(x))], dim=-1).to(dtype)
            for name, inp in (("up", x.to(dtype)), ("down", h)):
                # the same codes and scales: the low-precision layer is the float32 one, rounded at its output
                got, want = getattr(low, name)(inp), getattr(block, name)(inp.float())
                assert got.dtype == dtype
                torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())
            assert low(x.to(dtype)).dtype == dtype
    with pytest.raises(SegQuantError, match="cannot become torch.int8"):
        block.down.weight.to(torch.int8)
    # dequantize (diffusers' _dequantize calls it): the float weight the codes stand for, in split-K and
    # with the activation scales folded into the weight columns (undone here)
    folded = copy.deepcopy(fresh)
    quantize(folded, SegQuantConfig(plan, precision="fp8", activation="static", realisation="folded",
                                    calibration=calibration))
    for model in (block, folded):
        for name in ("up", "down"):
            original, restored = float_weights[name], getattr(model, name).weight.dequantize()
            assert restored.shape == original.shape and restored.dtype == torch.float32
            error = (restored - original).abs().max() / original.abs().max()
            assert 0 < error < 0.07, (name, error)  # fp8 e4m3 keeps 3 mantissa bits: at most 1/16 relative


def test_a_quantized_diffusers_model_refuses_a_dtype_cast_with_diffusers_error():
    model = build_tiny("FluxTransformer2DModel")
    kwargs = segquant.example_inputs(model)
    plan = segquant.analyze(model, **kwargs)
    q = quantized_copy(model, kwargs, plan, "int8", "dynamic")
    with pytest.raises(ValueError, match="Casting a quantized model to a new `dtype` is unsupported"):
        q.to(torch.bfloat16)
    with pytest.raises(ValueError, match="`.half\\(\\)` is not supported for quantized model"):
        q.half()
    with torch.no_grad():
        assert torch.equal(q.to("cpu")(**kwargs)[0], q(**kwargs)[0])


def test_a_plan_that_does_not_fit_fails_before_any_layer_changes(tmp_path):
    from diffusers import FluxTransformer2DModel, TorchAoConfig
    from torchao.quantization import quantize_

    model = build_tiny("FluxTransformer2DModel")
    sd3 = build_tiny("SD3Transformer2DModel")
    sd3_plan = segquant.analyze(sd3, **segquant.example_inputs(sd3))
    plan = segquant.analyze(model, **segquant.example_inputs(model))
    before = state_of(model)
    foreign = sd3_plan.to_dict()
    foreign["model_class"] = ""  # no class name to give it away: the layers must
    wrong_shape = plan.to_dict()
    last = plan.quantized_layers()[-1]
    wrong_shape["layers"][last]["out_features"] += 16
    wrong_shape["layers"][last]["out_segments"] = [wrong_shape["layers"][last]["out_features"]]
    for bad in (sd3_plan, foreign, wrong_shape):
        for entry in (lambda c: quantize_(model, c, filter_fn=None), lambda c: quantize(model, c)):
            with pytest.raises(SegQuantError):
                entry(SegQuantConfig(bad))
            assert_same_state(state_of(model), before)
            assert not quantized_layers(model)
    # a Linear the plan does not name (a loader visits one Linear at a time): refused by name
    partial = plan.to_dict()
    partial["model_class"] = ""
    del partial["layers"]["x_embedder"]
    with pytest.raises(PlanError, match="the plan belongs to another model"):
        quantize_(model.x_embedder, SegQuantConfig(partial).fqn_to_config["re:.*"])
    # diffusers quantizing a float checkpoint while loading, with a plan of another model
    model.save_pretrained(tmp_path)
    with pytest.raises(SegQuantError):
        FluxTransformer2DModel.from_pretrained(tmp_path, quantization_config=TorchAoConfig(SegQuantConfig(foreign)),
                                               dtype=torch.float32)


def test_checkpoints_of_earlier_versions_still_load(tmp_path):
    """Float weights plus <denoiser>.segquant_torchao.json (plan, options, calibration): quantized while loading."""
    import dataclasses
    import json

    from segquant_torchao import SegQuantOptions

    model = build_tiny("FluxTransformer2DModel")
    kwargs = segquant.example_inputs(model)
    plan = segquant.analyze(model, **kwargs)
    options = SegQuantOptions(precision="int8", activation="static")
    prepared = copy.deepcopy(model)
    quantize(prepared, SegQuantConfig(plan, options=options, step="prepare"))
    with torch.no_grad():
        prepared(**kwargs)
    calibration = calibration_from(prepared)
    model.save_pretrained(tmp_path / "transformer")
    (tmp_path / "transformer.segquant_torchao.json").write_text(json.dumps(
        {"plan": plan.to_dict(), "calibration": calibration, "options": dataclasses.asdict(options)}))
    loaded = segquant.get_backend("torchao").load(tmp_path, "transformer", "FluxTransformer2DModel",
                                                  lambda: None, torch.float32)
    expected = copy.deepcopy(model)
    quantize(expected, SegQuantConfig(plan, options=options, calibration=calibration))
    with torch.no_grad():
        assert torch.equal(loaded(**kwargs)[0], expected(**kwargs)[0])
    (tmp_path / "transformer.segquant_torchao.json").unlink()
    with pytest.raises(SegQuantError, match="no quantized layer was loaded"):
        segquant.get_backend("torchao").load(tmp_path, "transformer", "FluxTransformer2DModel", lambda: None,
                                             torch.float32)
