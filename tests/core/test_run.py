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
                    "SegQuant mnist-flux/int8_w8a8 with DualScale instead of the shift (modelopt)"]
    fp, preset, off, seg, dual = (metrics["rows"][r] for r in rows)
    assert off["quantized_linear_flop_fraction"] == dual["quantized_linear_flop_fraction"]
    assert 20 < dual["psnr_db"] < 80 and metrics["comparisons"][rows[4]]["n"] == 4
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
    assert parts["dual_scale"]["better"] == rows[4] and parts["dual_scale"]["worse"] == rows[2]
    assert parts["dual_scale_vs_segquant"]["worse"] == rows[3] and "shift" not in parts
    assert "With DualScale in place of the recipe's shift" in (out / "report.md").read_text()
    techniques = metrics["techniques"]  # the bundled INT8 recipe shifts; the fourth row swaps in DualScale
    assert techniques[rows[3]]["single_transformer_blocks.0.proj_out"] == ["segments", "shift"]
    assert not any("dual_scale" in t for t in techniques[rows[3]].values())
    assert techniques[rows[4]]["single_transformer_blocks.0.proj_out"] == ["segments", "dual_scale"]
    assert not any("shift" in t for t in techniques[rows[4]].values())
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
    recipe = Recipe(name="m/int8_w8a8", model_class="M", config="c", precision="int8_w8a8", dual_scale=True)
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
    shifting = dataclasses.replace(recipe, shift="per_channel", dual_scale=False)
    plans = row_plans(shifting, analysed)  # a recipe that shifts: its other row puts DualScale back
    assert set(plans) == {"techniques_off", "segquant", "segquant_dual_scale"}
    assert plans["segquant"]["ff.out"].shift == "per_channel" and not plans["segquant"]["ff.out"].dual_scale
    assert plans["segquant_dual_scale"]["ff.out"].dual_scale and plans["segquant_dual_scale"]["ff.out"].shift is None
    both = dataclasses.replace(recipe, shift="per_tensor", dual_scale=True)
    assert set(row_plans(both, analysed)) == {"techniques_off", "segquant"}
    plain = SegQuantPlan({"plain": LinearPlan(8, 8)}, model_class="M")
    assert set(row_plans(recipe, plain)) == {"techniques_off", "segquant"}  # the shift row would equal SegQuant


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
