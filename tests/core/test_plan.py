import json

import pytest

from segquant import LinearPlan, PlanError, SegQuantPlan
from segquant.plan import PLAN_VERSION


def _plan() -> SegQuantPlan:
    return SegQuantPlan(model_class="Toy", layers={
        "a.proj_out": LinearPlan(160, 32, in_segments=(32, 128), dual_scale=True, dual_scale_segments=(1,),
                                 activation="gelu_tanh", patterns=("cat->linear", "act->cat->linear"),
                                 nodes=("cat_11", "gelu_2")),
        "a.norm.linear": LinearPlan(32, 96, out_segments=(32, 32, 32), dual_scale=True, activation="silu",
                                    patterns=("act->linear", "linear->chunk")),
        "a.to_q": LinearPlan(32, 32),
    })


def test_defaults_fill_unsegmented():
    p = LinearPlan(64, 16)
    assert p.in_segments == (64,) and p.out_segments == (16,)
    assert p.is_plain and not p.seg_linear
    d = LinearPlan(64, 16, dual_scale=True, activation="silu")
    assert d.dual_scale_segments == (0,)


def test_json_schema_is_stable():
    data = json.loads(_plan().to_json())
    assert data["version"] == PLAN_VERSION and data["model_class"] == "Toy"
    entry = data["layers"]["a.proj_out"]
    assert entry == {"in_features": 160, "out_features": 32, "in_segments": [32, 128], "out_segments": [32],
                     "dual_scale": True, "dual_scale_segments": [1], "activation": "gelu_tanh",
                     "patterns": ["cat->linear", "act->cat->linear"], "nodes": ["cat_11", "gelu_2"],
                     "high_precision": False, "precision": None, "shift": None, "shift_segments": [],
                     "smoothquant_alpha": None}
    assert data["layers"]["a.to_q"]["in_segments"] == [32]
    assert data["layers"]["a.to_q"]["activation"] is None


def test_json_round_trip(tmp_path):
    plan = _plan()
    assert SegQuantPlan.from_json(plan.to_json()) == plan
    plan.save(tmp_path / "p.json")
    assert SegQuantPlan.load(tmp_path / "p.json") == plan


def test_table_lists_changed_layers():
    text = str(_plan())
    assert "a.proj_out" in text and "32|128" in text and "gelu_tanh seg 1" in text
    assert "3x32" in text and "a.to_q" not in text
    assert "1 plain Linear layers not shown" in text
    assert "2 DualScale of 3 Linear" in text


def test_override_by_glob():
    plan = _plan().override("a.*", dual_scale=False)
    assert plan.dual_scaled() == []
    assert plan["a.proj_out"].in_segments == (32, 128)  # segments kept
    assert "override" in plan["a.proj_out"].patterns
    plan = _plan().with_overrides({"*.proj_out": {"in_segments": [160]}, "a.to_q": {"out_segments": [16, 16]}})
    assert plan["a.proj_out"].in_segments == (160,)
    assert plan["a.proj_out"].dual_scale_segments == (0,)  # re-derived for the single segment
    assert plan["a.to_q"].out_segments == (16, 16)


def test_ablate():
    plan = _plan()
    no_seg = plan.ablate(seg_linear=False)
    assert no_seg.input_segmented() == [] and no_seg.output_segmented() == []
    assert no_seg.dual_scaled() == ["a.norm.linear"]  # proj_out was only partly activation-fed
    no_dual = plan.ablate(dual_scale=False)
    assert no_dual.dual_scaled() == [] and no_dual.input_segmented() == ["a.proj_out"]
    assert plan.ablate(False, False).summary() == "0 output-segmented, 0 input-segmented, 0 DualScale of 3 Linear"


@pytest.mark.parametrize("kwargs, message", [
    (dict(in_features=10, out_features=4, in_segments=(4, 4)), "sum to 8, in_features is 10"),
    (dict(in_features=8, out_features=4, out_segments=(3,)), "out_features is 4"),
    (dict(in_features=8, out_features=4, in_segments=(8, 0)), "positive sizes"),
    (dict(in_features=8, out_features=4, dual_scale_segments=(0,)), "dual_scale is False"),
    (dict(in_features=8, out_features=4, dual_scale=True, dual_scale_segments=(2,)), "out of range"),
    (dict(in_features=8, out_features=4, dual_scale=True, activation="relu"), "unknown activation"),
    (dict(in_features=0, out_features=4), "must be positive"),
])
def test_bad_linear_plan(kwargs, message):
    with pytest.raises(PlanError, match=message):
        LinearPlan(name="blk.0.lin", **kwargs)


def test_bad_plan_input():
    with pytest.raises(PlanError, match="not valid JSON"):
        SegQuantPlan.from_json("{oops")
    with pytest.raises(PlanError, match="version 4 is not supported"):
        SegQuantPlan.from_json(json.dumps({"version": 4, "layers": {}}))
    with pytest.raises(PlanError, match="plan version must be an integer: write 1, not '1'"):
        SegQuantPlan.from_json(json.dumps({"version": "1", "layers": {}}))
    with pytest.raises(PlanError, match="plan: x: dual_scale must be true or false \\(not quoted\\), got 'false'"):
        SegQuantPlan.from_dict({"version": 2, "layers": {"x": {"in_features": 2, "out_features": 2,
                                                                "dual_scale": "false"}}})
    with pytest.raises(PlanError, match="no 'version'"):
        SegQuantPlan.from_json(json.dumps({"layers": {}}))
    with pytest.raises(PlanError, match=r"x: unknown keys \['colour'\]; known: \['in_features'"):
        SegQuantPlan.from_dict({"version": 1, "layers": {"x": {"in_features": 2, "out_features": 2, "colour": 1}}})
    with pytest.raises(PlanError, match="matches no layer"):
        _plan().override("nothing.*", dual_scale=False)
    with pytest.raises(PlanError, match="cannot override"):
        _plan().override("a.*", in_features=3)
    with pytest.raises(PlanError, match="missing: no such layer"):
        _plan()["missing"]


def test_version_1_plans_are_read_and_upgraded():
    data = _plan().to_dict()
    data["version"] = 1
    del data["recipe"]
    for entry in data["layers"].values():
        del entry["high_precision"], entry["precision"]
    plan = SegQuantPlan.from_dict(data)
    assert plan.version == PLAN_VERSION and plan == _plan() and not plan.high_precision_layers()


def test_applied_plan_says_precision_and_high_precision_per_layer():
    plan = _plan().keep_high_precision(["a.to_q"]).with_precision("fp8", recipe="toy/fp8")
    assert plan.high_precision_layers() == ["a.to_q"] and plan["a.to_q"].precision is None
    assert plan.precision() == "fp8" and plan.recipe == "toy/fp8"
    assert plan.quantized_layers() == ["a.proj_out", "a.norm.linear"]
    assert "1 kept in high precision" in plan.summary() and "recipe toy/fp8" in str(plan)
    assert SegQuantPlan.from_json(plan.to_json()) == plan
    mixed = plan.override("a.proj_out", precision="int8_w8a8")
    with pytest.raises(PlanError, match="mixes precisions"):
        mixed.precision()
    with pytest.raises(PlanError, match="unknown precision 'int3'"):
        LinearPlan(4, 4, precision="int3", name="x")
    with pytest.raises(PlanError, match="a layer kept in high precision has no precision"):
        LinearPlan(4, 4, precision="fp8", high_precision=True, name="x")
    with pytest.raises(PlanError, match="high-precision pattern 'nothing' matches no layer"):
        plan.keep_high_precision(["nothing"])


def test_merging_segments_keeps_dual_scale_only_when_every_segment_had_it():
    plan = _plan()
    merged = plan["a.proj_out"].without_segments()  # one of two input segments is DualScale
    assert merged.in_segments == (160,) and not merged.dual_scale
    assert plan["a.norm.linear"].without_segments().dual_scale  # its one input segment is DualScale
    assert plan.ablate(seg_linear=False) == plan.ablate(seg_linear=False).ablate(seg_linear=False)
