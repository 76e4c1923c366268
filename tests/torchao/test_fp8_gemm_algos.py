"""benchmarks/fp8_gemm_algos.py on the CPU: its operands and float reference agree, the per-call totals weight each
shape by its count and compare methods only on the shapes both timed, the report names the fastest algorithm, and
the script refuses to run without a GPU."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _benchmarks import load_benchmark

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bench():
    return load_benchmark("fp8_gemm_algos")


def test_operands_hold_e4m3_codes_whose_product_is_the_reference(bench):
    o = bench.operands(16, 32, 8, device="cpu")
    assert o["a8"].dtype == o["w8"].dtype == torch.float8_e4m3fn
    y = (o["a8"].float() * o["sa"]) @ (o["w8"].float() * o["sw"][:, None]).t() + o["bias"].float()
    assert bench.rel_error(y, o["ref"]) < 1e-6
    assert bench.rel_error(y * 1.1, o["ref"]) > bench.TOL  # a 10% wrong scale fails the check


def rows_for(bench, method: str, ms: float, shapes=None) -> list[dict]:
    return [dict(shape=list(s), count=c, method=method, ms=ms, err=0.0)
            for s, c in bench.FLUX_SHAPES.items() if shapes is None or s in shapes]


def test_per_call_weights_shapes_by_count_and_compares_on_common_shapes(bench):
    big = next(iter(bench.FLUX_SHAPES))
    rows = rows_for(bench, "torch rowwise", 0.2) + rows_for(bench, "inductor max-autotune", 0.1, shapes={big})
    totals = bench.per_call(rows)
    calls = sum(bench.FLUX_SHAPES.values())
    assert totals["torch rowwise"]["ms"] == pytest.approx(0.2 * calls)
    assert totals["inductor max-autotune"]["ms"] is None  # one shape only: no per-call total
    assert totals["inductor max-autotune"]["ratio"] == pytest.approx(2.0)  # on the one shape both timed
    assert totals["inductor max-autotune"]["share"] == pytest.approx(bench.FLUX_SHAPES[big] / calls)


def test_report_names_the_fastest_algorithm_and_failures(bench, tmp_path):
    rows = rows_for(bench, "torch rowwise", 0.2)
    rows += [dict(r, method="cuBLASLt best", ms=0.18, algo=dict(rank=3, tile="(192, 128)", stages="(128, 'AUTO')",
                                                                cluster="(1, 2, 1)", split_k=1), algorithms=8)
             for r in rows_for(bench, "x", 0.0)]
    rows.append(dict(shape=list(next(iter(bench.FLUX_SHAPES))), count=1, method="torch tensorwise", ms=None,
                     error="RuntimeError: no kernel"))
    rows.append(dict(shape=list(list(bench.FLUX_SHAPES)[1]), count=1, method="torch tensorwise", ms=None, err=0.05))
    bench.write_report(dict(device="GPU", torch="t", triton="tr", git="g", command="c", rows=rows), tmp_path)
    text = (tmp_path / "fp8_gemm_algos.md").read_text()
    assert "#3 of 8: (192, 128)" in text and "failed: RuntimeError: no kernel" in text
    assert "failed: error 0.05 > 0.02" in text  # rejected by the reference check: the error is shown
    assert "| cuBLASLt best | " in text and "1.111" in text  # 0.2 / 0.18


def test_refuses_to_run_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the script would run")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fp8_gemm_algos.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "needs a CUDA device" in proc.stderr
