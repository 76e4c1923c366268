"""Per-layer choices from calibration data: technique (plain / shift / DualScale / both) and SmoothQuant alpha."""

import pytest
import torch
from torch import nn

from segquant import LinearPlan, SegQuantError, SegQuantPlan
from segquant.choose import ALPHA_GRID, candidate_entries, choose_techniques, layer_error, search_alpha
from segquant.cost import CostModel, capture_linear_inputs


class GeluMlp(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(16, 64)
        self.down = nn.Linear(64, 16)
        with torch.no_grad():  # a few outlier input channels, as in real transformers
            self.up.weight[:, :2] *= 8

    def forward(self, x):
        return self.down(nn.functional.gelu(self.up(x)))


def _setup(**recipe):
    model = GeluMlp().eval()
    plan = SegQuantPlan({"up": LinearPlan(16, 64, precision="int8_w8a8"),
                         "down": LinearPlan(64, 16, dual_scale=True, activation="gelu", precision="int8_w8a8")},
                        model_class="GeluMlp")
    if recipe.get("shift"):
        plan = plan.with_shift(recipe["shift"], keep_dual_scale=recipe.get("dual", True))
    batches = [{"x": torch.randn(32, 16, generator=torch.Generator().manual_seed(s)) * 2} for s in range(3)]
    return model, plan, capture_linear_inputs(model, batches)


def test_candidates_follow_what_the_plan_enables():
    layer = LinearPlan(24, 8, in_segments=(8, 16), dual_scale=True, dual_scale_segments=(1,), activation="gelu",
                       shift="per_channel", shift_segments=(1,))
    entries = candidate_entries(layer)
    assert list(entries) == ["plain", "shift", "dual_scale", "both"]
    assert entries["plain"].is_plain is False and not entries["plain"].dual_scale and entries["plain"].shift is None
    assert entries["shift"].shift == "per_channel" and entries["shift"].shift_segments == (1,)
    assert entries["both"].dual_scale_segments == (1,) and entries["both"].shift_segments == (1,)
    assert list(candidate_entries(layer.replace(shift=None, activation="gelu"))) == ["plain", "dual_scale"]
    assert list(candidate_entries(LinearPlan(8, 8))) == ["plain"]


def test_choice_is_the_measured_best_and_dualscale_must_pay_for_itself():
    model, plan, inputs = _setup(shift="per_tensor")
    free_plan, choices = choose_techniques(model, plan, inputs, threshold=0.0)
    (choice,) = choices
    assert choice.name == "down" and set(choice.sqnr_db) == {"plain", "shift", "dual_scale", "both"}
    assert choice.chosen == max(choice.sqnr_db, key=choice.sqnr_db.get)  # threshold 0: the best wins
    for c, e in candidate_entries(plan["down"]).items():  # the recorded SQNR is the layer's measured one
        assert choice.sqnr_db[c] == pytest.approx(layer_error(model.down, e, inputs["down"]), abs=1e-6)
    assert choice.extra_cost_pct["shift"] == 0 == choice.extra_cost_pct["plain"] < choice.extra_cost_pct["both"]
    cheap, (choice,) = choose_techniques(model, plan, inputs, threshold=1e9)
    assert choice.chosen in ("plain", "shift") and not cheap["down"].dual_scale
    assert choice.chosen == max(("plain", "shift"), key=choice.sqnr_db.get)
    assert cheap["up"] == plan["up"]  # no activation-fed input: untouched


def test_shift_beats_one_symmetric_scale_on_gelu_outputs():
    model, plan, inputs = _setup(shift="per_tensor")
    _, (choice,) = choose_techniques(model, plan, inputs, threshold=0.0)
    assert choice.sqnr_db["shift"] > choice.sqnr_db["plain"] + 1.0
    assert choice.sqnr_db["dual_scale"] > choice.sqnr_db["plain"] + 1.0


def test_alpha_search_keeps_the_grid_value_with_the_best_output_error():
    model, plan, inputs = _setup()
    searched, scores = search_alpha(model, plan, inputs)
    assert set(scores) == {"up", "down"} and tuple(scores["up"]) == ALPHA_GRID
    for name in scores:
        best = searched[name].smoothquant_alpha
        assert best in ALPHA_GRID and scores[name][best] == max(scores[name].values())
        assert scores[name][best] >= scores[name][0.5]
    # the outlier channels of up's input make smoothing matter there: the grid is not flat
    assert max(scores["up"].values()) - min(scores["up"].values()) > 1.0
    again = SegQuantPlan.from_json(searched.to_json())
    assert again["up"].smoothquant_alpha == searched["up"].smoothquant_alpha


@pytest.mark.parametrize("call, message", [
    (lambda m, p, i: choose_techniques(m, p, i, threshold=-1), "threshold must be a number >= 0"),
    (lambda m, p, i: search_alpha(m, p, i, grid=[]), "alpha grid must be a non-empty list"),
    (lambda m, p, i: search_alpha(m, p, i, grid=[0.5, 2]), "alpha grid must be a non-empty list"),
    (lambda m, p, i: search_alpha(nn.Sequential(), p, i), "up: in the plan but not an nn.Linear of Sequential"),
])
def test_bad_input(call, message):
    model, plan, inputs = _setup(shift="per_tensor")
    with pytest.raises(SegQuantError, match=message):
        call(model, plan, inputs)


def test_cost_model_prices_the_shift_as_free():
    layer = LinearPlan(64, 16, dual_scale=True, activation="gelu")
    assert CostModel().extra(layer.replace(dual_scale=False, shift="per_tensor", activation="gelu")) == (0.0, 0.0)
    assert CostModel().extra(layer)[0] > 0


def test_apply_choices_runs_alpha_search_then_the_technique_choice():
    from segquant.choose import apply_choices, capture_from_loop

    model, plan, _ = _setup(shift="per_tensor")
    batches = [torch.randn(32, 16, generator=torch.Generator().manual_seed(s)) * 2 for s in range(3)]
    inputs = capture_from_loop(model, lambda m: [m(x) for x in batches], plan.quantized_layers(), rows_per_call=16)
    assert inputs["down"].shape == (48, 64)  # 16 rows of each of the 3 calls
    same, notes = apply_choices(model, plan, inputs)
    assert same is plan and notes == []
    chosen, notes = apply_choices(model, plan, inputs, "auto", alpha_search=True)
    assert chosen["up"].smoothquant_alpha in ALPHA_GRID and chosen["down"].smoothquant_alpha in ALPHA_GRID
    assert notes[0].startswith("alpha search on 2 layers") and notes[1].startswith("per-layer technique choice")
    with pytest.raises(SegQuantError, match="choose must be 'fixed' or 'auto'"):
        apply_choices(model, plan, inputs, "best")
    analysed = SegQuantPlan({n: p.replace(precision=None) for n, p in plan.layers.items()})
    with pytest.raises(SegQuantError, match="need an applied plan"):
        apply_choices(model, analysed, inputs, "auto")


def test_ranges_of_every_row_give_the_backends_scales_to_a_subsample():
    from segquant.choose import capture_from_loop

    model, plan, _ = _setup()
    batches = [torch.randn(64, 16, generator=torch.Generator().manual_seed(s)) * 2 for s in range(3)]
    ranges = {}
    inputs = capture_from_loop(model, lambda m: [m(x) for x in batches], ["down"], rows_per_call=4, ranges=ranges)
    with torch.no_grad():
        every_row = torch.cat([torch.nn.functional.gelu(model.up(x)) for x in batches])
    assert inputs["down"].shape == (12, 64)  # a subsample ...
    assert torch.equal(ranges["down"].amax, every_row.abs().amax(0))  # ... and the ranges of all 192 rows
    assert (ranges["down"].amax >= inputs["down"].abs().amax(0)).all()
    own, full = (layer_error(model.down, plan["down"], inputs["down"], ranges=r) for r in (None, ranges["down"]))
    assert own != full  # the subsample's own scales are not the ones the backend computes


def test_recipe_choices_make_one_pass_for_every_plan():
    from segquant.choose import recipe_choices
    from segquant.recipe import Recipe

    model, plan, _ = _setup(shift="per_tensor")
    calls = []
    batches = [torch.randn(32, 16, generator=torch.Generator().manual_seed(s)) * 2 for s in range(3)]

    def loop(m):
        calls.append(1)
        for x in batches:
            m(x)

    base = Recipe(name="m/int8_w8a8", model_class="GeluMlp", config="c", precision="int8_w8a8")
    plans = {"a": plan, "b": plan.ablate(dual_scale=False, shift=False)}
    same, notes = recipe_choices(model, plans, base, loop)
    assert same == plans and notes == {"a": [], "b": []} and calls == []  # nothing asked: no pass
    auto = Recipe(name="m/int8_w8a8", model_class="GeluMlp", config="c", precision="int8_w8a8", choose="auto",
                  alpha_search=True)
    chosen, notes = recipe_choices(model, plans, auto, loop)
    assert calls == [1] and set(chosen) == {"a", "b"}
    assert all(p["up"].smoothquant_alpha is not None for p in chosen.values())
    assert notes["a"][1].startswith("per-layer technique choice on 1 layers")
    assert notes["b"][1].startswith("per-layer technique choice on 0 layers")  # nothing left to choose
