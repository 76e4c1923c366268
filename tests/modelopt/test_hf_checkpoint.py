"""HF checkpoints of SegQuant models: truthful quant_algo and scales, strict mode, a bit-exact loader, and
ModelOpt's own exporter refusing SegQuant models instead of mislabelling them."""

import copy
import json

import pytest
import torch
from torch import nn

mtq = pytest.importorskip("modelopt.torch.quantization")
pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

from safetensors.torch import load_file  # noqa: E402

import segquant_modelopt as sm  # noqa: E402
from segquant import SegQuantError  # noqa: E402
from segquant import numerics as nx  # noqa: E402
from segquant_modelopt.hf_checkpoint import SEGQUANT_FILE, WEIGHTS_FILE, describe  # noqa: E402
from test_modelopt import layer_inputs, loop_over, tiny  # noqa: E402

MODELS = ["FluxTransformer2DModel", "SD3Transformer2DModel"]
CONFIGS = ["SEGQUANT_INT8_CFG", "SEGQUANT_INT8_PERCHANNEL_CFG", "SEGQUANT_FP8_CFG", "SEGQUANT_W4A8_CFG"]
STANDARD_ALGOS = {"W8A8_SQ_PER_CHANNEL", "W8A16", "FP8", "FP8_PER_CHANNEL_PER_TOKEN"}


@pytest.fixture(scope="module")
def tiny_models():
    return {name: tiny(name, batches=2) for name in MODELS}


_QUANTIZED = {}


def quantized(tiny_models, model_name, config, **algorithm):
    """One quantized model per setting for the whole module (exporting reads a model, never changes it: tested)."""
    key = (model_name, config, tuple(sorted(algorithm.items())))
    model, data = tiny_models[model_name]
    if key not in _QUANTIZED:
        cfg = sm.with_segquant(getattr(sm, config), show_progress=False, **algorithm)
        _QUANTIZED[key] = mtq.quantize(copy.deepcopy(model), cfg, loop_over(data))
    return _QUANTIZED[key], data


def quant_config(folder):
    return json.loads((folder / "config.json").read_text())["quantization_config"]


ROUND_TRIPS = ([("FluxTransformer2DModel", c, "split_k") for c in CONFIGS] +
               [("FluxTransformer2DModel", c, "folded") for c in CONFIGS if c != "SEGQUANT_W4A8_CFG"] +
               [("SD3Transformer2DModel", c, "split_k") for c in ("SEGQUANT_INT8_CFG", "SEGQUANT_FP8_CFG")] +
               [("SD3Transformer2DModel", "SEGQUANT_INT8_PERCHANNEL_CFG", "folded")])


@pytest.mark.parametrize("model_name,config,realisation", ROUND_TRIPS)
def test_round_trip_is_bit_exact(tiny_models, model_name, config, realisation, tmp_path):
    model, data = quantized(tiny_models, model_name, config, realisation=realisation)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folder = sm.export_hf_checkpoint(model, tmp_path / "ckpt")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # exporting changes nothing
    loaded = sm.load_hf_checkpoint(folder)
    with torch.no_grad():
        for batch in data:
            assert torch.equal(model(**batch)[0], loaded(**batch)[0])
    assert not any(hasattr(m, "weight_quantizer") for m in loaded.modules())  # runs without ModelOpt's modules
    config_json = quant_config(folder)
    algos = {config_json["quant_algo"]} | {v["quant_algo"] for v in config_json.get("quantized_layers", {}).values()}
    assert algos <= STANDARD_ALGOS | {"MIXED_PRECISION", "SEGQUANT"}


def layer_label(folder, name):
    config_json = quant_config(folder)
    if "quantized_layers" in config_json:
        return config_json["quantized_layers"].get(name, {}).get("quant_algo")
    return None if name in config_json["exclude_modules"] else config_json["quant_algo"]


@pytest.mark.parametrize("config", CONFIGS)
def test_quant_algo_and_standard_tensors_tell_the_truth(tiny_models, config, tmp_path):
    """Every layer's label matches what its quantizers do, and a layer labelled with a standard quant_algo is run
    by the standard formula (``Q(x * pre_quant_scale / input_scale) * input_scale @ (codes * weight_scale)``) to
    within rounding of the fake-quant model's output."""
    model, data = quantized(tiny_models, "FluxTransformer2DModel", config, realisation="split_k")
    folder = sm.export_hf_checkpoint(model, tmp_path / "ckpt")
    state = load_file(str(folder / WEIGHTS_FILE))
    layers = describe(model)
    modules = dict(model.named_modules())
    float_model = tiny_models["FluxTransformer2DModel"][0]
    inputs = layer_inputs(float_model, data[:1])
    standard = 0
    for name, layer in layers.items():
        label = layer_label(folder, name)
        module = modules[name]
        dynamic = module.input_quantizer._dynamic
        if label == "SEGQUANT":
            assert layer.needs
            continue
        standard += 1
        assert not layer.needs and not layer.dual_scale_segments
        assert label != "FP8_PER_CHANNEL_PER_TOKEN" or dynamic  # never a static model labelled per token
        assert label not in ("W8A8_SQ_PER_CHANNEL", "FP8") or not dynamic
        codes, w_scale = state[f"{name}.weight"], state[f"{name}.weight_scale"]
        assert codes.dtype == (torch.float8_e4m3fn if label.startswith("FP8") else torch.int8)
        assert w_scale.dim() == (0 if label == "FP8" else 1)
        weight = codes.float() * (w_scale[:, None] if w_scale.dim() else w_scale)
        x = inputs[name][0].float()
        if label in ("W8A8_SQ_PER_CHANNEL", "FP8"):
            in_scale = state[f"{name}.input_scale"]
            assert in_scale.dim() == 0  # one per tensor: what every runtime reads
            pqs = state.get(f"{name}.pre_quant_scale")
            v = x * pqs.float() if pqs is not None else x
            x_hat = nx.fake_quant(v, in_scale, layer.act_format)
        else:
            assert f"{name}.input_scale" not in state
            x_hat = nx.fake_quant(x, nx.scale_from_amax(nx.amax_per_token(x), layer.act_format), layer.act_format)
        bias = state.get(f"{name}.bias")
        got = nn.functional.linear(x_hat, weight, None if bias is None else bias.float())
        with torch.no_grad():
            want = module(inputs[name][0]).float()
        assert nx.sqnr_db(want, got) > 40, f"{name} ({label}): the standard form is not the model's math"
    # INT8/FP8: the unsegmented layers are standard; INT4 per-channel weights with INT8 per-token activations
    # have no ModelOpt quant_algo, so every W4A8 layer is SEGQUANT
    assert (standard == 0) == (config == "SEGQUANT_W4A8_CFG")


def test_static_fp8_is_never_labelled_per_token_and_records_what_fp8_lacks(tiny_models, tmp_path):
    model, _ = quantized(tiny_models, "FluxTransformer2DModel", "SEGQUANT_FP8_CFG", realisation="split_k")
    config_json = quant_config(sm.export_hf_checkpoint(model, tmp_path / "ckpt"))
    section = config_json["segquant"]
    assert config_json["quant_algo"] == "MIXED_PRECISION"
    labels = {v["quant_algo"] for v in config_json["quantized_layers"].values()}
    assert labels == {"FP8", "SEGQUANT"}
    adaln = "transformer_blocks.0.norm1.linear"  # chunked into 6 vectors: 6 weight scales
    assert section["layers"][adaln]["needs"] == ["output_segments"]
    assert len(section["layers"][adaln]["out_segments"]) == 6
    assert set(section["layers_needing_segquant"]) == {n for n, v in config_json["quantized_layers"].items()
                                                       if v["quant_algo"] == "SEGQUANT"}
    assert "proj_out" in config_json["exclude_modules"]


def test_dual_scale_layers_keep_their_negative_ranges(tiny_models, tmp_path):
    model, _ = quantized(tiny_models, "FluxTransformer2DModel", "SEGQUANT_INT8_CFG", realisation="split_k")
    folder = sm.export_hf_checkpoint(model, tmp_path / "ckpt")
    section = quant_config(folder)["segquant"]
    extra = load_file(str(folder / SEGQUANT_FILE))
    dual = [n for n, v in section["layers"].items() if v["dual_scale_segments"]]
    assert dual and all("dual_scale" in section["layers"][n]["needs"] for n in dual)
    for name in dual:
        quantizer = dict(model.named_modules())[name].input_quantizer
        assert torch.equal(extra[f"{name}.input_neg"], quantizer._segquant_seg_neg.float())
        assert (extra[f"{name}.input_neg"] > 0).any()


def test_strict_export_refuses_and_names_the_layers(tiny_models, tmp_path):
    model, _ = quantized(tiny_models, "FluxTransformer2DModel", "SEGQUANT_INT8_CFG", realisation="split_k")
    with pytest.raises(SegQuantError, match=r"strict export: 18 layers need SegQuant beyond the standard ModelOpt formats "
                       r"\(dual_scale, input_segments\): .*time_text_embed\.timestep_embedder\.linear_2 \(dual_scale\)"):
        sm.export_hf_checkpoint(model, tmp_path / "ckpt", strict=True)
    assert not (tmp_path / "ckpt").exists()
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_strict_export_of_a_standard_model_is_plain_modelopt_form(tiny_models, tmp_path):
    model, data = quantized(tiny_models, "FluxTransformer2DModel", "SEGQUANT_INT8_CFG", realisation="folded",
                            dual_scale=False)
    folder = sm.export_hf_checkpoint(model, tmp_path / "ckpt", strict=True)
    config_json = quant_config(folder)
    assert config_json["quant_algo"] == "W8A8_SQ_PER_CHANNEL" and "quantized_layers" not in config_json
    assert config_json["segquant"]["layers_needing_segquant"] == []
    assert config_json["exclude_modules"] == ["proj_out"]
    state = load_file(str(folder / WEIGHTS_FILE))
    assert all(state[k].dim() == 0 for k in state if k.endswith("input_scale"))
    with torch.no_grad():
        assert torch.equal(model(**data[0])[0], sm.load_hf_checkpoint(folder)(**data[0])[0])


def test_modelopt_export_refuses_segquant_models_without_changing_them(tiny_models, tmp_path):
    from modelopt.torch.export import export_hf_checkpoint

    model, data = quantized(tiny_models, "FluxTransformer2DModel", "SEGQUANT_INT8_CFG", realisation="split_k")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SegQuantError, match="segquant_modelopt.export_hf_checkpoint"):
        export_hf_checkpoint(model, export_dir=tmp_path / "modelopt")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_bad_inputs(tiny_models, tmp_path):
    model, data = tiny_models["FluxTransformer2DModel"]
    with pytest.raises(SegQuantError, match="no SegQuant-quantized layer"):
        sm.export_hf_checkpoint(copy.deepcopy(model), tmp_path / "a")
    preset = mtq.quantize(copy.deepcopy(model), mtq.INT8_DEFAULT_CFG, loop_over(data))
    with pytest.raises(SegQuantError, match="quantized by ModelOpt, not by the segquant algorithm"):
        sm.export_hf_checkpoint(preset, tmp_path / "b")
    with pytest.raises(SegQuantError, match="needs a diffusers model"):
        sm.export_hf_checkpoint(nn.Linear(2, 2), tmp_path / "c")
    q, _ = quantized(tiny_models, "FluxTransformer2DModel", "SEGQUANT_FP8_CFG", realisation="split_k")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("mine")
    with pytest.raises(SegQuantError, match="not an empty folder"):
        sm.export_hf_checkpoint(q, tmp_path / "d")
    assert (tmp_path / "d" / "keep.txt").read_text() == "mine"
    with pytest.raises(SegQuantError, match="no config.json"):
        sm.load_hf_checkpoint(tmp_path / "d")
    folder = sm.export_hf_checkpoint(q, tmp_path / "e")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["segquant"]["version"] = 99
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SegQuantError, match="version 99"):
        sm.load_hf_checkpoint(folder)
    folder = sm.export_hf_checkpoint(q, tmp_path / "f")
    (folder / SEGQUANT_FILE).unlink()
    with pytest.raises(SegQuantError, match="segquant.safetensors is missing"):
        sm.load_hf_checkpoint(folder)
    model.save_config(tmp_path / "g")
    with pytest.raises(SegQuantError, match="no quantization_config with a segquant section"):
        sm.load_hf_checkpoint(tmp_path / "g")


def test_bfloat16_model_round_trips_in_bfloat16(tiny_models, tmp_path):
    float_model, data = tiny_models["FluxTransformer2DModel"]
    model = copy.deepcopy(float_model).to(torch.bfloat16)
    batches = [{k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in b.items()}
               for b in data]
    quantized_model = mtq.quantize(model, sm.with_segquant(sm.SEGQUANT_INT8_CFG, show_progress=False),
                                   loop_over(batches))
    folder = sm.export_hf_checkpoint(quantized_model, tmp_path / "ckpt")
    assert quant_config(folder)["segquant"]["dtype"] == "bfloat16"
    loaded = sm.load_hf_checkpoint(folder)
    assert loaded.proj_out.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(quantized_model(**batches[0])[0], loaded(**batches[0])[0])
