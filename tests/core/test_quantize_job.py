"""segquant quantize: the job on tiny pipelines (CLI, hub ids from the local cache, ONNX) and bad input."""

import json
import re
import shutil

import pytest
import torch

pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

from segquant import PlanError, SegQuantError  # noqa: E402
from segquant.app.cli import main  # noqa: E402
from segquant.app.pipelines import call_kwargs, family_of, read_prompts  # noqa: E402
from segquant.app.quantize_job import QuantizeJob, load_quantized, quantize_pipeline  # noqa: E402
from _models import build_tiny, build_tiny_flux_pipeline  # noqa: E402

TINY = dict(dtype="float32", device="cpu", num_prompts=2, steps=2, height=32, width=32, show_progress=False)
TINY_ARGS = ["--dtype", "float32", "--device", "cpu", "--num-prompts", "2", "--steps", "2", "--height", "32",
             "--width", "32"]


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux")
    build_tiny_flux_pipeline(folder)
    return folder


@pytest.fixture
def empty_offline_cache(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 and an empty Hugging Face cache: nothing can be downloaded or found."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_bundled_prompts():
    prompts = read_prompts()
    assert len(prompts) == 64 == len(set(prompts)) and all(len(p.split()) >= 6 for p in prompts)


def test_family_of_hub_ids_and_configs():
    flux = build_tiny("FluxTransformer2DModel", device="meta")
    assert family_of("black-forest-labs/FLUX.1-schnell", flux) == "flux.1-schnell"
    assert family_of("/models/stable-diffusion-xl-base-1.0", flux) == "sdxl-base"  # a folder named like the id
    assert family_of("/models/my-flux", flux) == "flux.1-dev"  # guidance_embeds: dev, not schnell
    assert family_of("/models/my-unet", build_tiny("UNet2DConditionModel", device="meta")) == "sdxl-base"
    with pytest.raises(SegQuantError, match="no bundled recipe for a DiTTransformer2DModel"):
        family_of("/models/dit", build_tiny("DiTTransformer2DModel", device="meta"))


def test_cli_quantize_from_the_hub_cache_with_onnx(flux_folder, empty_offline_cache, tmp_path, capsys):
    """A hub id found in the local cache (offline) loads through the same from_pretrained as a download."""
    pytest.importorskip("modelopt.torch.quantization")
    onnx = pytest.importorskip("onnx")
    revision = "0" * 40
    repo = empty_offline_cache / "models--black-forest-labs--FLUX.1-schnell"
    shutil.copytree(flux_folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    out = tmp_path / "out"
    assert main(["quantize", "--model", "black-forest-labs/FLUX.1-schnell", "--out", str(out), "--onnx",
                 "--precision", "int8_perchannel", "--no-progress", *TINY_ARGS]) == 0
    text = capsys.readouterr().out
    assert "with flux.1-schnell/int8_perchannel (modelopt)" in text and f"wrote {out / 'transformer.onnx'}" in text
    manifest = json.loads((out / "segquant.json").read_text())
    assert manifest["base_model"] == "black-forest-labs/FLUX.1-schnell" and manifest["recipe"] == "flux.1-schnell/int8_perchannel"
    onnx.checker.check_model(str(out / "transformer.onnx"))
    pipe = load_quantized(out)
    assert any(type(m).__name__ == "SegmentTensorQuantizer" for m in pipe.transformer.modules())
    # --onnx is TensorRT's form by default: folded, DualScale off, per-tensor activation Q/DQ only
    from segquant import SegQuantPlan
    from segquant_modelopt.export import qdq_axes

    plan = SegQuantPlan.load(out / "plan.json")
    layers = len(plan.quantized_layers())
    assert not plan.dual_scaled() and manifest["onnx_mode"] == "tensorrt"
    assert manifest["notes"] == [line for line in text.splitlines() if line.startswith("ONNX for TensorRT:")]
    # the INT8 recipe's shift needs nothing TensorRT lacks (a Sub before the Q/DQ, a corrected bias): it stays
    assert "realisation split_k -> folded" in text and "DualScale switched off" not in text and plan.shifted()
    axes = qdq_axes(out / "transformer.onnx")
    assert axes["activation_per_axis"] == {"QuantizeLinear": 0, "DequantizeLinear": 0}
    assert axes["activation_per_tensor"] == {"QuantizeLinear": layers, "DequantizeLinear": layers}


def test_progress_over_calibration_prompts(flux_folder, tmp_path, capsys):
    pytest.importorskip("torchao")
    quantize_pipeline(QuantizeJob(model=str(flux_folder), out=tmp_path / "out", backend="torchao", precision="fp8",
                                  **{**TINY, "show_progress": True}))
    err = capsys.readouterr().err  # not a terminal: one plain line per step, no bar
    assert re.search(r"^calibration prompts: 2/2 prompts in \d+\.\d s$", err, re.M) and "\r" not in err


def test_unknown_model_id(empty_offline_cache, tmp_path, capsys):
    with pytest.raises(SegQuantError, match="'nobody/no-such-model' is not a local folder and its weights are not "
                                            "in the local Hugging Face cache \\(offline"):
        quantize_pipeline(QuantizeJob(model="nobody/no-such-model", out=tmp_path / "out", **TINY))
    assert main(["quantize", "--model", "nobody/no-such-model", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("segquant: error: cannot load nobody/no-such-model") and "Traceback" not in err
    assert "`hf download nobody/no-such-model`" in err  # the command the installed huggingface_hub ships


def test_folder_without_weights(flux_folder, tmp_path, capsys):
    broken = tmp_path / "flux"
    shutil.copytree(flux_folder, broken)
    for weights in (broken / "transformer").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(SegQuantError, match=f"the folder {broken} is not a complete diffusers pipeline"):
        quantize_pipeline(QuantizeJob(model=str(broken), out=tmp_path / "out", **TINY))
    assert main(["quantize", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]) == 2
    assert "not in the local Hugging Face cache" in capsys.readouterr().err


def test_recipe_for_another_family(flux_folder, tmp_path, capsys):
    pytest.importorskip("modelopt.torch.quantization")
    with pytest.raises(PlanError, match="recipe sdxl-base/fp8 is for UNet2DConditionModel, the model is a "
                                        "FluxTransformer2DModel"):
        quantize_pipeline(QuantizeJob(model=str(flux_folder), out=tmp_path / "out", recipe="sdxl-base/fp8", **TINY))
    assert main(["quantize", "--model", str(flux_folder), "--out", str(tmp_path / "out"), "--recipe", "sdxl-base/fp8",
                 *TINY_ARGS]) == 2
    assert "is for UNet2DConditionModel" in capsys.readouterr().err
    assert not (tmp_path / "segquant.json").exists()


def test_bad_prompt_files(tmp_path, capsys):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    with pytest.raises(SegQuantError, match="prompt file .*prompts.txt holds no prompts"):
        quantize_pipeline(QuantizeJob(model="any/model", out=tmp_path / "out", prompts=empty, **TINY))
    assert main(["quantize", "--model", "any/model", "--out", str(tmp_path / "out"), "--prompts", str(tmp_path / "no.txt")]) == 2
    assert "no.txt does not exist" in capsys.readouterr().err


def test_bad_backend_precision_and_options(tmp_path, capsys):
    with pytest.raises(SegQuantError, match="unknown backend 'tensorrt'; one of modelopt, torchao"):
        QuantizeJob(model="m", out=tmp_path / "out", backend="tensorrt")
    with pytest.raises(SegQuantError, match="unknown precision 'int3'"):
        QuantizeJob(model="m", out=tmp_path / "out", precision="int3")
    with pytest.raises(SegQuantError, match="unknown dtype 'float8'"):
        QuantizeJob(model="m", out=tmp_path / "out", dtype="float8")
    pytest.importorskip("torchao")
    with pytest.raises(SegQuantError, match="backend torchao has no ONNX export; use a backend that has one"):
        quantize_pipeline(QuantizeJob(model="m", out=tmp_path / "out", backend="torchao", onnx=True))
    with pytest.raises(SegQuantError, match="backend torchao supports int8_w8a8, int8_perchannel, fp8, not w4a8"):
        quantize_pipeline(QuantizeJob(model="m", out=tmp_path / "out", backend="torchao", precision="w4a8"))
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", "--model", "m", "--out", str(tmp_path / "out"), "--backend", "tensorrt"])
    assert exit_info.value.code == 2 and "invalid choice: 'tensorrt'" in capsys.readouterr().err


def test_load_quantized_bad_input(tmp_path):
    with pytest.raises(SegQuantError, match="is not a SegQuant checkpoint: no segquant.json"):
        load_quantized(tmp_path)
    (tmp_path / "segquant.json").write_text(json.dumps({"version": 99}))
    with pytest.raises(SegQuantError, match="version 99"):
        load_quantized(tmp_path)


def test_call_kwargs_turn_resolution_binning_off(flux_folder):
    from segquant.recipe import CalibrationSettings

    settings = CalibrationSettings(steps=3, guidance=2.0, height=64, width=32)
    flux = diffusers.FluxPipeline.from_pretrained(flux_folder)
    assert call_kwargs(flux, settings) == dict(num_inference_steps=3, guidance_scale=2.0, height=64, width=32)
    assert call_kwargs(diffusers.PixArtSigmaPipeline, settings)["use_resolution_binning"] is False


@pytest.mark.parametrize("backend", ["modelopt", "torchao"])
def test_quantize_analyses_once_and_every_backend_quantizes_the_saved_applied_plan(flux_folder, tmp_path,
                                                                                   monkeypatch, backend):
    """The plan is the contract: one graph capture per job, the checkpoint stores the applied plan, and the
    quantized (and reloaded) denoiser has exactly its layers, segments and DualScale."""
    import segquant.graph
    from segquant import SegQuantPlan, get_backend

    impl = get_backend(backend)
    captures = []
    real_capture = segquant.graph.capture
    monkeypatch.setattr(segquant.graph, "capture", lambda *a, **k: captures.append(a) or real_capture(*a, **k))
    out = tmp_path / "out"
    result = quantize_pipeline(QuantizeJob(model=str(flux_folder), out=out, backend=backend, precision="int8_w8a8",
                                           **TINY))
    assert len(captures) == 1
    saved = SegQuantPlan.load(out / "plan.json")
    assert saved == result.plan and saved.recipe == "flux.1-dev/int8_w8a8" and saved.precision() == "int8_w8a8"
    assert "plan.json" in json.loads((out / "segquant.json").read_text())["files"]
    expected = {n: (p.in_segments, p.out_segments, p.dual_scale_segments if p.dual_scale else ())
                for n, p in saved.layers.items() if p.quantized}
    for denoiser in (result.pipe.transformer, load_quantized(out).transformer):
        layers = impl.quantized_linears(denoiser)
        assert {n: (q.in_segments, q.out_segments, q.dual_scale_segments) for n, q in layers.items()} == expected
    assert len(captures) == 1  # loading does not analyse either
