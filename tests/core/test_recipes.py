"""Every bundled recipe validates against its model's full-size config analysed on meta."""

import functools
import json
import os

import pytest
import torch
from filelock import FileLock

import segquant
from segquant import PlanError, SegQuantError, SegQuantPlan
from segquant.model_configs import bundled_configs
from segquant.recipe import PRECISIONS, Recipe, bundled_recipes, load_recipe

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="session")
def full_plan(tmp_path_factory):
    """``full_plan(config_name)``: the plan of a bundled config analysed on meta, once per test session. Under
    pytest-xdist the workers share it through a file (the session's temporary folder, a lock per config), so
    each full-size model is analysed once, not once per worker."""
    shared = tmp_path_factory.getbasetemp()
    shared = shared.parent if os.environ.get("PYTEST_XDIST_WORKER") else shared

    @functools.lru_cache(maxsize=None)
    def plan_of(config_name: str) -> SegQuantPlan:
        path = shared / f"full_plan_{config_name}.json"
        with FileLock(f"{path}.lock"):
            if path.exists():
                return SegQuantPlan.load(path)
            config = json.loads(bundled_configs()[config_name].read_text())
            with torch.device("meta"):
                model = getattr(diffusers, config["_class_name"]).from_config(config)
            plan = segquant.analyze(model, **segquant.example_inputs(model))
            plan.save(path)
            return plan

    return plan_of


def test_one_recipe_per_model_and_precision():
    models = {"flux.1-dev", "flux.1-schnell", "sd3.5-large", "sd3.5-medium", "sdxl-base", "pixart-sigma", "sana-1600m",
              "mnist-flux", "mnist-unet"}
    assert set(bundled_recipes()) == {f"{m}/{p}" for m in models for p in PRECISIONS}
    for name in bundled_recipes():
        recipe = load_recipe(name)
        # FP8 keeps segments but not DualScale (relative precision: only subnormals change, at 2x GEMM cost);
        # INT8 puts the per-tensor shift where DualScale was (the same quality at a plain GEMM's cost); W4A8 keeps
        # DualScale
        int8 = name.endswith(("/int8_w8a8", "/int8_perchannel"))
        assert recipe.dual_scale == name.endswith("/w4a8"), name
        assert recipe.shift == ("per_tensor" if int8 else None), name


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(bundled_recipes()))
def test_recipe_validates_on_the_full_size_model(name, full_plan):
    recipe = load_recipe(name)
    assert recipe.name == name
    plan = full_plan(recipe.config)
    recipe.validate(plan)
    applied = recipe.apply(plan)
    assert applied.recipe == name and applied.precision() == recipe.precision
    skipped = {n for pattern in recipe.skip for n in plan.matching(pattern)}
    assert set(applied.high_precision_layers()) == skipped | set(plan.high_precision_layers())
    assert all(applied[n].precision is None for n in applied.high_precision_layers())
    if not recipe.dual_scale:
        assert not applied.dual_scaled() and not any(p.dual_scale for p in applied.layers.values())
    # bundled recipes override nothing: segments and DualScale are the analysis under the technique switches
    switched = plan.ablate(seg_linear=recipe.seg_linear, dual_scale=recipe.dual_scale)
    for name_, layer in applied.layers.items():
        expected = switched[name_]
        assert (layer.in_segments, layer.out_segments, layer.dual_scale_segments) == \
            (expected.in_segments, expected.out_segments, expected.dual_scale_segments), name_
    with pytest.raises(PlanError, match="already applied"):  # a second recipe would inherit this one's choices
        recipe.apply(applied)


def test_recipe_bad_input(tmp_path, full_plan):
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
    with pytest.raises(SegQuantError, match=r"r.yaml: unknown keys \['colour'\]; known: \['name', 'model_class'"):
        load_recipe(bad)
    bad.write_text("# schema: segquant.recipe.Recipe\nname: a/fp8\nmodel_class: M\nconfig: c\nprecision: fp8\n"
                   "calibration: {steps: 0}\n")
    with pytest.raises(SegQuantError, match="calibration.steps must be in \\[1, 1000\\], got 0"):
        load_recipe(bad)


def test_recipes_compose_from_a_model_base_and_precision_deltas(tmp_path):
    fp8, int8 = load_recipe("flux.1-dev/fp8"), load_recipe("flux.1-dev/int8_w8a8")
    assert fp8.skip == int8.skip and fp8.calibration == int8.calibration  # the model's base
    assert (fp8.smoothquant_alpha, fp8.dual_scale) == (None, False)  # the precision's deltas
    assert (int8.smoothquant_alpha, int8.dual_scale, int8.shift) == (0.5, False, "per_tensor")
    derived = tmp_path / "mine.yaml"
    derived.write_text("# schema: segquant.recipe.Recipe\nbase: flux.1-schnell/fp8\nskip: [proj_out]\n"
                       "calibration: {num_prompts: 4}\n")
    mine = load_recipe(derived)
    assert mine.name == "flux.1-schnell/fp8+mine" and mine.skip == ("proj_out",) and mine.precision == "fp8"
    assert mine.calibration.num_prompts == 4 and mine.calibration.steps == 4  # calibration merged key by key
    derived.write_text("# schema: segquant.recipe.Recipe\nbase: flux.1-dev/int3\n")
    with pytest.raises(SegQuantError, match="base must name a bundled recipe"):
        load_recipe(derived)


@pytest.mark.parametrize("text, message", [
    ("dual_scale: 'false'", "dual_scale must be true or false \\(not quoted\\), got 'false'"),
    ("smoothquant_alpha: 2", "smoothquant_alpha must be in \\[0, 1\\], got 2"),
    ("realisation: fold", "realisation must be one of 'split_k' or 'folded'; got 'fold'"),
    ("skip: proj_out", "skip must be a list of layer-name globs"),
    ("calibration: {steps: '4'}", "calibration.steps must be an integer, got '4'"),
])
def test_recipe_values_are_typed(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(f"# schema: segquant.recipe.Recipe\nbase: mnist-flux/int8_w8a8\n{text}\n")
    with pytest.raises(SegQuantError, match=message):
        load_recipe(path)


def test_a_derived_recipe_of_another_precision_takes_that_precisions_settings(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("# schema: segquant.recipe.Recipe\nbase: flux.1-dev/int8_w8a8\nprecision: fp8\n")
    mine = load_recipe(path)
    assert (mine.precision, mine.smoothquant_alpha, mine.dual_scale) == ("fp8", None, False)
    for bad in (None, 3):
        with pytest.raises(SegQuantError, match="a recipe is a bundled recipe name or a file path"):
            load_recipe(bad)
    with pytest.raises(SegQuantError, match="a recipe is a mapping"):
        Recipe.from_dict([1, 2])
    with pytest.raises(SegQuantError, match="cannot be overridden"):
        Recipe(name="x/fp8", model_class="M", config="c", precision="fp8", overrides={"a.*": {"colour": 1}})
