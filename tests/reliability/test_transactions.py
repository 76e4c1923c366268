"""Every quantize entry point completes or leaves the model bit-identical (state dict, module classes, attribute
tables, hooks), with failures injected at several points: bad input, the user's loop, SegQuant's own steps, and
Ctrl-C."""

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")

import segquant  # noqa: E402
from segquant import SegQuantError  # noqa: E402
from segquant.transaction import ModelSnapshot, model_transaction  # noqa: E402
from _models import build_tiny  # noqa: E402


class Injected(Exception):
    pass


def fail_at(monkeypatch, module, name, call, exc=Injected):
    """Make ``module.name`` raise ``exc`` on its ``call``-th call (1-based)."""
    original = getattr(module, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise exc(f"injected into {name}")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def fingerprint(model):
    """What must not change: every module's class and attribute names, hooks, and every tensor's bits."""
    modules = [(n, type(m), sorted(m.__dict__), len(m._forward_hooks), len(m._forward_pre_hooks))
               for n, m in model.named_modules()]
    return modules, {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before, snapshot, kwargs, expected):
    modules, state = fingerprint(model)
    assert modules == before[0]
    assert state.keys() == before[1].keys()
    assert all(torch.equal(state[k], before[1][k]) for k in state)
    assert snapshot.unchanged(model)
    with torch.no_grad():
        assert torch.equal(model(**kwargs)[0], expected)


@pytest.fixture
def fresh(flux):
    """A float model with a user hook on it (hooks must survive a failed quantization)."""
    model, kwargs, plan = flux
    import copy

    model = copy.deepcopy(model)
    model.register_forward_hook(lambda module, args, out: None)
    with torch.no_grad():
        expected = model(**kwargs)[0]
    return model, kwargs, plan, fingerprint(model), ModelSnapshot(model), expected


# ---- the snapshot itself ---------------------------------------------------------------------------------
def test_snapshot_restores_classes_children_hooks_and_replaced_weights():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    before, snapshot = fingerprint(model), ModelSnapshot(model)
    with pytest.raises(Injected):
        with model_transaction(model):
            model[0].weight = nn.Parameter(torch.zeros(4, 4))
            model[0].bias.data = torch.ones(4)
            model[1].__class__ = nn.GELU
            model.add_module("extra", nn.Linear(2, 2))
            model.register_forward_pre_hook(lambda m, a: None)
            raise Injected
    assert fingerprint(model)[0] == before[0]
    assert all(torch.equal(a, b) for a, b in zip(fingerprint(model)[1].values(), before[1].values()))
    assert snapshot.unchanged(model)


def test_snapshot_refuses_to_hide_an_in_place_write():
    model = nn.Linear(4, 4)
    with pytest.raises(SegQuantError, match="written in place .* must be reloaded"):
        with model_transaction(model):
            with torch.no_grad():
                model.weight.mul_(2)
            raise Injected


def test_snapshot_of_a_non_module_is_an_error():
    with pytest.raises(SegQuantError, match="expected an nn.Module, got dict"):
        ModelSnapshot({})


# ---- ModelOpt: mtq.quantize with the segquant algorithm --------------------------------------------------
MODELOPT_FAILURES = {
    "empty forward loop": (None, lambda kwargs: (lambda m: None), SegQuantError,
                           "calibration reached no data for 41 layer"),
    "loop raises on batch 2": (None, lambda kwargs: (lambda m: [m(**kwargs), m(**kwargs), (_ for _ in ()).throw(
        RuntimeError("data loader broke"))]), SegQuantError, "data loader broke"),
    "Ctrl-C in the loop": (None, lambda kwargs: (lambda m: (m(**kwargs), (_ for _ in ()).throw(KeyboardInterrupt()))),
                           KeyboardInterrupt, None),
    "3rd layer's settings": (("_settings", 3), None, Injected, "injected"),
    "2nd layer applied": (("_apply", 2), None, Injected, "injected"),
    "Ctrl-C while applying": (("_apply", 5, KeyboardInterrupt), None, KeyboardInterrupt, None),
    "calibration check": (("check_calibration", 1), None, Injected, "injected"),
}


@pytest.mark.parametrize("case", list(MODELOPT_FAILURES))
def test_failed_mtq_quantize_leaves_the_float_model(monkeypatch, fresh, case):
    pytest.importorskip("modelopt")
    import modelopt.torch.quantization as mtq

    import segquant_modelopt
    from segquant_modelopt import algorithm

    model, kwargs, plan, before, snapshot, expected = fresh
    inject, make_loop, exc, message = MODELOPT_FAILURES[case]
    if inject:
        fail_at(monkeypatch, algorithm, inject[0], inject[1], *inject[2:])
    loop = make_loop(kwargs) if make_loop else (lambda m: m(**kwargs))
    config = segquant_modelopt.config_for_plan(plan, segquant.QuantizeOptions(show_progress=False))
    with pytest.raises(exc, match=message):
        mtq.quantize(model, config, loop)
    assert_unchanged(model, before, snapshot, kwargs, expected)
    monkeypatch.undo()
    mtq.quantize(model, config, lambda m: m(**kwargs))  # the model is still a float model ModelOpt can quantize
    assert len(segquant_modelopt.ModelOptBackend().quantized_linears(model)) == len(plan.quantized_layers())


def test_failed_modelopt_backend_quantize_leaves_the_float_model(monkeypatch, fresh):
    pytest.importorskip("modelopt")
    from segquant_modelopt import ModelOptBackend, algorithm

    model, kwargs, plan, before, snapshot, expected = fresh
    fail_at(monkeypatch, algorithm, "_apply", 4)
    with pytest.raises(Injected):
        ModelOptBackend().quantize(model, plan, segquant.QuantizeOptions(show_progress=False),
                                   lambda m: m(**kwargs))
    assert_unchanged(model, before, snapshot, kwargs, expected)


# ---- torchao: segquant_torchao.quantize -------------------------------------------------------------------
@pytest.mark.parametrize("point,call,exc", [("quantize_weight", 1, Injected), ("quantize_weight", 7, Injected),
                                            ("quantize_weight", 3, KeyboardInterrupt)])
def test_failed_torchao_quantize_leaves_the_model(monkeypatch, fresh, point, call, exc):
    pytest.importorskip("torchao")
    from segquant_torchao import SegQuantConfig, quantize
    from segquant_torchao import linear

    model, kwargs, plan, before, snapshot, expected = fresh
    quantize(model, SegQuantConfig(plan, step="prepare"))
    with torch.no_grad():
        model(**kwargs)
    prepared = fingerprint(model), ModelSnapshot(model)
    with torch.no_grad():
        prepared_out = model(**kwargs)[0]
    fail_at(monkeypatch, linear, point, call, exc)
    with pytest.raises(exc):
        quantize(model, SegQuantConfig(plan))
    assert_unchanged(model, prepared[0], prepared[1], kwargs, prepared_out)


@pytest.mark.parametrize("call,exc", [(1, Injected), (9, Injected), (4, KeyboardInterrupt)])
def test_failed_direct_quantize_leaves_the_model(monkeypatch, fresh, call, exc):
    """The README's ``quantize_(model, SegQuantConfig(plan), filter_fn=None)`` is all or nothing as well (here the
    convert step of a static plan, after a prepare step and calibration)."""
    pytest.importorskip("torchao")
    from torchao.quantization import quantize_

    from segquant_torchao import SegQuantConfig, api, linear, quantized_layers

    model, kwargs, plan, *_ = fresh
    quantize_(model, SegQuantConfig(plan, step="prepare"), filter_fn=None)
    with torch.no_grad():
        model(**kwargs)
        prepared_out = model(**kwargs)[0]
    prepared, snapshot = fingerprint(model), ModelSnapshot(model)
    fail_at(monkeypatch, linear, "quantize_weight", call, exc)
    with pytest.raises(exc):
        quantize_(model, SegQuantConfig(plan), filter_fn=None)
    assert_unchanged(model, prepared, snapshot, kwargs, prepared_out)
    assert api._journal is None
    monkeypatch.undo()
    quantize_(model, SegQuantConfig(plan), filter_fn=None)  # then it converts, and holds no snapshot afterwards
    assert len(quantized_layers(model)) == len(plan.quantized_layers()) and api._journal is None


@pytest.mark.parametrize("model_name", ["SD3Transformer2DModel", "UNet2DConditionModel"])
@pytest.mark.parametrize("backend", ["modelopt", "torchao"])
def test_failed_quantization_leaves_other_denoisers_as_they_were(monkeypatch, model_name, backend):
    """The same all-or-nothing on an MMDiT and a UNet (ModelOpt converts their attention and Conv layers too)."""
    pytest.importorskip(backend)
    model = build_tiny(model_name)
    kwargs = segquant.example_inputs(model)
    plan = segquant.analyze(model, **kwargs).with_precision("int8_w8a8")
    model.register_forward_pre_hook(lambda module, args: None)
    with torch.no_grad():
        expected = model(**kwargs)[0]
    before, snapshot = fingerprint(model), ModelSnapshot(model)
    if backend == "modelopt":
        from segquant_modelopt import algorithm as target
        point = "_apply"
    else:
        from segquant_torchao import linear as target
        point = "quantize_weight"
    fail_at(monkeypatch, target, point, 3)
    with pytest.raises(Injected):
        segquant.get_backend(backend).quantize(model, plan, segquant.QuantizeOptions(show_progress=False),
                                               lambda m: m(**kwargs))
    assert_unchanged(model, before, snapshot, kwargs, expected)
