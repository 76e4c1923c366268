"""benchmarks/quality.py's rows and paired comparisons, and benchmarks/quality_speed.py's join and front, on
small synthetic inputs (no stored results). The scripts' numbers come from the scripts on the device."""

import json

import pytest
from _benchmarks import load_benchmark

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def quality():
    return load_benchmark("quality")


@pytest.fixture(scope="module")
def qs():
    return load_benchmark("quality_speed")


def test_rows_are_variants_as_data(quality):
    rows = quality.build_rows("flux")
    names = [r["name"] for r in rows]
    assert len(names) == len(set(names))
    by = {r["name"]: r for r in rows}
    assert by["int8_w8a8 shift"]["changes"] == {"seg_linear": True, "dual_scale": False, "shift": "per_tensor"}
    assert by["fp8 DualScale+shift"]["changes"]["dual_scale"] and by["fp8 DualScale+shift"]["changes"]["shift"]
    assert by["int8_perchannel auto"]["changes"]["choose"] == "auto"
    for variant in quality.INT8_ONLY:  # SmoothQuant variants on the int8 precisions only
        assert f"fp8 {variant}" not in by and f"w4a8 {variant}" not in by
    assert "int8_w8a8 alpha search" in by
    # dynamic rows: calibrated only for a shift's centres
    assert not by["int8 dynamic SegQuant"]["calibrated"] and by["fp8 dynamic shift"]["calibrated"]
    assert all(r["kind"] == "segquant_dynamic" for r in rows if " dynamic " in r["name"] and "torchao" not in r["name"])
    only = quality.build_rows("flux", ("fp8",))
    assert {r["precision"] for r in only if r["kind"].startswith("segquant")} == {"fp8"}


def test_every_variant_is_a_valid_recipe_change(quality):
    from segquant.backend import QuantizeOptions

    for variant, changes in quality.variants().items():
        recipe_changes, option_changes = quality.split_changes(changes)
        recipe = quality.model_recipe("mnist-flux", "int8_w8a8", skip=(), **recipe_changes)
        QuantizeOptions(**{**option_changes, "realisation": recipe.realisation})
        assert recipe.seg_linear == changes.get("seg_linear", True), variant  # the recipe rows keep the recipe's


def test_pairs_compare_shift_dualscale_and_both(quality):
    rows = quality.build_rows("flux", ("int8_w8a8", "int8_dynamic"))
    pairs = quality.comparison_pairs(rows)
    for pair in [("int8_w8a8 shift", "int8_w8a8 baseline"), ("int8_w8a8 shift", "int8_w8a8 +DualScale"),
                 ("int8_w8a8 shift", "int8_w8a8 SegQuant"), ("int8_w8a8 DualScale+shift", "int8_w8a8 SegQuant"),
                 ("int8 dynamic shift", "int8 dynamic +SegLinear")]:
        assert pair in pairs
    peers = quality.peer_pairs(rows)
    assert ("int8 dynamic SegQuant", "torchao int8 dynamic") in peers
    assert ("int8_w8a8 baseline", "ModelOpt INT8_DEFAULT_CFG (every Linear)") in peers
    assert not any(p == "torchao fp8 dynamic per-row" for _, p in peers)


def test_paired_comparison_tiles_an_uncalibrated_row(quality):
    import torch

    g = torch.Generator().manual_seed(0)
    base = [torch.randn(16, generator=g)]  # one run (no calibration)
    per_image = {"a": {"psnr": [base[0] + 1.0, base[0] + 1.0]}, "b": {"psnr": base},
                 "c": {"psnr": [base[0]] * 3}}
    out = quality.paired_comparisons([("a", "b"), ("a", "c"), ("a", "missing")], per_image, metrics=("psnr",))
    assert [(e["row"], e["baseline"]) for e in out] == [("a", "b")]  # 2 vs 3 seeds cannot pair
    assert out[0]["psnr"]["n"] == 32 and out[0]["psnr"]["mean"] == pytest.approx(1.0)


# ---- quality_speed ----------------------------------------------------------------------------------------
def _interval(mean, half=0.2):
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": 100, "significant": abs(mean) > half}


def _quality(psnr: dict[str, float], pairs: dict[tuple[str, str], float], failed=()) -> dict:
    rows = {n: {"runs": [{"seed": s, "psnr_db": v + 0.1 * s} for s in range(3)]} for n, v in psnr.items()}
    rows.update({n: {"runs": [{"seed": 0, "error": "RuntimeError: no"}]} for n in failed})
    return {"models": {"mnist-flux": {"rows": rows, "settings": {"seeds": 3}, "environment": {"command": "q"},
                                      "peer_paired": [{"row": a, "baseline": b, "psnr": _interval(m)}
                                                      for (a, b), m in pairs.items()]}}}


def _speed(ms: dict[str, float], run="r1", spread=None) -> list[dict]:
    out = []
    for variant, t in ms.items():
        rec = {"bench": "flux_e2e", "variant": variant, "run": run, "ms_median": t, "device": "GPU"}
        if spread is not None:
            rec["ms_all"] = [t - spread, t, t + spread, t, t]
        out.append(rec)
    return out


PEER = "ModelOpt FP8_DEFAULT_CFG (every Linear)"


def test_join_maps_rows_to_variants_and_keeps_missing(qs):
    quality = _quality({PEER: 38.0, "fp8 SegQuant": 39.0}, {("fp8 SegQuant", PEER): 0.5}, failed=["fp8 shift"])
    speed = {r["variant"]: r for r in _speed({"bf16": 130.0, "segquant_fp8_static_plain": 100.0,
                                              "segquant_fp8_static": 104.0})}
    rows = {r["name"]: r for r in qs.join(quality["models"]["mnist-flux"], speed)}
    peer, seg = rows[PEER], rows["fp8 SegQuant"]
    assert peer["kind"] == "peer" and qs.EQUIVALENT in peer["note"] and peer["speedup"] == pytest.approx(1.3)
    assert seg["psnr_mean"] == pytest.approx(39.1) and seg["runs"] == 3 and seg["ms"] == 104.0
    assert seg["vs_peer"][PEER]["mean"] == 0.5 and seg["vs_peer"]["torchao fp8 dynamic per-row"] is None
    assert rows["fp8 shift"]["error"].startswith("RuntimeError")
    assert rows["fp8 +SegLinear"]["error"].startswith("missing") and rows["fp8 +SegLinear"]["ms"] is None
    assert rows["torchao fp8 dynamic per-row"]["speed_error"] == "not in this speed run"


@pytest.mark.parametrize("seg_ms, d_psnr, answer", [
    (101.0, -0.1, "yes"),   # within 2% of the peer's 100 ms, interval reaches 0
    (103.0, +0.5, "no"),    # better but slower than the tolerance
    (99.0, -1.0, "no"),     # faster but significantly worse
])
def test_verdict(qs, seg_ms, d_psnr, answer):
    quality = _quality({PEER: 38.0, "fp8 SegQuant": 38.0 + d_psnr}, {("fp8 SegQuant", PEER): d_psnr})
    speed = {r["variant"]: r for r in _speed({"bf16": 130.0, "segquant_fp8_static_plain": 100.0,
                                              "segquant_fp8_static": seg_ms})}
    rows = qs.join(quality["models"]["mnist-flux"], speed)
    v = next(v for v in qs.verdicts(rows, speed) if v["peer"] == PEER)
    assert v["answer"] == answer
    if answer == "no" and d_psnr > 0:
        assert v["closest_as_good"]["slower_pct"] == pytest.approx(3.0) and "closest_as_fast" not in v
    if answer == "no" and d_psnr < 0:
        assert v["closest_as_fast"]["d_psnr"]["mean"] == -1.0 and "closest_as_good" not in v
    other = next(v for v in qs.verdicts(rows, speed) if v["peer"] == "torchao fp8 dynamic per-row")
    assert other["answer"] == "undetermined"


def test_noise_widens_the_tolerance(qs):
    peer, cand = ({"ms_median": 100.0, "ms_all": [90, 95, 100, 105, 110]},
                  {"ms_median": 104.0, "ms_all": [94, 99, 104, 109, 114]})
    assert qs.tolerance_ms(cand, peer) > 4.0  # the spread, not the 2% floor
    assert qs.tolerance_ms({"ms_median": 104.0}, peer) == pytest.approx(2.0)


def test_pick_run_prefers_the_run_measuring_most(qs):
    records = (_speed({"bf16": 1.0, "a": 1.0}, run="old") + _speed({"bf16": 1.0, "a": 1.0, "b": 1.0}, run="new")
               + _speed({"a": 1.0, "b": 1.0, "c": 1.0}, run="no-bf16"))
    assert qs.pick_run(records, {"a", "b", "c"})[0] == "new"
    assert qs.pick_run(records, {"a"})[0] == "new"  # a tie goes to the later run
    assert qs.pick_run(records, {"a"}, run="old")[0] == "old"


def test_several_runs_merge_through_their_own_bf16(qs):
    records = (_speed({"bf16": 100.0, "a": 80.0}, run="r1", spread=1.0)
               + _speed({"bf16": 110.0, "a": 1.0, "b": 66.0}, run="r2", spread=1.0)
               + [{"bench": "flux_e2e", "variant": "c", "run": "r2", "error": "boom"}])
    label, speed = qs.pick_run(records, {"a", "b"}, run="r1,r2")
    assert label == "r1,r2" and speed["a"]["ms_median"] == 80.0 and "scaled_from" not in speed["a"]
    assert speed["b"]["ms_median"] == pytest.approx(60.0)  # 66 ms at bf16 110 -> 60 ms at the first run's bf16 100
    assert speed["b"]["scaled_from"] == {"run": "r2", "ms_median": 66.0, "factor": pytest.approx(0.9091, abs=1e-4)}
    assert speed["b"]["ms_all"][1] == pytest.approx(60.0) and speed["c"]["error"] == "boom"
    assert "run r2: 66.0 ms x 0.9091" in qs.timing_note(speed["b"])
    with pytest.raises(SystemExit, match="not found"):
        qs.pick_run(records, {"a"}, run="r1,r9")
    with pytest.raises(SystemExit, match="own bf16"):
        qs.pick_run(records + _speed({"a": 1.0}, run="r3"), {"a"}, run="r1,r3")


def test_ordinary_calls_in_a_graph_run_are_labelled(qs):
    rec = {"cuda_graph": True, "timed_as": "calls (--cuda-graph-skip)"}
    assert qs.timing_note(rec).startswith("ordinary calls, not CUDA-graph replays")
    assert qs.timing_note({"cuda_graph": True, "timed_as": "graph replays"}) == ""


def test_defaults_on_the_front(qs):
    rows = [{"name": "fp8 recipe", "kind": "segquant", "speedup": 1.3, "psnr_mean": 45.0},
            {"name": "fp8 baseline", "kind": "segquant", "speedup": 1.3, "psnr_mean": 38.0},
            {"name": "fp8 SegQuant", "kind": "segquant", "speedup": 1.0, "psnr_mean": 39.0}]
    front = [rows[i]["name"] for i in qs.pareto([(r["speedup"], r["psnr_mean"]) for r in rows])]
    assert qs.defaults_on_front(rows, front, "fp8") == [{"row": "fp8 recipe", "on_front": True, "beaten_by": []}]
    rows[1]["psnr_mean"] = 46.0
    front = [rows[i]["name"] for i in qs.pareto([(r["speedup"], r["psnr_mean"]) for r in rows])]
    assert qs.defaults_on_front(rows, front, "fp8") == [{"row": "fp8 recipe", "on_front": False,
                                                        "beaten_by": ["fp8 baseline"]}]


def test_pareto(qs):
    pts = [(1.0, 40.0), (1.3, 39.0), (1.2, 38.0), (0.9, 41.0), (1.3, 38.5)]
    assert qs.pareto(pts) == [3, 0, 1]


def test_mapping_covers_every_int8_and_fp8_quality_row(quality, qs):
    mapping = qs.timing_map()
    rows = quality.build_rows("flux")
    for r in rows:
        if r["kind"] in ("segquant", "segquant_dynamic") and r["precision"] in quality.FORMAT_OF:
            assert mapping[r["name"]]["format"] == quality.FORMAT_OF[r["precision"]], r["name"]
    for peers in quality.PEERS.values():
        assert all(mapping[p]["kind"] == "peer" for p in peers)
    speed = load_benchmark("speed")
    assert {m["variant"] for m in mapping.values()} <= set(speed.VARIANTS)


def test_script_end_to_end(qs, tmp_path):
    quality = _quality({PEER: 38.0, "fp8 SegQuant": 39.0}, {("fp8 SegQuant", PEER): 0.5})
    (tmp_path / "quality.json").write_text(json.dumps(quality))
    (tmp_path / "speed.jsonl").write_text("\n".join(json.dumps(r) for r in _speed(
        {"bf16": 130.0, "segquant_fp8_static_plain": 100.0, "segquant_fp8_static": 100.5}, spread=1.0)) + "\n")
    qs.main(["--quality", str(tmp_path / "quality.json"), "--speed", str(tmp_path / "speed.jsonl"),
             "--out", str(tmp_path)])
    result = json.loads((tmp_path / "quality_speed.json").read_text())
    assert result["speed"]["run"] == "r1"
    v = next(v for v in result["formats"]["fp8"]["verdicts"] if v["peer"] == PEER)
    assert v["answer"] == "yes" and v["witness"] == "fp8 SegQuant"
    md = (tmp_path / "quality_speed.md").read_text()
    assert "**yes**: fp8 SegQuant" in md and "timed as equivalent kernels" in md
    assert (tmp_path / "quality_speed.png").stat().st_size > 0
