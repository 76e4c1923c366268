"""The backend contract, run against every registered backend: the applied plan is what gets quantized.

For every bundled recipe (grouped by what it changes on a tiny model of its class) and every backend that
runs its precision, the layers the backend reports as quantized, with their segments and DualScale, are
exactly the applied plan's; layers the plan keeps in high precision compute exactly what the float model
does; bad input fails before the model changes.
"""

import copy
import dataclasses
import functools
import json

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")

import segquant  # noqa: E402
from segquant import QuantizedLayer, QuantizeOptions, SegQuantError  # noqa: E402
from segquant.numerics import get_format  # noqa: E402
from segquant.recipe import bundled_recipes, load_recipe  # noqa: E402
from segquant.recording import record_linears  # noqa: E402
from _models import build_tiny  # noqa: E402

BACKENDS = segquant.backend_names()


def backend_or_skip(name):
    try:
        return segquant.get_backend(name)
    except SegQuantError as e:  # its library is not installed here
        pytest.skip(str(e))


def tiny_inputs(model_class, seed=0):
    """A tiny model of ``model_class`` and two batches of example inputs for it."""
    model = build_tiny(model_class, seed=seed)
    batches = []
    for i in range(2):
        torch.manual_seed(100 + i)
        batches.append(segquant.example_inputs(model))
    return model, batches


def tiny_case(model_class, seed=0):
    model, batches = tiny_inputs(model_class, seed)
    return model, batches, segquant.analyze(model, **batches[0])


@functools.cache
def analysed_tiny_plan(model_class):
    """The analysed plan of ``tiny_case(model_class)``, computed once per class (``Recipe.apply`` returns a new
    plan, so the cached one is never changed)."""
    return tiny_case(model_class)[2]


def loop_over(batches):
    def forward_loop(model):
        with torch.no_grad():
            for batch in batches:
                model(**batch)
    return forward_loop


def _recipe_groups():
    """One case per distinct thing a bundled recipe does to a tiny model of its class: recipes with the same
    model class, the same applied plan (less its "recipe" name) and the same quantize options are one case.
    Returns {case id: [recipe names]}, the id being the group's first recipe and how many others it stands for."""
    groups = {}
    for name in bundled_recipes():
        recipe = load_recipe(name)
        applied = recipe.apply(analysed_tiny_plan(recipe.model_class)).to_dict()
        applied.pop("recipe")
        options = dataclasses.asdict(recipe.quantize_options(show_progress=False))
        key = (recipe.model_class, json.dumps(applied, sort_keys=True),
               json.dumps(options, sort_keys=True, default=repr))
        groups.setdefault(key, []).append(name)
    return {names[0] + (f"-and-{len(names) - 1}-more" if len(names) > 1 else ""): names
            for names in groups.values()}


GROUPS = _recipe_groups()


def expected_layers(plan):
    """What the applied plan says of every quantized layer: segments, DualScale and its precision's formats."""
    out = {}
    for n, p in plan.layers.items():
        if p.quantized:
            spec = segquant.get_precision(p.precision)
            out[n] = QuantizedLayer(p.in_segments, p.out_segments, p.dual_scale_segments if p.dual_scale else (),
                                    get_format(spec.weight_format).name, spec.weight_granularity,
                                    get_format(spec.act_format).name, spec.activation,
                                    p.shift_segments if p.shift is not None else ())
    return out


def assert_realises(backend, quantized, plan):
    got, want = backend.quantized_linears(quantized), expected_layers(plan)
    assert set(got) == set(want), (sorted(set(got) ^ set(want)))
    assert {n: got[n] for n in want} == want


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("case", sorted(GROUPS))
def test_every_recipe_quantizes_exactly_its_applied_plan(backend_name, case):
    backend = backend_or_skip(backend_name)
    recipe = load_recipe(GROUPS[case][0])
    plan = recipe.apply(analysed_tiny_plan(recipe.model_class))
    if recipe.precision not in backend.capabilities.precisions:
        with pytest.raises(SegQuantError, match=f"supports .*, not {recipe.precision}"):
            segquant.backend.check_supported(backend, plan)
        return
    model, batches = tiny_inputs(recipe.model_class)
    assert plan.high_precision_layers() and plan.precision() == recipe.precision
    quantized = backend.quantize(copy.deepcopy(model), plan, recipe.quantize_options(show_progress=False),
                                 loop_over(batches))
    assert_realises(backend, quantized, plan)
    float_modules, modules = dict(model.named_modules()), dict(quantized.named_modules())
    with record_linears(model, plan.high_precision_layers()) as rec, torch.no_grad():
        model(**batches[0])
    x_by_layer = {n: xs[0] for n, xs in rec.inputs.items()}
    with torch.no_grad():
        for name, x in x_by_layer.items():  # kept layers compute exactly what the float layer does
            torch.testing.assert_close(modules[name](x), float_modules[name](x), rtol=0, atol=0)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_an_ablated_recipe_leaves_no_segment_and_no_dual_scale(backend_name, tmp_path):
    backend = backend_or_skip(backend_name)
    path = tmp_path / "ablated.yaml"
    path.write_text("# schema: segquant.recipe.Recipe\nbase: mnist-flux/int8_w8a8\nseg_linear: false\n"
                    "dual_scale: false\n")
    recipe = load_recipe(path)
    model, batches, analysed = tiny_case(recipe.model_class)
    assert analysed.dual_scaled() and (analysed.input_segmented() or analysed.output_segmented())
    plan = recipe.apply(analysed)
    quantized = backend.quantize(copy.deepcopy(model), plan, recipe.quantize_options(False), loop_over(batches))
    layers = backend.quantized_linears(quantized)
    assert layers and not any(layer.dual_scale or len(layer.in_segments) > 1 or len(layer.out_segments) > 1
                              for layer in layers.values())
    assert_realises(backend, quantized, plan)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_capabilities_are_consistent(backend_name):
    backend = backend_or_skip(backend_name)
    assert backend.name == backend_name and isinstance(backend, segquant.Backend)
    caps = backend.capabilities
    assert caps.precisions and all(p in segquant.PRECISIONS for p in caps.precisions)
    if not caps.onnx_export:
        with pytest.raises(SegQuantError, match="ONNX"):
            backend.export_onnx(nn.Linear(4, 4), {"x": torch.zeros(1, 4)}, "unused.onnx")


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_bad_input_fails_before_the_model_changes(backend_name):
    backend = backend_or_skip(backend_name)
    model, batches, analysed = tiny_case("FluxTransformer2DModel")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SegQuantError, match="names no precision"):
        backend.quantize(model, analysed, QuantizeOptions(), loop_over(batches))
    unsupported = [p for p in segquant.PRECISIONS if p not in backend.capabilities.precisions]
    for precision in unsupported:
        with pytest.raises(SegQuantError, match=f"not {precision}"):
            backend.quantize(model, analysed.with_precision(precision), QuantizeOptions(), loop_over(batches))
    sd3_plan = load_recipe("sd3.5-medium/fp8").apply(tiny_case("SD3Transformer2DModel")[2])
    with pytest.raises(SegQuantError):
        backend.quantize(model, sd3_plan, QuantizeOptions(), loop_over(batches))
    assert all(type(m) in (nn.Linear,) or not isinstance(m, nn.Linear) for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(SegQuantError, match="unknown backend 'nope'"):
        segquant.get_backend("nope")


class NamedLikeOtherModels(nn.Module):
    """Linears named like the layers ModelOpt's presets switch off by name (router, visual, lm_head)."""

    def __init__(self):
        super().__init__()
        self.router, self.visual, self.lm_head = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 16)

    def forward(self, x):
        return self.lm_head(nn.functional.gelu(self.visual(nn.functional.silu(self.router(x))))) * 2


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_layer_names_never_decide_what_is_quantized(backend_name):
    backend = backend_or_skip(backend_name)
    torch.manual_seed(0)
    model, batches = NamedLikeOtherModels(), [torch.randn(24, 16) for _ in range(2)]
    plan = segquant.analyze(model, batches[0]).with_precision("int8_w8a8")
    assert plan.quantized_layers() == ["router", "visual", "lm_head"]
    quantized = backend.quantize(copy.deepcopy(model), plan, QuantizeOptions(smoothquant_alpha=0.5),
                                 lambda m: [m(x) for x in batches])
    assert_realises(backend, quantized, plan)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_a_failing_forward_loop_is_named(backend_name):
    backend = backend_or_skip(backend_name)
    model, batches = tiny_inputs("FluxTransformer2DModel")
    plan = load_recipe("mnist-flux/int8_w8a8").apply(analysed_tiny_plan("FluxTransformer2DModel"))

    def broken(m):
        raise RuntimeError("disk on fire")

    with pytest.raises(SegQuantError, match="forward_loop raised RuntimeError .*disk on fire"):
        backend.quantize(model, plan, QuantizeOptions(), broken)
    with pytest.raises(SegQuantError, match="forward_loop must be a function"):
        backend.quantize(model, plan, QuantizeOptions(), "not a loop")
    with pytest.raises(SegQuantError, match="expected segquant.QuantizeOptions"):
        backend.quantize(model, plan, None, loop_over(batches))


def test_smoothquant_with_dynamic_activations_is_refused_for_every_backend():
    plan = load_recipe("mnist-flux/w4a8").apply(analysed_tiny_plan("FluxTransformer2DModel"))
    for name in BACKENDS:
        backend = backend_or_skip(name)
        if "w4a8" in backend.capabilities.precisions:
            with pytest.raises(SegQuantError, match="SmoothQuant .* needs calibrated static activations"):
                segquant.backend.check_supported(backend, plan, QuantizeOptions(smoothquant_alpha=0.5))


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_a_shifted_plan_is_realised_with_its_shift(backend_name):
    backend = backend_or_skip(backend_name)
    recipe = load_recipe("flux.1-dev/int8_w8a8")
    plan = recipe.apply(analysed_tiny_plan(recipe.model_class)).with_shift("per_tensor", keep_dual_scale=False)
    assert plan.shifted() and not plan.dual_scaled()
    model, batches = tiny_inputs(recipe.model_class)
    quantized = backend.quantize(copy.deepcopy(model), plan, recipe.quantize_options(show_progress=False),
                                 loop_over(batches))
    assert_realises(backend, quantized, plan)
    got = backend.quantized_linears(quantized)
    assert {n for n, q in got.items() if q.shift_segments} == set(plan.shifted())
