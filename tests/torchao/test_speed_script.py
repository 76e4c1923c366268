"""benchmarks/speed.py on the CPU: variant names, and the driver end to end (one process per variant, one
JSON line each, a report) on one block of the embedded model's config. The GPU numbers come from the same
script on the device (benchmarks/results/speed.md)."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _benchmarks import load_benchmark

pytest.importorskip("torchao")
pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "speed.py"


def test_variant_names_parse_into_base_dual_kernel_and_shift():
    speed = load_benchmark("speed")
    assert speed.parse_variant("segquant_fp8_static") == ("segquant_fp8_static", True, "fused", False)
    assert speed.parse_variant("segquant_fp8_static_nodual") == ("segquant_fp8_static", False, "fused", False)
    assert speed.parse_variant("segquant_int8_dynamic_nodual_naive") == ("segquant_int8_dynamic", False, "naive",
                                                                          False)
    assert speed.parse_variant("segquant_fp8_costaware_naive") == ("segquant_fp8_costaware", True, "naive", False)
    assert speed.parse_variant("bf16") == ("bf16", True, "fused", False)
    assert speed.parse_variant("segquant_int8_static_shift") == ("segquant_int8_static", False, "fused", True)
    assert speed.parse_variant("segquant_fp8_static_shift_naive") == ("segquant_fp8_static", False, "naive", True)
    # "_fusedqkv" (diffusers' fused projections) goes with any variant and takes no part in the rest
    assert speed.parse_variant("segquant_fp8_static_nodual_fusedqkv") == speed.parse_variant(
        "segquant_fp8_static_nodual")
    assert speed.parse_variant("bf16_fusedqkv") == speed.parse_variant("bf16")
    # "_fp8attn" (FlashAttention-3's e4m3 attention) goes after any of them
    assert speed.split_attention("segquant_fp8_static_fusedqkv_fp8attn") == ("segquant_fp8_static_fusedqkv", True)
    assert speed.split_attention("bf16") == ("bf16", False)
    assert speed.parse_variant("segquant_fp8_static_nodual_fusedqkv_fp8attn") == speed.parse_variant(
        "segquant_fp8_static_nodual")
    assert speed.fused_qkv("bf16_fusedqkv_fp8attn", argparse.Namespace(fuse_qkv=False))


def test_shift_variants_put_the_shift_where_dual_scale_was():
    import segquant
    from _models import build_tiny

    speed = load_benchmark("speed")
    model = build_tiny("FluxTransformer2DModel")
    plan = segquant.analyze(model, **segquant.example_inputs(model))
    shifted = speed.variant_plan(plan, "segquant_int8_static_shift")
    twin = speed.variant_plan(plan, "segquant_int8_static_nodual")
    assert shifted.shifted() == plan.dual_scaled() and not shifted.dual_scaled()
    assert all(shifted[n].shift == "per_tensor" and shifted[n].shift_segments == plan[n].dual_scale_segments
               for n in shifted.shifted())
    assert not twin.shifted() and not twin.dual_scaled()
    # the same segments and no DualScale in both: the twin differs by the shift only
    assert all((shifted[n].in_segments, shifted[n].out_segments, shifted[n].precision) ==
               (twin[n].in_segments, twin[n].out_segments, twin[n].precision) for n in plan.layers)
    assert speed.variant_plan(plan, "segquant_int8_static") == plan


@pytest.mark.parametrize("name, kind", [
    ("nvjet_tst_128x256_64x4_2x1_v_bz_TNT", "gemm"),
    ("void cutlass::device_kernel<at::cuda::detail::enable_3x_kernel_for_sm9x<cutlass::gemm::kernel", "gemm"),
    ("_scaled_gemm_kernel", "gemm"),
    ("triton_tem_fused_mm_0", "gemm"),
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4", "attention"),
    ("triton_poi_fused__scaled_mm_clamp_div_0", "fused elementwise (inductor)"),
    ("triton_red_fused__fused_rms_norm__scaled_dot_product_cudnn_attention_0", "fused elementwise (inductor)"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7", "attention"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float> >", "other"),
])
def test_kernel_kind(name, kind):
    assert load_benchmark("speed").kernel_kind(name) == kind


@pytest.mark.parametrize("name", ["segquant_fp8_costaware_nodual", "torchao_fp8_rowwise_naive", "fp8",
                                  "segquant_int8_dynamic_shift", "segquant_int8_static_nodual_shift",
                                  "bf16_fusedqkv_fusedqkv", "segquant_fp8_static_fusedqkv_nodual"])
def test_unknown_variant_is_refused(name):
    with pytest.raises(ValueError, match="unknown variant"):
        load_benchmark("speed").parse_variant(name)


def test_driver_rejects_unknown_variants(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--cpu-smoke", "--variants",
                           "bf16,segquant_fp9"], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "unknown variants ['segquant_fp9']" in proc.stderr


def run_driver(out, *args):
    """The driver on the CPU (one block of mnist-flux, no compile, 3 calls) with ``args``; its speed.jsonl rows."""
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--cpu-smoke", "--blocks", "1", "--compile", "none",
           "--config", str(ROOT / "segquant/configs/mnist-flux.json"), "--quick", *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    return [json.loads(line) for line in (out / "speed.jsonl").read_text().splitlines()]


def test_driver_runs_each_variant_and_reports(tmp_path):
    rows = run_driver(tmp_path, "--run-id", "smoke", "--profile",
                      "--variants", "bf16,segquant_int8_static_naive,segquant_fp8_costaware_naive")
    assert [r["variant"] for r in rows] == ["bf16", "segquant_int8_static_naive", "segquant_fp8_costaware_naive"]
    for r in rows:
        assert "error" not in r, r
        assert r["run"] == "smoke" and r["ms_median"] > 0 and r["finite"]
    int8, aware = rows[1], rows[2]
    assert int8["dual_scale_layers"] > 0
    # quantized against the bf16 output of the same weights: close, not equal
    assert 15 < int8["sqnr_vs_bf16_db"] < 80
    assert "analyze_s" in int8 and "analyze_s" not in aware  # the second SegQuant variant reused the plan
    thresholds = [p["threshold"] for p in aware["sweep"]]
    assert thresholds == sorted(thresholds)
    extra = [p["extra_time"] for p in aware["sweep"]]
    assert extra == sorted(extra, reverse=True)  # a higher threshold never keeps more extra time
    assert rows[0]["profile"]["wall_ms"] > 0 and rows[0]["profile"]["kernel_ms"] == 0  # no GPU kernels on the CPU
    report = (tmp_path / "speed.md").read_text()
    assert "run smoke" in report and "| segquant_int8_static_naive |" in report


def test_fused_qkv_per_variant_in_one_interleaved_run(tmp_path):
    rows = run_driver(tmp_path, "--run-id", "mixed", "--interleave",
                      "--variants", "bf16,bf16_fusedqkv,segquant_fp8_static_nodual_naive_fusedqkv")
    assert [r.get("error") for r in rows] == [None] * 3, rows
    assert [r["fused_qkv"] for r in rows] == [False, True, True]
    assert rows[1]["sqnr_vs_bf16_db"] > 60  # the same weights, fused: bf16 rounding only
    assert 15 < rows[2]["sqnr_vs_bf16_db"] < 60
    assert [p.name for p in tmp_path.glob("plan_*.json")] == ["plan_mnist-flux_1_fusedqkv.json"]
    plan = json.loads((tmp_path / "plan_mnist-flux_1_fusedqkv.json").read_text())
    fused = [n for n in plan["layers"] if n.endswith(("to_qkv", "to_added_qkv"))]
    assert fused and all(len(plan["layers"][n]["out_segments"]) == 3 for n in fused)
    speed = load_benchmark("speed")  # --fuse-qkv: every variant of the run fused
    assert speed.fused_qkv("bf16", argparse.Namespace(fuse_qkv=True))
    assert not speed.fused_qkv("bf16", argparse.Namespace(fuse_qkv=False))


def test_quantize_adaln_quantizes_the_modulations_and_keeps_the_embedders():
    from types import SimpleNamespace

    speed = load_benchmark("speed")
    names = ["transformer_blocks.0.norm1.linear", "single_transformer_blocks.0.norm.linear", "norm_out.linear",
             "time_text_embed.timestep_embedder.linear_1", "transformer_blocks.0.attn.to_q"]
    kept = {flags: [speed.small_layer(n, SimpleNamespace(quantize_small=flags[0], quantize_adaln=flags[1]))
                    for n in names]
            for flags in ((False, False), (False, True), (True, False), (True, True))}
    assert kept[(False, False)] == [True, True, True, True, False]
    assert kept[(False, True)] == [False, False, False, True, False]
    assert kept[(True, False)] == kept[(True, True)] == [False] * 5


def test_quantize_adaln_run_on_the_cpu(tmp_path):
    rows = run_driver(tmp_path, "--run-id", "adaln", "--quantize-adaln",
                      "--variants", "bf16,segquant_fp8_static_nodual_naive")
    assert [r.get("error") for r in rows] == [None, None] and all(r["quantize_adaln"] for r in rows)
    # mnist-flux: 1 double + 2 single blocks' modulations and norm_out quantized; the time/label embedders stay bf16
    speed = load_benchmark("speed")
    layers = json.loads(next(tmp_path.glob("plan_*.json")).read_text())["layers"]
    kept = {flags: sum(1 for n in layers if speed.small_layer(n, argparse.Namespace(quantize_small=False,
                                                                                      quantize_adaln=flags)))
            for flags in (True, False)}
    assert 0 < rows[1]["small_layers_bf16"] == kept[True] < kept[False]
    assert "adaLN quantized, run adaln" in (tmp_path / "speed.md").read_text()
    assert 15 < rows[1]["sqnr_vs_bf16_db"] < 80


def test_interleaved_variants_share_rounds_and_get_paired_ratios(tmp_path):
    # with an FP8-attention variant that cannot prepare (no FlashAttention-3 here): an error record, the rest timed
    rows = run_driver(tmp_path, "--run-id", "ab", "--interleave", "--coordinate-descent",
                      "--fa3-library", str(tmp_path / "missing" / "_C.so"), "--variants",
                      "bf16,segquant_int8_static_nodual_naive,segquant_int8_static_shift_naive,bf16_fp8attn")
    rows, failed = rows[:3], rows[3]
    assert failed["variant"] == "bf16_fp8attn" and "no FlashAttention-3 library at" in failed["error"]
    assert [r["variant"] for r in rows] == ["bf16", "segquant_int8_static_nodual_naive",
                                            "segquant_int8_static_shift_naive"]
    assert all("error" not in r and r["iters"] == 3 and len(r["ms_all"]) == 3 for r in rows), rows
    assert all(r["coordinate_descent"] for r in rows + [failed])
    assert "paired_vs_first" not in rows[0]
    for r in rows[1:]:
        paired = r["paired_vs_first"]
        assert paired["vs"] == "bf16" and paired["ms"]["rounds"] == 3
        assert paired["ms"]["lo"] <= paired["ms"]["median"] <= paired["ms"]["hi"]
        assert r["interleaved_with"] and r["peak_gb"] is None and 15 < r["sqnr_vs_bf16_db"] < 80
    assert rows[2]["shift_layers"] > 0
    report = (tmp_path / "speed.md").read_text()
    assert "interleaved, coordinate-descent tuning, run ab" in report
    assert "| segquant_int8_static_shift_naive | " in report
    assert "Paired per round" in report and "fixed order" not in report
    assert "| segquant_int8_static_shift_naive / segquant_int8_static_nodual_naive | " in report
    assert all(r["round_order"] == "shuffled per round" for r in rows)


def test_paired_ratio_is_the_median_of_per_round_ratios():
    speed = load_benchmark("speed")
    paired = speed.paired_ratio([2.0, 4.0, 6.0, 100.0], [1.0, 2.0, 3.0, 10.0])
    assert paired["median"] == 2.0 and paired["rounds"] == 4
    assert paired["lo"] == 2.0 and paired["hi"] <= 10.0


def test_cuda_graph_on_the_cpu_is_an_error_record(tmp_path):
    out = tmp_path / "g"
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--cpu-smoke", "--blocks", "1", "--compile", "none",
           "--config", str(ROOT / "segquant/configs/mnist-flux.json"), "--quick", "--cuda-graph", "--variants", "bf16"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in (out / "speed.jsonl").read_text().splitlines()]
    assert rows[0]["error"] == "RuntimeError: --cuda-graph needs a CUDA device"


def test_child_rejects_unknown_variants_in_a_group(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--cpu-smoke", "--variant",
                           "bf16,segquant_fp9"], capture_output=True, text=True)
    assert proc.returncode != 0 and "unknown variants ['segquant_fp9']" in proc.stderr


def test_a_variant_that_fails_to_prepare_leaves_the_others_timed(tmp_path, monkeypatch):
    speed = load_benchmark("speed")
    monkeypatch.setattr(speed, "DEVICE", "cpu")

    def prepare(variant, args):
        if variant == "torchao_int8_dynamic":
            raise RuntimeError("no kernel")
        out = torch.ones(4)
        return speed.Prepared(dict(variant=variant), lambda **_: (out,), {}, out, None)

    monkeypatch.setattr(speed, "prepare_variant", prepare)
    args = argparse.Namespace(iters=2, out=tmp_path, blocks=1, ref_dir=None, profile=False, run_id="r", git="abc",
                              compile="none", compile_mode="default", cuda_graph=False, coordinate_descent=False)
    records = speed.run_variants(["bf16", "torchao_int8_dynamic", "segquant_fp8_static"], args)
    assert [r["variant"] for r in records] == ["bf16", "segquant_fp8_static", "torchao_int8_dynamic"]
    assert records[2]["error"] == "RuntimeError: no kernel"
    assert records[1]["paired_vs_first"]["vs"] == "bf16" and records[1]["iters"] == 2
    assert records[1]["interleaved_with"] == ["bf16"]


def test_rounds_call_each_variant_once_in_shuffled_orders(monkeypatch):
    speed = load_benchmark("speed")
    monkeypatch.setattr(speed, "DEVICE", "cpu")
    calls = []
    prepared = [speed.Prepared(dict(variant=v), (lambda v: lambda **_: calls.append(v))(v), {}, None, None)
                for v in "abcd"]
    speed.time_rounds(prepared, iters=6)
    rounds = [calls[i:i + 4] for i in range(0, len(calls), 4)]
    assert all(sorted(r) == list("abcd") for r in rounds) and len(rounds) == 6
    assert len({tuple(r) for r in rounds}) > 1  # not one fixed order
    assert all(len(p.times) == 6 for p in prepared)


def test_cuda_graph_skip_times_ordinary_calls(tmp_path):
    rows = run_driver(tmp_path, "--cuda-graph", "--cuda-graph-skip", "bf16", "--variants", "bf16")
    assert "error" not in rows[0] and rows[0]["timed_as"] == "calls (--cuda-graph-skip)"
    assert "NOT graph replays" in (tmp_path / "speed.md").read_text()


def test_cold_compile_gives_each_variant_empty_caches(tmp_path):
    rows = run_driver(tmp_path, "--cold-compile", "--run-id", "cold", "--variants", "bf16")
    assert rows[0]["cold_compile"] is True and "error" not in rows[0]
    assert "cold compile, run cold" in (tmp_path / "speed.md").read_text()


def test_report_gives_each_segquant_fp8_variant_its_per_round_ratio_to_torchao(tmp_path):
    speed = load_benchmark("speed")
    times = {"bf16": [10.0, 12.0, 11.0], "torchao_fp8_rowwise": [8.0, 9.0, 8.8], "segquant_fp8_static": [7.0, 8.0, 8.0]}
    records = []
    for variant, ms in times.items():
        r = dict(bench="flux_e2e", variant=variant, blocks=1, run="r", compile="none", compile_mode="default",
                 ms_median=sorted(ms)[1], ms_min=min(ms), ms_max=max(ms), iters=3, ms_all=ms,
                 interleaved_with=[v for v in times if v != variant], round_order="shuffled per round",
                 weight_gb=1.0, peak_gb=None, compile_s=1.0)
        if variant != "bf16":
            r["paired_vs_first"] = dict(vs="bf16", ms=speed.paired_ratio(ms, times["bf16"]))
        records.append(r)
    (tmp_path / "speed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    speed.report(tmp_path, "cmd")
    ratio = speed.paired_ratio(times["torchao_fp8_rowwise"], times["segquant_fp8_static"])
    assert ratio["median"] == pytest.approx(9.0 / 8.0)  # the per-round ratios 8/7, 9/8, 8.8/8: median 1.125
    assert (f"| torchao_fp8_rowwise / segquant_fp8_static | {ratio['median']:.4f} [{ratio['lo']:.4f}, "
            f"{ratio['hi']:.4f}] | - | 3 |") in (tmp_path / "speed.md").read_text()
