"""ONNX for TensorRT: ``export_onnx(mode="tensorrt")`` writes per-tensor activation Q/DQ only (folded
realisation, DualScale off) and refuses what it cannot; ``mode="qdq"`` keeps today's per-channel and DualScale
Q/DQ. onnxruntime is compared with the PyTorch fake quantization at its basic and default optimisation levels."""

import json
from collections import Counter

import pytest
import torch
from torch import nn

mtq = pytest.importorskip("modelopt.torch.quantization")
pytest.importorskip("diffusers")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from segquant import SegQuantError  # noqa: E402
import segquant_modelopt as sm  # noqa: E402
from segquant_modelopt.export import export_onnx, qdq_axes  # noqa: E402
from _models import build_tiny_flux_pipeline  # noqa: E402
from test_modelopt import quantize, tiny  # noqa: E402

# ONNX QuantizeLinear rounds x / scale like the reference fake quantization: the same numbers up to float32
# accumulation order. Measured max abs diff 2.4e-7 (FLUX) and 4.8e-7 (SD3) at every level in tensorrt mode.
TIGHT = 1e-5     # x max|ref|: ORT_ENABLE_BASIC, and ORT_ENABLE_ALL when no MatMulNBits is formed
# qdq mode at ORT_ENABLE_ALL: the DualScale layers' DQ(weight) -> MatMul becomes MatMulNBits (8 bits, block
# 32, accuracy_level 4: activations quantized to int8 per block inside the kernel). Measured 1.9e-3 abs
# (1.2e-3 x max|ref|) on tiny FLUX split_k.
MATMULNBITS = 5e-3  # x max|ref|
LAYERS = {"FluxTransformer2DModel": 49, "SD3Transformer2DModel": 35}  # quantized Linear layers (proj_out kept)
NONE = {"QuantizeLinear": 0, "DequantizeLinear": 0}


def pair(n):
    return {"QuantizeLinear": n, "DequantizeLinear": n}


def run_ort(path, batch, level, tmp_path, **config):
    """The first output, and the op types of the graph onnxruntime optimised at ``level``."""
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.optimized_model_filepath = str(tmp_path / f"optimized_{level}.onnx")
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    out = session.run(None, {i.name: batch[i.name].numpy() for i in session.get_inputs()})[0]
    return out, Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)


def max_diff(quantized, path, batch, level, tmp_path, **config):
    with torch.no_grad():
        ref = quantized(**batch)[0].numpy()
    out, ops = run_ort(path, batch, level, tmp_path, **config)
    return float(abs(out - ref).max()), float(abs(ref).max()), ops


@pytest.fixture(scope="module", params=["FluxTransformer2DModel", "SD3Transformer2DModel"])
def tensorrt_export(request, tmp_path_factory):
    """A folded, DualScale-off model exported in the default (tensorrt) mode."""
    model, data = tiny(request.param, batches=2)
    quantized = quantize(model, data, realisation="folded", dual_scale=False)
    path = export_onnx(quantized, data[0], tmp_path_factory.mktemp("onnx") / "model.onnx")
    return request.param, quantized, data, path


def test_tensorrt_mode_has_per_tensor_activation_qdq_only(tensorrt_export):
    name, quantized, _, path = tensorrt_export
    plan = sm.plan_of(quantized)
    layers = len(plan.quantized_layers())
    assert layers == LAYERS[name] and not plan.dual_scaled()
    # one per-tensor Q/DQ on every quantized layer's input, one per-channel (axis 0) Q/DQ on its weight
    assert qdq_axes(path) == {"activation_per_tensor": pair(layers), "activation_per_axis": NONE,
                              "weight_per_tensor": NONE, "weight_per_axis": pair(layers)}
    graph = onnx.load(str(path)).graph
    axes = [a.i for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") for a in n.attribute
            if a.name == "axis"]
    assert axes == [0] * 2 * layers  # only the weights' Q/DQ have an axis, and it is the output channel
    producers = {o: n.op_type for n in graph.node for o in n.output}
    activation_q = [n for n in graph.node if n.op_type == "QuantizeLinear" and producers.get(n.input[0]) == "Mul"]
    assert len(activation_q) == layers  # the folded per-segment scales: pre_quant_scale Mul before each Q


def test_onnxruntime_matches_fake_quant_at_basic_and_default_levels(tensorrt_export, tmp_path):
    name, quantized, data, path = tensorrt_export
    diff, scale, _ = max_diff(quantized, path, data[1], "ORT_ENABLE_BASIC", tmp_path)
    print(f"{name} tensorrt mode, ORT_ENABLE_BASIC: max abs diff {diff:.2e} (output max {scale:.2f})")
    assert diff <= TIGHT * scale
    diff, scale, ops = max_diff(quantized, path, data[1], "ORT_ENABLE_ALL", tmp_path)
    print(f"{name} tensorrt mode, ORT_ENABLE_ALL: max abs diff {diff:.2e}, MatMulNBits {ops['MatMulNBits']}")
    assert ops["MatMulNBits"] == 0  # every MatMul has a DQ activation input: no weight-only rewrite
    assert diff <= TIGHT * scale


@pytest.mark.parametrize("algorithm, layer, why", [
    (dict(realisation="split_k", dual_scale=False), "single_transformer_blocks.0.proj_out", "per-K input scales"),
    (dict(realisation="folded"), "time_text_embed.timestep_embedder.linear_2", "DualScale"),
])
def test_tensorrt_mode_refuses_per_k_scales_and_dual_scale(algorithm, layer, why, tmp_path):
    model, data = tiny("FluxTransformer2DModel", batches=2)
    quantized = quantize(model, data, **algorithm)
    path = tmp_path / "model.onnx"
    with pytest.raises(SegQuantError) as error:
        export_onnx(quantized, data[0], path)
    message = str(error.value)
    assert "\n" not in message and f"{layer} (" in message and why in message
    assert "realisation='folded' and dual_scale=False" in message and "mode='qdq'" in message
    assert not path.exists()  # refused before exporting


@pytest.fixture(scope="module")
def qdq_export(tmp_path_factory):
    """Today's split_k model with DualScale, exported in qdq mode."""
    model, data = tiny("FluxTransformer2DModel", batches=2)
    quantized = quantize(model, data, realisation="split_k")
    return quantized, data, export_onnx(quantized, data[0], tmp_path_factory.mktemp("qdq") / "model.onnx", mode="qdq")


def test_qdq_mode_keeps_per_channel_and_dual_scale_qdq(qdq_export, tmp_path):
    quantized, data, path = qdq_export
    plan = sm.plan_of(quantized)
    layers, dual = len(plan.quantized_layers()), len(plan.dual_scaled())
    axes = qdq_axes(path)
    assert (layers, dual) == (49, 16)
    assert axes["activation_per_axis"] == pair(6)  # per-K amax of the split_k layers with segments (x+ and x-)
    assert axes["activation_per_tensor"] == pair(layers + dual - 6)  # + the x- branch of every DualScale layer
    assert axes["weight_per_axis"] == pair(layers) and axes["weight_per_tensor"] == NONE
    diff, scale, ops = max_diff(quantized, path, data[1], "ORT_ENABLE_BASIC", tmp_path)
    print(f"qdq mode, ORT_ENABLE_BASIC: max abs diff {diff:.2e} (output max {scale:.2f})")
    assert ops["MatMulNBits"] == 0 and diff <= TIGHT * scale


def test_qdq_mode_default_ort_level_forms_matmulnbits(qdq_export, tmp_path):
    """DualScale's ``Add(DQ, DQ) -> MatMul`` leaves the weight's DQ -> MatMul alone: onnxruntime's default level
    rewrites it into a weight-only MatMulNBits that quantizes activations itself (accuracy_level 4)."""
    quantized, data, path = qdq_export
    diff, scale, ops = max_diff(quantized, path, data[1], "ORT_ENABLE_ALL", tmp_path)
    print(f"qdq mode, ORT_ENABLE_ALL: max abs diff {diff:.2e} (output max {scale:.2f}), "
          f"MatMulNBits {ops['MatMulNBits']}")
    assert ops["MatMulNBits"] == 6  # ff.net.2 / ff_context.net.2 of both double blocks, both single proj_out
    assert TIGHT * scale < diff <= MATMULNBITS * scale
    diff, scale, ops = max_diff(quantized, path, data[1], "ORT_ENABLE_ALL", tmp_path,
                                **{"session.qdq_matmulnbits_accuracy_level": "1"})  # float32 compute
    assert ops["MatMulNBits"] == 6 and diff <= TIGHT * scale


class _Unexportable(nn.Module):
    def forward(self, x):
        return torch.linalg.svd(x)[0]


def test_export_failure_is_one_line_and_prints_no_ir(tmp_path, capfd):
    with pytest.raises(SegQuantError) as error:
        export_onnx(_Unexportable(), {"x": torch.randn(3, 3)}, tmp_path / "model.onnx", mode="qdq")
    assert str(error.value) == ("ONNX export of _Unexportable failed: UnsupportedOperatorError: Exporting the "
                                "operator 'aten::linalg_svd' to ONNX opset version 17 is not supported")
    out, err = capfd.readouterr()
    assert "graph(" not in out + err and "Torch IR" not in out + err
    with pytest.raises(SegQuantError, match="ONNX export mode must be one of tensorrt, qdq; got 'trt'"):
        export_onnx(_Unexportable(), {"x": torch.randn(3, 3)}, tmp_path / "model.onnx", mode="trt")


def test_quantize_job_qdq_mode_keeps_the_recipe(tmp_path):
    """--onnx-mode qdq: the recipe's DualScale and realisation stay, the ONNX has their Q/DQ."""
    pytest.importorskip("transformers")
    from segquant.app.quantize_job import QuantizeJob, quantize_pipeline

    folder = tmp_path / "flux"
    build_tiny_flux_pipeline(folder)
    recipe = tmp_path / "dual.yaml"  # the bundled INT8 recipes shift instead: this one keeps DualScale
    recipe.write_text("# schema: segquant.recipe.Recipe\nbase: flux.1-dev/int8_w8a8\ndual_scale: true\nshift: null\n")
    result = quantize_pipeline(QuantizeJob(model=str(folder), out=tmp_path / "out", onnx=True, onnx_mode="qdq",
                                           recipe=recipe, dtype="float32", num_prompts=1, steps=1, height=32,
                                           width=32, show_progress=False))
    assert result.plan.dual_scaled() and not result.notes
    manifest = json.loads((tmp_path / "out" / "segquant.json").read_text())
    assert manifest["onnx_mode"] == "qdq" and manifest["notes"] == []
    axes = qdq_axes(tmp_path / "out" / "transformer.onnx")
    assert axes["activation_per_tensor"]["QuantizeLinear"] > len(result.plan.quantized_layers())  # x- branches
