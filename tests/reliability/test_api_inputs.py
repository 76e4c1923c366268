"""Bad input to the Python entry points: a ``SegQuantError`` that says what was given and what is expected,
never a raw ``TypeError``/``AttributeError`` from deep inside, and nothing changed."""

import pytest
import torch

pytest.importorskip("diffusers")

import segquant  # noqa: E402
from segquant import LinearPlan, QuantizeOptions, SegQuantError, SegQuantPlan  # noqa: E402
from segquant.recipe import Recipe, load_recipe  # noqa: E402

PLAN = SegQuantPlan(layers={"a": LinearPlan(4, 4)})


def torchao():
    return pytest.importorskip("segquant_torchao")


def modelopt():
    return pytest.importorskip("segquant_modelopt")


CASES = {
    "analyze a string": (lambda: segquant.analyze("model"), "analyze\\(\\) expects a torch.nn.Module, got str"),
    "plan from a number": (lambda: SegQuantPlan.load(123), "loaded from a file path, got int"),
    "plan from a missing file": (lambda: SegQuantPlan.load("/nonexistent/plan.json"), "cannot read plan"),
    "alpha as a string": (lambda: QuantizeOptions(smoothquant_alpha="0.5"), "smoothquant_alpha must be a number"),
    "unknown realisation": (lambda: QuantizeOptions(realisation="fold"), "realisation must be one of split_k"),
    "override with a number as glob": (lambda: PLAN.override(1, dual_scale=True), "pattern is a glob string"),
    "override with a quoted boolean": (lambda: PLAN.override("a", dual_scale="yes"), "dual_scale must be true or false"),
    "overrides as a list": (lambda: PLAN.with_overrides([1]), "overrides map layer globs"),
    "high-precision globs as one string": (lambda: PLAN.keep_high_precision("a"), "list of layer-name globs"),
    "unknown precision": (lambda: PLAN.with_precision("int3"), "unknown precision 'int3'"),
    "segments as a string": (lambda: LinearPlan(4, 4, in_segments="ab"), "in_segments must be a list"),
    "recipe from None": (lambda: Recipe.from_dict(None), "a recipe is a mapping"),
    "empty recipe name": (lambda: load_recipe(""), "unknown recipe ''"),
    "unknown backend": (lambda: segquant.get_backend("tensorrt"), "unknown backend 'tensorrt'"),
    "backend given a string plan": (lambda: segquant.get_backend("torchao").quantize(
        torch.nn.Linear(4, 4), "plan", QuantizeOptions(), None), "expected a SegQuantPlan"),
    "forward_loop not callable": (lambda: segquant.get_backend("modelopt").quantize(
        torch.nn.Linear(4, 4), PLAN.with_precision("int8_w8a8"), QuantizeOptions(), 3),
        "forward_loop must be a function"),
    "torchao config from a number": (lambda: torchao().SegQuantConfig(123), "plan must be a SegQuantPlan"),
    "torchao precision int4": (lambda: torchao().SegQuantConfig(PLAN, precision="int4"), "precision must be one of"),
    "torchao quantize with a string": (lambda: torchao().quantize(torch.nn.Linear(4, 4), "x"),
                                       "expected a SegQuantConfig"),
    "ModelOpt config from a string": (lambda: modelopt().config_for_plan("x"), "takes a segquant.SegQuantPlan"),
    "example inputs of a Linear": (lambda: segquant.example_inputs(torch.nn.Linear(4, 4)), "no example inputs"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_a_segquant_error(case):
    call, message = CASES[case]
    with pytest.raises(SegQuantError, match=message) as raised:
        call()
    assert "\n" not in str(raised.value)


def test_a_refused_model_is_left_as_it_was():
    model = torch.nn.Linear(4, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SegQuantError):
        segquant.get_backend("torchao").quantize(model, "plan", QuantizeOptions(), None)
    assert type(model) is torch.nn.Linear and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
