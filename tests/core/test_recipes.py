"""Every bundled recipe validates against its model's full-size config analysed on meta."""

import functools
import json

import pytest
import torch

import segquant
from segquant import PlanError, SegQuantError
from segquant.cli import bundled_configs
from segquant.recipe import PRECISIONS, Recipe, bundled_recipes, load_recipe

diffusers = pytest.importorskip("diffusers")


@functools.lru_cache(maxsize=None)
def full_plan(config_name):
    config = json.loads(bundled_configs()[config_name].read_text())
    with torch.device("meta"):
        model = getattr(diffusers, config["_class_name"]).from_config(config)
    return segquant.analyze(model, **segquant.example_inputs(model))


def test_one_recipe_per_model_and_precision():
    models = {"flux.1-dev", "flux.1-schnell", "sd3.5-large", "sd3.5-medium", "sdxl-base", "pixart-sigma", "sana-1600m",
              "mnist-flux", "mnist-unet"}
    assert set(bundled_recipes()) == {f"{m}/{p}" for m in models for p in PRECISIONS}
    for name in bundled_recipes():
        # FP8 keeps segments but not DualScale (relative precision: only subnormals change, at 2x GEMM cost)
        assert load_recipe(name).dual_scale == (not name.endswith("/fp8")), name


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(bundled_recipes()))
def test_recipe_validates_on_the_full_size_model(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    plan = full_plan(recipe.config)
    recipe.validate(plan)
    applied = recipe.apply(plan)
    # bundled recipes override nothing; they only switch techniques
    assert applied.summary() == plan.ablate(seg_linear=recipe.seg_linear, dual_scale=recipe.dual_scale).summary()


def test_recipe_bad_input(tmp_path):
    flux = load_recipe("flux.1-dev/int8_w8a8")
    with pytest.raises(PlanError, match="is for FluxTransformer2DModel, the model is a SD3Transformer2DModel"):
        flux.validate(full_plan("sd3.5-medium"))
    missing = Recipe(name="x/fp8", model_class="FluxTransformer2DModel", config="flux.1-dev", precision="fp8",
                     skip=("transformer_blocks.*.no_such_layer",))
    with pytest.raises(PlanError, match="'transformer_blocks.\\*.no_such_layer' matches no layer"):
        missing.validate(full_plan("flux.1-dev"))
    with pytest.raises(SegQuantError, match="precision must be one of"):
        Recipe(name="x/int3", model_class="M", config="c", precision="int3")
    with pytest.raises(SegQuantError, match="unknown recipe 'flux.1-dev/int3'"):
        load_recipe("flux.1-dev/int3")
    bad = tmp_path / "r.yaml"
    bad.write_text("name: a\n")
    with pytest.raises(SegQuantError, match="starts with the line '# schema: segquant.recipe.Recipe'"):
        load_recipe(bad)
    bad.write_text("# schema: segquant.recipe.Recipe\nname: a/fp8\nmodel_class: M\nconfig: c\nprecision: fp8\ncolour: red\n")
    with pytest.raises(SegQuantError, match=r"unknown recipe keys \['colour'\]"):
        load_recipe(bad)
    bad.write_text("# schema: segquant.recipe.Recipe\nname: a/fp8\nmodel_class: M\nconfig: c\nprecision: fp8\n"
                   "calibration: {steps: 0}\n")
    with pytest.raises(SegQuantError, match="calibration settings out of range"):
        load_recipe(bad)
