"""Hostile plan files: every entry point that reads a plan (``SegQuantPlan.load``, torchao's ``SegQuantConfig``,
the ModelOpt algorithm's ``plan``) refuses them with one message naming the file, the layer and the key, and
leaves the file and the model as they were."""

import copy
import hashlib
import json

import pytest
import torch

pytest.importorskip("diffusers")

import segquant  # noqa: E402
from segquant import PlanError, SegQuantPlan  # noqa: E402


LAYER = "single_transformer_blocks.0.proj_out"


def edit_layer(**changes):
    def edit(data):
        data["layers"][LAYER].update(changes)
    return edit


def drop(key):
    def edit(data):
        del data["layers"][LAYER][key]
    return edit


CASES = {
    "quoted boolean": (edit_layer(dual_scale="false"), f"{LAYER}: dual_scale must be true or false"),
    "quoted integer": (edit_layer(in_features="160"), f"{LAYER}: in_features must be an integer, got '160'"),
    "float size": (edit_layer(out_features=32.0), "out_features must be an integer, got 32.0"),
    "boolean as size": (edit_layer(in_features=True), "in_features must be an integer, got True"),
    "missing key": (drop("out_features"), "required key 'out_features' is missing"),
    "unknown key": (edit_layer(colour="red"), "unknown keys \\['colour'\\]; known: \\['in_features'"),
    "segments do not sum": (edit_layer(in_segments=[1, 2]), "in_segments \\[1, 2\\] sum to 3"),
    "negative segment": (edit_layer(out_segments=[-1]), "out_segments.0 must be greater than 0, got -1"),
    "segment as string": (edit_layer(in_segments="160"), "in_segments must be a list, got '160'"),
    "unknown activation": (edit_layer(dual_scale=True, activation="relu"), "activation must be one of 'silu'"),
    "unknown precision": (edit_layer(precision="int3"), "precision must be one of 'int8_w8a8'"),
    "version as string": (lambda d: d.update(version="2"), "plan version must be an integer: write 2, not '2'"),
    "future version": (lambda d: d.update(version=9), "plan version 9 is not supported"),
    "no version": (lambda d: d.pop("version"), "plan has no 'version' field"),
    "layers as list": (lambda d: d.update(layers=[1]), "layers must be a mapping, got \\[1\\]"),
    "unknown capture": (lambda d: d.update(capture="trace"), "capture must be one of 'export' or 'eager'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_plan_files_are_refused_by_every_reader(case, flux, tmp_path):
    model, kwargs, plan = flux
    edit, message = CASES[case]
    data = json.loads(plan.to_json())
    edit(data)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(PlanError, match=message) as raised:
        SegQuantPlan.load(path)
    assert str(raised.value).startswith(str(path)) and "\n" not in str(raised.value)
    if case in ("version as string", "layers as list", "quoted boolean"):  # the adapters read plans the same way
        pytest.importorskip("torchao")
        from segquant_torchao import SegQuantConfig

        with pytest.raises(PlanError, match=message):
            SegQuantConfig(str(path))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_a_bad_plan_in_a_modelopt_config_leaves_the_model_as_it_was(flux):
    pytest.importorskip("modelopt")
    import modelopt.torch.quantization as mtq

    import segquant_modelopt

    model, kwargs, plan = flux
    model = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    config = segquant_modelopt.config_for_plan(plan, segquant.QuantizeOptions(show_progress=False))
    config["algorithm"]["plan"]["layers"][LAYER]["dual_scale"] = "false"
    with pytest.raises(PlanError, match=f"{LAYER}: dual_scale must be true or false"):
        mtq.quantize(model, config, lambda m: m(**kwargs))
    assert [type(m) for m in model.modules()] == classes
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in after.items())


def test_restore_without_the_plugin_names_the_import(flux, tmp_path):
    """Without ``import segquant_modelopt`` torch cannot unpickle SegQuant's quantizer flag: ``mto.restore`` fails
    loudly (never a silently plain model), and ``segquant_modelopt.restore`` names the import."""
    pytest.importorskip("modelopt")
    import modelopt.torch.opt as mto
    import modelopt.torch.quantization as mtq

    import segquant_modelopt
    from segquant_modelopt.quantizer import SegQuantFlag

    model, kwargs, plan = flux
    quantized = copy.deepcopy(model)
    config = segquant_modelopt.config_for_plan(plan, segquant.QuantizeOptions(show_progress=False))
    mtq.quantize(quantized, config, lambda m: m(**kwargs))
    path = tmp_path / "t.modelopt.pth"
    mto.save(quantized, path)
    allowed = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()  # as in a process that never imported segquant_modelopt
    try:
        torch.serialization.add_safe_globals([g for g in allowed if g is not SegQuantFlag])
        with pytest.raises(Exception, match="segquant_modelopt.quantizer.SegQuantFlag"):
            mto.restore(copy.deepcopy(model), path)
        named = ("holds segquant_modelopt.quantizer.SegQuantFlag, which no imported package allow-lists; "
                 "import .*`import segquant_modelopt`")
        with pytest.raises(segquant.SegQuantError, match=named):
            segquant_modelopt.restore(copy.deepcopy(model), path)
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(allowed)
    restored = segquant_modelopt.restore(copy.deepcopy(model), path)
    with torch.no_grad():
        assert torch.equal(restored(**kwargs)[0], quantized(**kwargs)[0])
