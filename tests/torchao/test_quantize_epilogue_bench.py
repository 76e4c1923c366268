"""benchmarks/quantize_epilogue_bench.py on the CPU: its cases compute what they name (the same codes whichever
scale form, as many code tensors as consumers) and it refuses to run without a GPU."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _benchmarks import load_benchmark

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bench(monkeypatch):
    module = load_benchmark("quantize_epilogue_bench")
    monkeypatch.setattr(module, "TOKENS", 8)
    monkeypatch.setattr(module, "HIDDEN", 32)
    monkeypatch.setattr(module, "MLP", 64)
    return module


def test_gelu_cases_give_the_same_codes_in_every_scale_form(bench):
    cases = bench.gelu_cases("cpu")
    outputs = {name: fn(*inputs) for name, (fn, inputs, _) in cases.items()}
    assert outputs["bf16 out"].dtype == torch.bfloat16
    codes = [out.float() for name, out in outputs.items() if name.startswith("fp8")]
    assert len(codes) == 4 and all(torch.equal(c, codes[0]) for c in codes)  # 0.05 and 1 / 0.05 = 20: exact
    gelu = torch.nn.functional.gelu(cases["bf16 out"][1][0], approximate="tanh").float()
    torch.testing.assert_close(codes[0] * 0.05, gelu.clamp(-22.4, 22.4), rtol=0.07, atol=0.01)


def test_norm_cases_write_one_code_tensor_per_consumer_or_one_shared(bench):
    for name, (fn, inputs, moved) in bench.norm_cases("cpu").items():
        out = fn(*inputs)
        if "one per consumer" in name:
            assert len(out) == bench.CONSUMERS and all(torch.equal(o.float(), out[0].float()) for o in out)
            assert moved == 8 * 32 * (2 + bench.CONSUMERS)
        elif "shared" in name:
            assert out.shape == (8, 32) and moved == 8 * 32 * 3


def test_refuses_to_run_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the script would run")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quantize_epilogue_bench.py"), "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "needs a CUDA device" in proc.stderr
