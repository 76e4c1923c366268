"""The activation shift through ModelOpt: fake quantization against segquant.numerics (static and per-token,
with DualScale, per channel, folded, per-layer SmoothQuant alpha), save/restore, ONNX (a Sub before the Q/DQ, the
shift in the bias) against onnxruntime, HF checkpoints, and bad input."""

import copy
from collections import Counter

import pytest
import torch
from torch import nn

mtq = pytest.importorskip("modelopt.torch.quantization")
pytest.importorskip("diffusers")

import modelopt.torch.opt as mto  # noqa: E402

import segquant  # noqa: E402
from segquant import QuantizeOptions, SegmentAmaxObserver, SegQuantError  # noqa: E402
from segquant import numerics as nx  # noqa: E402
from segquant.calib import layer_alpha, static_calibration  # noqa: E402
import segquant_modelopt as sm  # noqa: E402
from segquant_modelopt.hf_checkpoint import SEGQUANT_FILE, describe, read_quantization_config  # noqa: E402
from _models import build_tiny  # noqa: E402
from test_modelopt import assert_matches_reference, layer_inputs, loop_over, tiny  # noqa: E402
from test_modelopt import quantize as quantize_analysing  # noqa: E402

FF = "transformer_blocks.0.ff.net.2"            # GELU input, DualScale on its one segment
PROJ = "single_transformer_blocks.0.proj_out"   # 32 | 128 (attention | GELU), DualScale on segment 1
SHIFTS = {"*ff.net.2": {"shift": "per_tensor"}, "single_transformer_blocks.*.proj_out": {"shift": "per_channel"}}
TIGHT = 1e-5  # x max|ref|: ONNX Q/DQ rounds like the reference (see test_onnx_tensorrt)


class Flux:
    """The tiny FLUX, its calibration batches, its analysed plan and every Linear's inputs, computed once."""

    def __init__(self):
        self.model, self.data = tiny(batches=2)
        self.plan = segquant.analyze(self.model, **self.data[0])
        self.inputs = layer_inputs(self.model, self.data)
        self.quantized = {}


@pytest.fixture(scope="module")
def flux():
    return Flux()


def quantize(flux, base=None, overrides=None, dual_scale=None, **algorithm):
    """``mtq.quantize`` of a copy with the analysed plan (analysis is most of a quantization's time on CPU), once per
    setting for the module: the tests only read the quantized models (exporting changes nothing: tested)."""
    base = base or mtq.INT8_DEFAULT_CFG
    key = (repr(base), repr(overrides), dual_scale is not False, repr(sorted(algorithm.items())))
    if key not in flux.quantized:
        plan = flux.plan.with_overrides(overrides or {}).ablate(dual_scale=dual_scale is not False)
        cfg = sm.with_segquant(base, show_progress=False, plan=plan.to_dict(), **algorithm)
        flux.quantized[key] = mtq.quantize(copy.deepcopy(flux.model), cfg, loop_over(flux.data))
    return flux.quantized[key]


def reference(flux, plan, name, spec, alpha=None):
    """The oracle's output of layer ``name`` on its first calibration input, with its stats calibrated over all."""
    float_layer = dict(flux.model.named_modules())[name]
    inputs = flux.inputs[name]
    observer = SegmentAmaxObserver(plan[name])
    for x in inputs:
        observer.update(x)
    stats, smooth = static_calibration(observer, float_layer.weight.detach().float(), layer_alpha(plan[name], alpha))
    x = inputs[0]
    return x, nx.reference_linear(x, float_layer.weight, float_layer.bias, plan[name], spec, stats, smooth), stats


def assert_shift_matters(module, got, expected, unshifted, name):
    """The layer matches the shifted oracle, which is measurably away from the unshifted one and holds a bias term
    ``W_hat c`` far above the tolerance: a dropped shift or a missing bias correction would fail."""
    assert_matches_reference(got, expected, name)
    tol = TIGHT * expected.abs().max().item()
    assert (got - unshifted).abs().max() > 100 * tol, f"{name}: the shift changed nothing"
    with torch.no_grad():
        w_hat = module.weight_quantizer(module.weight)  # the weight the GEMM uses (folded: with a_s folded in)
        correction = nx.shift_bias(w_hat, None, module.input_quantizer.shift_offset())
    assert correction.abs().max() > 100 * tol, f"{name}: W_hat c is too small to test"


CASES = [  # realisation, alpha, overrides, dual_scale
    ("split_k", None, SHIFTS, True),
    ("split_k", 0.5, SHIFTS, True),
    ("split_k", 0.5, SHIFTS, False),
    ("folded", None, SHIFTS, True),
    ("folded", None, {"single_transformer_blocks.*.proj_out": {"shift": "per_tensor", "shift_segments": [1]}}, False),
]


@pytest.mark.parametrize("realisation, alpha, overrides, dual", CASES)
def test_shifted_layers_match_reference(flux, realisation, alpha, overrides, dual):
    quantized = quantize(flux, realisation=realisation, alpha=alpha, overrides=overrides, dual_scale=dual)
    plan = sm.plan_of(quantized)
    assert len(plan.shifted()) == (4 if overrides is SHIFTS else 2)
    assert all(plan[n].dual_scale == dual for n in plan.shifted())  # shift alone, or with DualScale on the segment
    spec = nx.QuantSpec(realisation=realisation, weight_granularity="per_channel")
    modules = dict(quantized.named_modules())
    for name in plan.shifted():
        x, expected, stats = reference(flux, plan, name, spec, alpha)
        quantizer = modules[name].input_quantizer
        assert torch.equal(quantizer.shift_center, stats.center) and "shifted" in repr(quantizer)
        _, unshifted, _ = reference(flux, plan.override(name, shift=None), name, spec, alpha)
        with torch.no_grad():
            got = modules[name](x)
        assert_shift_matters(modules[name], got, expected, unshifted, name)


def test_per_layer_alpha_from_the_plan_is_used(flux):
    overrides = {FF: {"shift": "per_tensor", "smoothquant_alpha": 0.2}, PROJ: {"smoothquant_alpha": 0.9}}
    quantized = quantize(flux, alpha=0.5, overrides=overrides)
    plan = sm.plan_of(quantized)
    modules, float_modules = dict(quantized.named_modules()), dict(flux.model.named_modules())
    for name, alpha in ((FF, 0.2), (PROJ, 0.9), ("transformer_blocks.1.ff.net.2", 0.5)):
        channel_amax = torch.stack([x.abs().reshape(-1, x.shape[-1]).amax(0) for x in flux.inputs[name]]).amax(0)
        expected = nx.smoothquant_factors(float_modules[name].weight, channel_amax, alpha)
        torch.testing.assert_close(modules[name].input_quantizer.pre_quant_scale, expected)
    x, expected, _ = reference(flux, plan, FF, nx.QuantSpec(weight_granularity="per_channel"), 0.5)
    with torch.no_grad():
        assert_matches_reference(modules[FF](x), expected, FF)


def test_per_layer_alpha_smooths_that_layer_only_without_a_global_alpha(flux):
    """Through the analysing path too: mtq.quantize(model, config with overrides, loop), no plan given."""
    quantized = quantize_analysing(flux.model, flux.data, overrides={FF: {"smoothquant_alpha": 0.3,
                                                                          "shift": "per_channel"}})
    assert sm.plan_of(quantized).shifted() == [FF]
    smoothed = [n for n, m in quantized.named_modules()
                if isinstance(m, nn.Linear) and m.input_quantizer.is_enabled and m.input_quantizer.pre_quant_scale
                is not None]
    assert smoothed == [FF]


def test_dynamic_per_token_shift_matches_reference_and_needs_calibration(flux):
    overrides = {"*ff.net.2": {"shift": "per_tensor"}}
    quantized = quantize(flux, sm.SEGQUANT_W4A8_CFG, overrides=overrides)
    plan = sm.plan_of(quantized)
    spec = nx.QuantSpec(weight_format="int4", weight_granularity="per_channel", act_granularity="per_token")
    for name in plan.shifted():
        x, expected, stats = reference(flux, plan, name, spec)
        _, unshifted, _ = reference(flux, plan.override(name, shift=None), name, spec)
        quantizer = dict(quantized.named_modules())[name].input_quantizer
        assert quantizer._segquant_role == "dynamic" and torch.equal(quantizer.shift_center, stats.center)
        module = dict(quantized.named_modules())[name]
        with torch.no_grad():
            assert_shift_matters(module, module(x), expected, unshifted, name)
    fresh = copy.deepcopy(flux.model)
    plan = flux.plan.with_overrides(overrides).to_dict()
    cfg = sm.with_segquant(sm.SEGQUANT_W4A8_CFG, show_progress=False, plan=plan)
    with pytest.raises(SegQuantError, match="transformer_blocks.0.ff.net.2 .* activation shift.*forward_loop"):
        mtq.quantize(fresh, cfg, None)
    assert not any(hasattr(m, "input_quantizer") for m in fresh.modules())  # left as it was


def test_backend_quantize_save_and_load_keep_the_shift(flux, tmp_path):
    model, data = flux.model, flux.data
    backend = segquant.get_backend("modelopt")
    plan = flux.plan.with_precision("int8_w8a8").with_shift("per_tensor")
    plan = plan.override(FF, smoothquant_alpha=0.8)
    options = QuantizeOptions(smoothquant_alpha=0.5, show_progress=False)
    quantized, files = backend.quantize_and_save(copy.deepcopy(model), plan, options, loop_over(data), tmp_path,
                                                 "transformer")
    assert set(sm.plan_of(quantized).shifted()) == set(plan.shifted()) and FF in plan.shifted()
    x, expected, _ = reference(flux, plan, FF, nx.QuantSpec(), 0.5)  # per-tensor weights; FF's alpha 0.8
    with torch.no_grad():
        assert_matches_reference(dict(quantized.named_modules())[FF](x), expected, FF)
    loaded = backend.load(tmp_path, "transformer", "FluxTransformer2DModel", _float_flux, torch.float32)
    for name in plan.shifted():
        center = dict(loaded.named_modules())[name].input_quantizer.shift_center
        assert torch.equal(center, dict(quantized.named_modules())[name].input_quantizer.shift_center)
    with torch.no_grad():
        assert torch.equal(loaded(**data[1])[0], quantized(**data[1])[0])


def _float_flux():
    return build_tiny("FluxTransformer2DModel")


def test_mto_save_restore_keeps_centres_and_outputs(flux, tmp_path):
    data = flux.data
    quantized = quantize(flux, realisation="folded", overrides=SHIFTS)
    mto.save(quantized, tmp_path / "segquant.pth")
    restored = sm.restore(_float_flux(), tmp_path / "segquant.pth")
    proj = restored.single_transformer_blocks[0].proj_out.input_quantizer
    assert proj.shift_center is not None and proj._segquant_shift == "per_channel"
    with torch.no_grad():
        assert torch.equal(restored(**data[1])[0], quantized(**data[1])[0])


# ---- ONNX -----------------------------------------------------------------------------------------

def _ort(path, batch):
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: batch[i.name].numpy() for i in session.get_inputs()})[0]


def _shift_subs(path):
    """Per Sub of a constant: how its DequantizeLinear outputs reach a MatMul (``"MatMul"`` directly, ``"Add"``:
    DualScale's two branches added, then the MatMul). A Sub must feed only Q/DQ (through DualScale's sign split),
    and no DQ output may meet a constant (an ``Add`` of ``c`` after the Q/DQ) before the MatMul."""
    onnx = pytest.importorskip("onnx")
    graph = onnx.load(str(path)).graph
    consumers, producers = {}, {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    constants = {t.name for t in graph.initializer}
    found = []
    for node in graph.node:
        if node.op_type != "Sub":
            continue
        assert node.input[1] in constants or producers[node.input[1]].op_type == "Constant"
        frontier, quants = [node], []
        while frontier:  # through the sign split (Relu, Min, Where ...) to the QuantizeLinear nodes
            nxt = [c for n in frontier for c in consumers[n.output[0]]]
            assert not [c for c in nxt if c.op_type in ("MatMul", "Gemm")], "a Sub reaches the MatMul unquantized"
            quants += [c for c in nxt if c.op_type == "QuantizeLinear"]
            frontier = [c for c in nxt if c.op_type != "QuantizeLinear"]
        dequants = [d for q in quants for d in consumers[q.output[0]]]
        assert {d.op_type for d in dequants} == {"DequantizeLinear"}
        after = {c.op_type for d in dequants for c in consumers[d.output[0]]}
        if after == {"Add"}:  # DualScale: Add(DQ+, DQ-) -> MatMul
            (add,) = {id(c): c for d in dequants for c in consumers[d.output[0]]}.values()
            assert set(add.input) == {d.output[0] for d in dequants}
            assert [c.op_type for c in consumers[add.output[0]]] == ["MatMul"]
        else:
            assert after == {"MatMul"}
        found.append(after.pop())
    return found, Counter(n.op_type for n in graph.node)


@pytest.mark.parametrize("mode, realisation, dual", [("tensorrt", "folded", False), ("qdq", "split_k", None),
                                                     ("qdq", "folded", None)])
def test_onnx_subtracts_the_centre_and_matches_onnxruntime(flux, mode, realisation, dual, tmp_path):
    from segquant_modelopt.export import export_onnx

    data = flux.data
    quantized = quantize(flux, realisation=realisation, dual_scale=dual, overrides=SHIFTS)
    plain = quantize(flux, realisation=realisation, dual_scale=dual)
    biases = {n: None if m.bias is None else m.bias.clone() for n, m in quantized.named_modules()
              if isinstance(m, nn.Linear)}
    path = export_onnx(quantized, data[0], tmp_path / "model.onnx", mode=mode)
    assert all(torch.equal(m.bias, biases[n]) for n, m in quantized.named_modules()
               if isinstance(m, nn.Linear) and m.bias is not None)  # the bias is corrected only while exporting
    fed, ops = _shift_subs(path)
    shifted = sm.plan_of(quantized).shifted()
    assert len(fed) == len(shifted) == 4
    dual_shifted = [n for n in shifted if sm.plan_of(quantized)[n].dual_scale]
    assert sorted(fed) == sorted(["Add"] * len(dual_shifted) + ["MatMul"] * (len(shifted) - len(dual_shifted)))
    out = _ort(path, data[1])
    with torch.no_grad():
        ref, unshifted = quantized(**data[1])[0].numpy(), plain(**data[1])[0].numpy()
    scale = abs(ref).max()
    print(f"{mode} {realisation}: max abs diff {abs(out - ref).max():.2e} (output max {scale:.2f})")
    assert abs(out - ref).max() <= TIGHT * scale
    assert abs(unshifted - ref).max() > 100 * TIGHT * scale  # a shift without its bias correction would show


def test_onnx_export_without_segquants_exporter_adds_the_centre_back(flux, tmp_path):
    """``torch.onnx.export`` called directly (no bias correction) still exports the right numbers."""
    data = flux.data
    quantized = quantize(flux, realisation="folded", dual_scale=False, overrides=SHIFTS)
    from segquant_modelopt.export import _KeywordModule, _torchscript_export

    names = [k for k, v in data[0].items() if isinstance(v, torch.Tensor)]
    constants = {k: v for k, v in data[0].items() if k not in names}
    path = tmp_path / "direct.onnx"
    _torchscript_export(_KeywordModule(quantized, names, constants), tuple(data[0][n] for n in names), path, 17, names)
    with torch.no_grad():
        ref = quantized(**data[1])[0].numpy()
    assert abs(_ort(path, data[1]) - ref).max() <= TIGHT * abs(ref).max()


# ---- HF checkpoint --------------------------------------------------------------------------------

@pytest.mark.parametrize("config, realisation", [("SEGQUANT_INT8_CFG", "split_k"), ("SEGQUANT_INT8_CFG", "folded"),
                                                 ("SEGQUANT_W4A8_CFG", "split_k")])
def test_hf_checkpoint_round_trip_keeps_the_shift(flux, config, realisation, tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    data = flux.data
    quantized = quantize(flux, getattr(sm, config), realisation=realisation, overrides=SHIFTS)
    layers = describe(quantized)
    assert layers[FF].shift == "per_tensor" and layers[PROJ].shift == "per_channel" and layers[PROJ].shift_segments
    assert "shift" in layers[FF].needs and layers[FF].standard is None
    folder = sm.export_hf_checkpoint(quantized, tmp_path / "ckpt")
    extra = load_file(str(folder / SEGQUANT_FILE))
    center = dict(quantized.named_modules())[FF].input_quantizer.shift_center
    assert torch.equal(extra[f"{FF}.input_center"], center)
    section = read_quantization_config(folder)[1]["segquant"]
    assert section["layers"][FF]["shift"] == "per_tensor" and FF in section["layers_needing_segquant"]
    assert "shift" in section["layers"][FF]["needs"] and "shift" in section["needs"]
    loaded = sm.load_hf_checkpoint(folder)
    with torch.no_grad():
        for batch in data:
            assert torch.equal(loaded(**batch)[0], quantized(**batch)[0])
    with pytest.raises(SegQuantError, match="strict export: .*shift"):
        sm.export_hf_checkpoint(quantized, tmp_path / "strict", strict=True)


def test_checkpoint_missing_the_centre_names_the_layer(flux, tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file, save_file

    folder = sm.export_hf_checkpoint(quantize(flux, overrides=SHIFTS), tmp_path / "ckpt")
    path = folder / SEGQUANT_FILE
    extra = load_file(str(path))
    del extra[f"{PROJ}.input_center"]
    save_file(extra, str(path))
    with pytest.raises(SegQuantError, match=f"layer {PROJ} needs segquant.safetensors tensor {PROJ}.input_center"):
        sm.load_hf_checkpoint(folder)


def test_bad_shift_in_a_given_plan_is_refused_before_quantizing(flux):
    plan = flux.plan.with_precision("int8_w8a8").to_dict()
    plan["layers"][FF]["shift"] = "per_tensor"
    plan["layers"][FF]["shift_segments"] = [1]  # FF has one input segment
    fresh = copy.deepcopy(flux.model)
    cfg = sm.with_segquant(sm.SEGQUANT_INT8_CFG, show_progress=False, plan=plan)
    with pytest.raises(segquant.PlanError, match=f"{FF}: shift_segments \\[1\\] out of range for 1 input segments"):
        mtq.quantize(fresh, cfg, loop_over(flux.data))
    assert not any(hasattr(m, "input_quantizer") for m in fresh.modules())
