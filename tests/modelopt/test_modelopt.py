"""segquant_modelopt on CPU: mtq.quantize with the segquant algorithm, every quantized layer against
segquant.numerics, the ablation switches, save/restore and bad input."""

import copy
import re
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

mtq = pytest.importorskip("modelopt.torch.quantization")
pytest.importorskip("diffusers")

import modelopt.torch.opt as mto  # noqa: E402

import segquant  # noqa: E402
from segquant import SegmentAmaxObserver, SegQuantError  # noqa: E402
from segquant import numerics as nx  # noqa: E402
from segquant.recording import record_linears  # noqa: E402
import segquant_modelopt as sm  # noqa: E402
from _models import build_tiny, seeded_batches  # noqa: E402

# SegmentTensorQuantizer fake-quantizes through segquant.numerics, so every quantized layer matches the
# reference to float32 accumulation error; 1e-5 relative to the layer's output range.
RTOL, ATOL = 1e-5, 1e-5


def assert_matches_reference(got, expected, name):
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL * scale, msg=lambda m: f"{name}: {m}")


def tiny(name="FluxTransformer2DModel", batches=3):
    model = build_tiny(name)
    return model, seeded_batches(model, batches, first_seed=100)


def loop_over(data):
    def forward_loop(model):
        for batch in data:
            model(**batch)
    return forward_loop


def layer_inputs(model, data):
    """Every Linear's inputs over the calibration batches (float model)."""
    with record_linears(model, transform=lambda t: t.detach().clone()) as rec, torch.no_grad():
        loop_over(data)(model)
    return rec.inputs


def quantize(model, data, base=None, **algorithm):
    cfg = sm.with_segquant(base or mtq.INT8_DEFAULT_CFG, show_progress=False, **algorithm)
    return mtq.quantize(copy.deepcopy(model), cfg, loop_over(data))


def check_against_reference(model, quantized, data, spec):
    """With SmoothQuant (split_k), the reference sees the smoothed input x * s and weight W / s, s being
    the plugin's pre_quant_scale (tested on its own in test_smoothquant_is_an_exact_rescaling)."""
    plan = sm.plan_of(quantized)
    inputs = layer_inputs(model, data)
    modules = dict(quantized.named_modules())
    checked = []
    for name, float_layer in model.named_modules():
        if not isinstance(float_layer, nn.Linear) or not modules[name].input_quantizer.is_enabled:
            continue
        smooth = modules[name].input_quantizer.pre_quant_scale if spec.realisation == "split_k" else None
        smooth = torch.ones(float_layer.in_features) if smooth is None else smooth
        observer = SegmentAmaxObserver(plan[name])
        for x in inputs[name]:
            observer.update(x * smooth)
        x = inputs[name][0]
        expected = nx.reference_linear(x * smooth, float_layer.weight / smooth, float_layer.bias, plan[name], spec,
                                       observer.stats())
        with torch.no_grad():
            got = modules[name](x)
        assert_matches_reference(got, expected, name)
        if plan[name].seg_linear or plan[name].dual_scale:  # the check would catch a plan that was ignored
            plain = nx.reference_linear(x * smooth, float_layer.weight / smooth, float_layer.bias, plan[name].replace(
                in_segments=(), out_segments=(), dual_scale=False), spec)
            assert not torch.isclose(got, plain, rtol=RTOL, atol=ATOL * expected.abs().max().item()).all()
        checked.append(name)
    return plan, checked


@pytest.mark.parametrize("name", ["FluxTransformer2DModel", "SD3Transformer2DModel", "UNet2DConditionModel"])
def test_int8_layers_match_reference(name):
    model, data = tiny(name)
    cfg = sm.with_segquant(sm.SEGQUANT_INT8_CFG, show_progress=False)  # the paper's W8A8, SmoothQuant 0.5
    quantized = mtq.quantize(copy.deepcopy(model), cfg, loop_over(data))
    plan, checked = check_against_reference(model, quantized, data, nx.QuantSpec(weight_granularity="per_tensor"))
    smoothed = [n for n in checked if dict(quantized.named_modules())[n].input_quantizer.pre_quant_scale is not None]
    assert smoothed == checked  # SmoothQuant 0.5 ran on every quantized layer
    # every Linear but the final proj_out (kept in high precision by the SegQuant configs) is checked
    expected = [n for n in plan.layers if n != "proj_out"]
    assert sorted(checked) == sorted(expected)


@pytest.mark.parametrize("realisation", ["split_k", "folded"])
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_realisations_and_formats_match_reference(realisation, fmt):
    model, data = tiny()
    base = mtq.INT8_DEFAULT_CFG if fmt == "int8" else sm.configs._with_weights(mtq.FP8_DEFAULT_CFG, None)
    quantized = quantize(model, data, base=base, realisation=realisation)
    spec = nx.QuantSpec(weight_format=fmt, act_format=fmt, realisation=realisation,
                        weight_granularity="per_channel" if fmt == "int8" else "per_tensor")
    check_against_reference(model, quantized, data, spec)
    proj = quantized.single_transformer_blocks[0].proj_out.input_quantizer
    assert isinstance(proj, sm.SegmentTensorQuantizer) and proj.dual_scale
    if realisation == "folded":
        assert proj.pre_quant_scale is not None and proj.amax.dim() == 0  # one per-tensor scale


def test_smoothquant_is_an_exact_rescaling():
    model, data = tiny()
    quantized = quantize(model, data, alpha=0.5)
    name = "transformer_blocks.0.ff.net.2"
    layer, float_layer = dict(quantized.named_modules())[name], dict(model.named_modules())[name]
    smooth = layer.input_quantizer.pre_quant_scale
    assert smooth is not None and not torch.allclose(smooth, torch.ones_like(smooth))
    torch.testing.assert_close(layer.weight * smooth, float_layer.weight, rtol=1e-5, atol=1e-6)
    x = layer_inputs(model, data)[name][0]
    with torch.no_grad():
        assert nx.sqnr_db(float_layer(x), layer(x)) > 30


def test_ablation_switches_change_exactly_the_planned_layers():
    model, data = tiny()
    full = quantize(model, data)
    plan = sm.plan_of(full)

    def features(q):
        out = {}
        for name, m in q.named_modules():
            if isinstance(getattr(m, "input_quantizer", None), sm.SegmentTensorQuantizer):
                out[name] = (m.input_quantizer.amax.numel() > 1, m.input_quantizer.dual_scale,
                             m.weight_quantizer.amax.unique().numel() if name in plan.output_segmented() else 0)
        return out

    base = features(full)
    no_seg = features(quantize(model, data, seg_linear=False))
    no_dual = features(quantize(model, data, dual_scale=False))
    changed_seg = sorted(n for n in base if base[n][0] != no_seg[n][0])
    changed_dual = sorted(n for n in base if base[n][1] != no_dual[n][1])
    # input segments: the 2 timestep/guidance embedders and the 2 single-block proj_out
    assert changed_seg == sorted(plan.input_segmented()) == [
        "single_transformer_blocks.0.proj_out", "single_transformer_blocks.1.proj_out",
        "time_text_embed.guidance_embedder.linear_1", "time_text_embed.timestep_embedder.linear_1"]
    # DualScale: every SiLU/GELU-fed layer except the final proj_out left in high precision
    assert changed_dual == sorted(n for n in plan.dual_scaled() if n != "proj_out")
    assert len(changed_dual) == 16
    assert all(not v[1] for v in no_dual.values())


@pytest.mark.parametrize("config", ["int8_split_k", "int8_folded", "w4a8"])
def test_save_restore_is_bit_identical(config, tmp_path):
    model, data = tiny()
    if config == "w4a8":
        quantized = mtq.quantize(copy.deepcopy(model), sm.with_segquant(sm.SEGQUANT_W4A8_CFG, show_progress=False))
    else:
        quantized = quantize(model, data, realisation=config.split("_", 1)[1], alpha=0.5)
    mto.save(quantized, tmp_path / "segquant.pth")
    restored = mto.restore(build_tiny("FluxTransformer2DModel"), tmp_path / "segquant.pth")
    proj = restored.single_transformer_blocks[0].proj_out.input_quantizer
    assert isinstance(proj, sm.SegmentTensorQuantizer)
    assert proj.dual_scale or proj._segquant_dual_segments == [1]
    with torch.no_grad():
        assert torch.equal(restored(**data[0])[0], quantized(**data[0])[0])


def test_restore_without_the_plugin_fails_clearly(tmp_path):
    model, data = tiny(batches=1)
    mto.save(quantize(model, data), tmp_path / "segquant.pth")
    code = ("import sys; sys.path[:0] = ['tests']; import modelopt.torch.opt as mto; from _models import build_tiny; "
            f"mto.restore(build_tiny('FluxTransformer2DModel'), r'{tmp_path / 'segquant.pth'}')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode != 0 and "segquant_modelopt.quantizer.SegQuantFlag" in done.stderr


def test_bad_input():
    model, data = tiny(batches=1)
    with pytest.raises(SegQuantError, match="needs calibration data"):
        mtq.quantize(copy.deepcopy(model), sm.SEGQUANT_CFG, None)

    def broken(m):
        raise RuntimeError("disk on fire")

    with pytest.raises(SegQuantError, match="forward_loop raised RuntimeError during graph analysis: disk on fire"):
        mtq.quantize(copy.deepcopy(model), sm.SEGQUANT_CFG, broken)
    with pytest.raises(SegQuantError, match="never called FluxTransformer2DModel"):
        mtq.quantize(copy.deepcopy(model), sm.SEGQUANT_CFG, lambda m: None)
    nan_data = [dict(data[0], hidden_states=torch.full_like(data[0]["hidden_states"], float("nan")))]
    with pytest.raises(SegQuantError, match="x_embedder: calibration input contains NaN or Inf"):
        quantize(model, nan_data)
    with pytest.raises(segquant.PlanError, match="in_segments"):
        quantize(model, data, overrides={"single_transformer_blocks.*.proj_out": {"in_segments": [100]}})
    quantized = quantize(model, data)
    with torch.no_grad():
        before = quantized(**data[0])[0]
    with pytest.raises(SegQuantError, match="already quantized by SegQuant"):
        mtq.quantize(quantized, sm.with_segquant(mtq.INT8_DEFAULT_CFG, show_progress=False), loop_over(data))
    with torch.no_grad():
        assert torch.equal(quantized(**data[0])[0], before)
    with pytest.raises(SegQuantError, match="list form"):
        sm.with_segquant({"quant_cfg": {"*": {"enable": False}}})


def test_configs_quantize_single_block_proj_out_but_not_the_final_one():
    for cfg in (sm.SEGQUANT_CFG, sm.SEGQUANT_INT8_CFG, sm.SEGQUANT_FP8_CFG):
        names = [e.get("quantizer_name") for e in cfg["quant_cfg"]]
        assert not any("proj_out" in (n or "") for n in names)  # no layer names: the plan decides
        assert cfg["algorithm"]["method"] == "segquant"
    assert sm.SEGQUANT_INT8_CFG["algorithm"]["alpha"] == 0.5
    assert "alpha" not in sm.SEGQUANT_FP8_CFG["algorithm"]
    assert sm.with_segquant(mtq.INT8_SMOOTHQUANT_CFG)["algorithm"]["alpha"] == 1.0
    derived = sm.with_segquant(sm.SEGQUANT_INT8_CFG, show_progress=False)
    assert derived["algorithm"] == {"method": "segquant", "alpha": 0.5, "show_progress": False}
    model, data = tiny(batches=1)
    quantized = mtq.quantize(copy.deepcopy(model), sm.with_segquant(sm.SEGQUANT_FP8_CFG, show_progress=False),
                             loop_over(data))
    assert quantized.single_transformer_blocks[0].proj_out.input_quantizer.is_enabled
    assert not quantized.proj_out.input_quantizer.is_enabled and not quantized.proj_out.weight_quantizer.is_enabled
    assert sm.plan_of(quantized)["proj_out"].high_precision  # the analysis keeps the model's output layer


def test_progress_bar_can_be_silenced(capsys):
    model, data = tiny(batches=2)
    quantize(model, data)
    assert "SegQuant calibration" not in capsys.readouterr().err
    mtq.quantize(copy.deepcopy(model), sm.with_segquant(mtq.INT8_DEFAULT_CFG), loop_over(data))
    assert "SegQuant calibration" in capsys.readouterr().err


@pytest.mark.parametrize("realisation", ["split_k", "folded"])
def test_onnx_export_runs_in_onnxruntime(realisation, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from segquant_modelopt.export import export_onnx, qdq_counts

    model, data = tiny(batches=2)
    quantized = quantize(model, data, realisation=realisation)
    path = export_onnx(quantized, data[0], tmp_path / "flux.onnx", mode="qdq")  # per-K and DualScale Q/DQ
    plan = sm.plan_of(quantized)
    quantized_layers = [n for n in plan.layers if n != "proj_out"]  # 49 of the 50 Linear layers
    dual = [n for n in plan.dual_scaled() if n != "proj_out"]       # 16 with a second (negative) branch
    expected = 2 * len(quantized_layers) + len(dual)                 # input + weight Q/DQ, + x- branch
    assert qdq_counts(path) == {"QuantizeLinear": expected, "DequantizeLinear": expected} == {
        "QuantizeLinear": 114, "DequantizeLinear": 114}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no Q/DQ fusion
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    out = session.run(None, {i.name: data[1][i.name].numpy() for i in session.get_inputs()})[0]
    with torch.no_grad():
        ref = quantized(**data[1])[0].numpy()
    max_diff = float(abs(out - ref).max())
    print(f"ONNX ({realisation}) vs PyTorch fake quant: max abs diff {max_diff:.2e} (output max {abs(ref).max():.2f})")
    assert max_diff < 1e-5 * abs(ref).max()


def test_w4a8_dynamic_matches_reference_and_needs_no_loop():
    model, data = tiny()
    cfg = sm.with_segquant(sm.SEGQUANT_W4A8_CFG, show_progress=False)
    quantized = mtq.quantize(copy.deepcopy(model), cfg, None)  # dynamic activations: no calibration data
    plan = sm.plan_of(quantized)
    inputs = layer_inputs(model, data)
    modules = dict(quantized.named_modules())
    spec = nx.QuantSpec(weight_format="int4", weight_granularity="per_channel", act_granularity="per_token")
    checked = 0
    for name, float_layer in model.named_modules():
        if isinstance(float_layer, nn.Linear) and modules[name].input_quantizer.is_enabled:
            x = inputs[name][0]
            expected = nx.reference_linear(x, float_layer.weight, float_layer.bias, plan[name], spec)
            with torch.no_grad():
                assert_matches_reference(modules[name](x), expected, name)
            checked += 1
    assert checked == 49
    with torch.no_grad():
        assert nx.sqnr_db(model(**data[0])[0], quantized(**data[0])[0]) > 10


@pytest.mark.parametrize("realisation", ["split_k", "folded"])
def test_dual_scale_segment_without_positive_values(realisation):
    """SiLU outputs that are all negative: s+ falls back to 1 and the negative side keeps its precision."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(-1.0)
        model[0].weight[:, 0] = 0.5  # pre-activations in about [-2, 0): every SiLU output is negative
    data = [torch.rand(32, 8) * 2 - 1 for _ in range(2)]
    plan = segquant.analyze(model, data[0], analysis_options=segquant.AnalysisOptions(keep_output_layer=False))
    quantized = mtq.quantize(copy.deepcopy(model), sm.with_segquant(
        mtq.INT8_DEFAULT_CFG, show_progress=False, realisation=realisation, plan=plan.to_dict()),
        lambda m: [m(x) for x in data])
    h = torch.nn.functional.silu(model[0](data[0]))
    assert h.max() < 0
    observer = SegmentAmaxObserver(sm.plan_of(quantized)["2"])
    for x in data:
        observer.update(torch.nn.functional.silu(model[0](x)))
    spec = nx.QuantSpec(weight_granularity="per_channel", realisation=realisation)
    expected = nx.reference_linear(h, model[2].weight, model[2].bias, sm.plan_of(quantized)["2"], spec, observer.stats())
    with torch.no_grad():
        got = quantized[2](h)
    assert_matches_reference(got, expected, "2")
    assert nx.sqnr_db(model[2](h), got) > 30


def test_precomputed_plan_gives_the_same_model_and_is_checked():
    model, data = tiny()
    analysed = quantize(model, data)
    plan = sm.plan_of(analysed)
    given = quantize(model, data, plan=plan.to_dict())
    with torch.no_grad():
        assert torch.equal(given(**data[0])[0], analysed(**data[0])[0])
    assert sm.plan_of(given).to_dict() == plan.to_dict()
    other = segquant.SegQuantPlan.from_dict({**plan.to_dict(), "layers": {
        k: v for k, v in plan.to_dict()["layers"].items() if k != "x_embedder"}})
    with pytest.raises(SegQuantError, match="no entry for x_embedder"):
        quantize(model, data, plan=other.to_dict())


def test_int6_inputs_match_reference():
    """W8A6 (a study setting): INT6 static activations through the same reference numerics."""
    model, data = tiny()
    base = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
    for entry in base["quant_cfg"]:
        if entry.get("quantizer_name") == "*input_quantizer":
            entry["cfg"]["num_bits"] = 6
    quantized = quantize(model, data, base=base)
    check_against_reference(model, quantized, data, nx.QuantSpec(act_format="int6", weight_granularity="per_channel"))


def test_a_given_plan_is_quantized_as_it_is():
    """Technique switches or overrides beside a given plan would apply a second time: refused, not applied."""
    model, data = tiny(batches=1)
    plan = segquant.analyze(model, **data[0])
    with pytest.raises(SegQuantError, match="would change it"):
        quantize(model, data, plan=plan.to_dict(), dual_scale=False)
    with pytest.raises(SegQuantError, match="would change it"):
        quantize(model, data, plan=plan.to_dict(), overrides={"proj_out": {"dual_scale": False}})
    fp8 = segquant.load_recipe("mnist-flux/fp8").apply(plan)  # no DualScale: the FP8 config's switch changes nothing
    config = sm.config_for_plan(fp8, segquant.QuantizeOptions(show_progress=False))
    quantized = mtq.quantize(copy.deepcopy(model), config, loop_over(data))
    assert sm.plan_of(quantized) == fp8
    names = [e.get("quantizer_name") for e in sm.SEGQUANT_CFG["quant_cfg"]]
    assert not any(n not in ("*", "*weight_quantizer", "*input_quantizer") for n in names)  # no layer-name rules
    with pytest.raises(SegQuantError, match="config_for_plan needs an applied plan"):
        sm.config_for_plan(plan)
    with pytest.raises(SegQuantError, match="takes a segquant.SegQuantPlan"):
        sm.config_for_plan(plan.to_dict())
    with pytest.raises(SegQuantError, match="alpha must be a number in"):
        sm.with_segquant(mtq.INT8_DEFAULT_CFG, alpha=2)


def test_quant_summary_shows_segments_and_dual_scale_negative_range(capsys):
    model, data = tiny(batches=2)
    quantized = quantize(model, data)
    capsys.readouterr()
    mtq.print_quant_summary(quantized)
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    proj = lines["single_transformer_blocks.0.proj_out.input_quantizer"]
    # positive amax over all 160 columns, the negative side's over the 128 DualScale (GELU) columns only
    assert re.search(r" amax=\[\S+, \S+\]\(160\) neg_amax=\[\S+, \S+\]\(128\) ", proj)
    assert "segquant=input segments=32|128 dual_scale=1" in proj
    weight = lines["transformer_blocks.0.norm1.linear.weight_quantizer"]
    assert "segquant=weight out_segments=6x32 per_channel" in weight and "neg_amax" not in weight
    plain = lines["transformer_blocks.0.attn.to_q.input_quantizer"]
    assert "segquant=input segments=" in plain and "neg_amax" not in plain and "dual_scale" not in plain
    assert lines["proj_out.input_quantizer"].endswith("TensorQuantizer(disabled)")


def test_baseline_preset_quiet_about_the_layers_it_switches_off(capsys):
    """ModelOpt's SmoothQuant preset switches every *proj_out* off and then warns that each is not calibrated;
    the backend keeps that (expected) warning and ModelOpt's prints out of the output."""
    model, data = tiny(batches=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantized, label = sm.ModelOptBackend().quantize_baseline(copy.deepcopy(model), "int8_w8a8", loop_over(data))
    assert label == "ModelOpt INT8_SMOOTHQUANT_CFG" and not quantized.proj_out.input_quantizer.is_enabled
    assert [str(w.message) for w in caught if "skip smoothing" in str(w.message)] == []
    assert capsys.readouterr().out == ""  # "Inserted N quantizers", "Smoothed N modules": INFO records now
