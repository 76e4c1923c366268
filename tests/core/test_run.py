"""``segquant run``, the main job, end to end on the embedded models, and its bad input."""

import json
import logging
import warnings

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("modelopt")
pytest.importorskip("matplotlib")

from segquant.app.cli import main  # noqa: E402


def _png_size(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def test_run_modelopt_end_to_end(tmp_path, capsys):
    out = tmp_path / "report"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["run", "--num-samples", "4", "--calib-samples", "2", "--steps", "2", "--out", str(out),
                     "-q"]) == 0
    assert [str(w.message) for w in caught] == []  # -q: not even ModelOpt's "not calibrated, skip smoothing"
    assert capsys.readouterr().out == ""
    assert not logging.root.manager.disable  # -q silenced the libraries only while it ran
    metrics = json.loads((out / "metrics.json").read_text())
    rows = list(metrics["rows"])
    assert rows == ["full precision", "ModelOpt INT8_SMOOTHQUANT_CFG",
                    "mnist-flux/int8_w8a8 without SegLinear, DualScale and shift (modelopt)",
                    "SegQuant mnist-flux/int8_w8a8 (modelopt)",
                    "SegQuant mnist-flux/int8_w8a8 with shift instead of DualScale (modelopt)"]
    fp, preset, off, seg, shift = (metrics["rows"][r] for r in rows)
    assert off["quantized_linear_flop_fraction"] == shift["quantized_linear_flop_fraction"]
    assert 20 < shift["psnr_db"] < 80 and metrics["comparisons"][rows[4]]["n"] == 4
    # the like-for-like row quantizes exactly the layers SegQuant quantizes; only the techniques differ
    assert off["quantized_linear_flop_fraction"] == seg["quantized_linear_flop_fraction"]
    like = metrics["comparisons"][rows[2]]
    assert like["low"] <= like["psnr_db_difference"] <= like["high"] and like["n"] == 4
    assert set(like["layers"]) == set(metrics["segquant_changed_layers"])
    assert "## SegQuant against the other rows" in (out / "report.md").read_text()
    assert fp["psnr_db"] == float("inf") and fp["ssim"] == pytest.approx(1.0)
    assert 20 < seg["psnr_db"] < 80 and 20 < preset["psnr_db"] < 80
    # ModelOpt's preset skips every *proj_out*; SegQuant's recipe keeps only the final proj_out in high precision
    assert preset["quantized_linear_flop_fraction"] < seg["quantized_linear_flop_fraction"] < 1.0
    changed = metrics["segquant_changed_layers"]
    assert "single_transformer_blocks.0.proj_out" in changed and "transformer_blocks.0.norm1.linear" in changed
    sqnr = metrics["layer_sqnr_db"]["SegQuant mnist-flux/int8_w8a8 (modelopt)"]
    assert sqnr["proj_out"] == float("inf") and 20 < sqnr["single_transformer_blocks.0.proj_out"] < 80
    assert "| SegQuant mnist-flux/int8_w8a8 (modelopt) |" in (out / "report.md").read_text()
    width, height = _png_size(out / "grid.png")
    assert width > 4 * 32 and height > 3 * 32
    assert _png_size(out / "layers.png")[0] > 400
    parts = metrics["attribution"]  # the gain over the preset = the recipe's part + the method's part, per image
    assert parts["total"]["psnr_db_difference"] == pytest.approx(
        parts["recipe"]["psnr_db_difference"] + parts["method"]["psnr_db_difference"], abs=1e-9)
    assert parts["method"]["psnr_db_difference"] == pytest.approx(like["psnr_db_difference"])
    assert parts["recipe"]["better"] == rows[2] and parts["recipe"]["worse"] == rows[1]
    assert "Where the gain over ModelOpt INT8_SMOOTHQUANT_CFG comes from" in (out / "report.md").read_text()
    assert parts["shift"]["better"] == rows[4] and parts["shift"]["worse"] == rows[2]
    assert "With the activation shift in place of DualScale" in (out / "report.md").read_text()
    techniques = metrics["techniques"]
    assert techniques[rows[3]]["single_transformer_blocks.0.proj_out"] == ["segments", "dual_scale"]
    assert "shift" in techniques[rows[4]]["single_transformer_blocks.0.proj_out"]
    assert not any("dual_scale" in t for t in techniques[rows[4]].values())
    assert capsys.readouterr().out == ""  # -q prints nothing


def test_row_plans_and_layer_techniques():
    from segquant import LinearPlan, SegQuantPlan
    from segquant.app.run_job import layer_techniques, row_plans
    from segquant.recipe import Recipe

    analysed = SegQuantPlan({
        "ff.out": LinearPlan(16, 8, dual_scale=True, activation="gelu"),
        "attn.proj": LinearPlan(24, 8, in_segments=(8, 16), dual_scale=True, dual_scale_segments=(1,),
                                activation="gelu"),
        "norm.linear": LinearPlan(8, 24, out_segments=(8, 8, 8)),
        "plain": LinearPlan(8, 8)}, model_class="M")
    recipe = Recipe(name="m/int8_w8a8", model_class="M", config="c", precision="int8_w8a8")
    plans = row_plans(recipe, analysed)
    assert set(plans) == {"techniques_off", "segquant", "segquant_shift"}
    assert all(p.is_plain for p in plans["techniques_off"].layers.values())
    shifted = plans["segquant_shift"]
    assert shifted["ff.out"].shift == "per_tensor" and not shifted["ff.out"].dual_scale
    assert shifted["attn.proj"].shift_segments == (1,) and shifted["norm.linear"] == plans["segquant"]["norm.linear"]
    assert layer_techniques(plans["segquant"]) == {"ff.out": ["dual_scale"], "attn.proj": ["segments", "dual_scale"],
                                                   "norm.linear": ["segments"]}
    assert layer_techniques(shifted)["attn.proj"] == ["segments", "shift"]
    import dataclasses
    already = dataclasses.replace(recipe, shift="per_channel", dual_scale=False)
    assert "segquant_shift" not in row_plans(already, analysed)  # the recipe's own plan is the shift row


def test_run_torchao_on_the_unet(tmp_path):
    out = tmp_path / "report"
    assert main(["run", "--model", "mnist-unet", "--backend", "torchao", "--recipe", "int8_w8a8", "--num-samples",
                 "4", "--calib-samples", "2", "--steps", "2", "--out", str(out), "-q"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["recipe"] == "mnist-unet/int8_w8a8" and metrics["failed_rows"] == {}
    baseline = metrics["rows"]["torchao Int8DynamicActivationInt8WeightConfig"]
    seg = metrics["rows"]["SegQuant mnist-unet/int8_w8a8 (torchao)"]
    for row in (baseline, seg):
        assert 15 < row["psnr_db"] < 80 and row["quantized_linear_flop_fraction"] > 0.5


@pytest.mark.parametrize("argv, message", [
    (["--model", "{tmp}"], "not a diffusers model folder"),
    (["--model", "mnist-gan"], "neither an embedded model"),
    (["--recipe", "int9"], "unknown recipe 'int9'"),
    (["--recipe", "mnist-unet/int8_w8a8"], "recipe mnist-unet/int8_w8a8 is for a UNet2DConditionModel"),
    (["--num-samples", "0"], "--num-samples must be at least 1"),
    (["--calib-samples", "0"], "--calib-samples must be at least 1"),
    (["--backend", "torchao", "--recipe", "w4a8"], "backend torchao supports"),
])
def test_run_bad_input(argv, message, tmp_path, capsys):
    (tmp_path / "model").mkdir()
    argv = [a.replace("{tmp}", str(tmp_path / "model")) for a in argv]
    for flag in ("--num-samples", "--calib-samples", "--steps"):
        if flag not in argv:
            argv += [flag, "1"]
    assert main(["run", *argv, "--out", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written on bad input
