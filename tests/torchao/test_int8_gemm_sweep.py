"""benchmarks/int8_gemm_sweep.py on the CPU: the per-call weighting, the best-config pick, the report, and the TMA
kernels' numbers on Triton's interpreter (the timings themselves come from the device:
benchmarks/results/int8_gemm_sweep.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _benchmarks import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "int8_gemm_sweep.py"


def test_per_call_weights_each_shape_by_its_count():
    sweep = load_benchmark("int8_gemm_sweep")
    times = {shape: 1.0 for shape in sweep.FLUX_SHAPES}
    assert sweep.per_call_ms(times) == sum(sweep.FLUX_SHAPES.values())  # 19 double + 38 single blocks' GEMMs
    assert sum(sweep.FLUX_SHAPES.values()) == 19 * 12 + 38 * 5
    times[(512, 3072, 3072)] = None
    assert sweep.per_call_ms(times) is None


def test_best_per_shape_skips_failed_and_unchecked_rows():
    sweep = load_benchmark("int8_gemm_sweep")
    rows = [dict(shape=[1, 2, 3], method="tma", config="a", ms=0.5, ok=True),
            dict(shape=[1, 2, 3], method="tma", config="b", ms=0.1, ok=False),
            dict(shape=[1, 2, 3], method="tma", config="c", ms=None, ok=False, error="boom"),
            dict(shape=[1, 2, 3], method="tma", config="d", ms=0.4, ok=True),
            dict(shape=[1, 2, 3], method="pointer", config="e", ms=0.01, ok=True)]
    assert sweep.best_per_shape([r for r in rows if r["method"] == "tma"], "tma")[(1, 2, 3)]["config"] == "d"


def test_report_totals_and_notes(tmp_path):
    sweep = load_benchmark("int8_gemm_sweep")
    rows = []
    for shape in sweep.FLUX_SHAPES:
        for method, ms in (("bf16", 2.0), ("fp8_cublas", 1.0), ("tma", 1.25)):
            rows.append(dict(shape=list(shape), method=method, config="", ms=ms, ok=True))
    rows.append(dict(shape=[4096, 3072, 3072], method="tma_ws", config="x", ms=None, ok=False, error="Hang: no"))
    (tmp_path / "int8_gemm_sweep.json").write_text(json.dumps(dict(
        device="GPU", torch="t", triton="3", git="g", command="c", rep_ms=1, rows=rows, notes=["A note."])))
    sweep.report(tmp_path)
    md = (tmp_path / "int8_gemm_sweep.md").read_text()
    n = sum(sweep.FLUX_SHAPES.values())
    assert f"| tma, best config per shape | {1.25 * n:.2f} | 1.600 | 0.800 |" in md
    assert "| tma_ws, best config per shape | missing |" in md and "A note." in md and "tma_ws: `Hang: no`" in md


def test_tma_kernels_match_the_reference_on_the_interpreter():
    pytest.importorskip("triton")
    code = """
import torch, triton
import int8_gemm_sweep as s
from triton.tools.tensor_descriptor import TensorDescriptor
m, k, n = 64, 96, 96
g = torch.Generator().manual_seed(0)
a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
sa, sw = torch.rand(m) * 1e-3 + 1e-4, torch.rand(n) * 1e-3 + 1e-4
ref = (a.double() @ w.double().t()) * sa[:, None].double() * sw[None, :].double()
for persistent in (False, True):
    out = torch.empty(m, n, dtype=torch.bfloat16)
    ad, wd = TensorDescriptor.from_tensor(a, [32, 32]), TensorDescriptor.from_tensor(w, [32, 32])
    if persistent:
        s.tma_persistent_kernel[(4,)](ad, wd, out, sa, sw, m, n, k, out.stride(0), 1, BLOCK_M=32, BLOCK_N=32,
                                      BLOCK_K=32, GROUP_M=2, NUM_SMS=4)
    else:
        s.tma_kernel[(6,)](ad, wd, out, sa, sw, m, n, k, out.stride(0), 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32,
                           GROUP_M=2)
    print(((out.double() - ref).abs().max() / ref.abs().max()).item())
"""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT / "benchmarks"))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    errors = [float(v) for v in proc.stdout.split()]
    assert len(errors) == 2 and all(e < 8e-3 for e in errors), errors  # bf16 output rounding, exact int32 sums
