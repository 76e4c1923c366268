"""segquant_torchao.int8_attention: the INT8 Q K^T flash-attention kernel on Triton's CPU interpreter against the
reference numerics (segquant.attention), the float fallback, and bad input. Each numeric check runs in a fresh
interpreter so that TRITON_INTERPRET is set (or not) before triton is imported."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _benchmarks import load_benchmark

ROOT = Path(__file__).resolve().parents[2]

CHECK = """
import math, sys, torch
import segquant_torchao.int8_attention as ia
from segquant.attention import fp8_attention
sq = lambda r, x: 10 * math.log10(r.pow(2).mean() / (x - r).pow(2).mean())
g = torch.Generator().manual_seed(0)
for b, h, s_q, s_k, d in [(2, 3, 100, 90, 32), (1, 2, 64, 130, 16)]:
    q, k, v = (torch.randn(b, h, s, d, generator=g) for s in (s_q, s_k, s_k))
    k = k + 2  # an offset the centring removes
    ref = fp8_attention(q, k, v, ia.REFERENCE_SPEC, layout="bhsd")
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    for tiles in TILES:  # tiles wider than one scale block read each row's and key's own block scale
        out = ia.int8_attention(q, k, v, tiles=tiles)
        print(ia._kernel_usable(q), round(sq(ref, out), 1), round(sq(exact, out), 1), out.shape == q.shape)
"""


def _run(code: str, interpret: bool, tiles: str = "[None]") -> list[str]:
    code = f"TILES = {tiles}\n" + code
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [line.split() for line in proc.stdout.splitlines()]


def test_kernel_matches_the_reference_numerics():
    pytest.importorskip("triton")
    lines = _run(CHECK, interpret=True, tiles="[None, (128, 64), (64, 128), (128, 128)]")
    assert len(lines) == 8
    for usable, vs_ref, vs_exact, shape_ok in lines:
        assert usable == "True" and shape_ok == "True"
        assert float(vs_ref) > 55  # only P and V in fp16 differ from the reference
        assert 30 < float(vs_exact) < 50  # INT8 Q K^T: close to exact attention, not equal


def test_a_wrong_key_scale_is_caught():
    pytest.importorskip("triton")
    call = "out = ia.int8_attention(q, k, v, tiles=tiles)"
    assert call in CHECK
    code = CHECK.replace(call, """original = ia.quantize_per_block
        ia.quantize_per_block = lambda x, block=64: (lambda c, s: (c, s * 1.1))(*original(x, block))
        out = ia.int8_attention(q, k, v, tiles=tiles)
        ia.quantize_per_block = original""")
    lines = _run(code, interpret=True, tiles="[None, (128, 128)]")
    assert len(lines) == 4
    for _, vs_ref, _, _ in lines:
        assert float(vs_ref) < 40  # a 10% wrong scale sharpens the softmax: far outside fp16 rounding


def test_without_triton_on_the_cpu_it_is_the_reference():
    for usable, vs_ref, _, shape_ok in _run(CHECK.replace("round(sq(ref, out), 1)", "torch.equal(ref, out)"),
                                            interpret=False):
        assert usable == "False" and vs_ref == "True" and shape_ok == "True"


@pytest.mark.parametrize("shapes, message", [
    (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 9, 16)), "takes \\(B, H, S, D\\)"),
    (((1, 2, 8, 16), (1, 3, 8, 16), (1, 3, 8, 16)), "takes \\(B, H, S, D\\)"),
    (((2, 8, 16), (2, 8, 16), (2, 8, 16)), "takes \\(B, H, S, D\\)"),
    (((1, 2, 8, 24), (1, 2, 8, 24), (1, 2, 8, 24)), "power of two from 16 to 256, got 24"),
    (((1, 1, 8, 512), (1, 1, 8, 512), (1, 1, 8, 512)), "power of two from 16 to 256, got 512"),
    (((1, 1, 8, 16), (1, 1, 8, 16), (1, 1, 8, 16), (32, 64)), "tiles must be one of"),
])
def test_bad_input(shapes, message):
    from segquant import SegQuantError
    from segquant_torchao.int8_attention import int8_attention

    tensors, tiles = (shapes, None) if len(shapes) == 3 else (shapes[:3], shapes[3])
    with pytest.raises(SegQuantError, match=message):
        int8_attention(*(torch.zeros(s) for s in tensors), tiles=tiles)


def test_attention_bench_helpers_and_cpu_refusal(tmp_path):
    bench = load_benchmark("attention_bench")
    assert bench.attention_tflops(1, 24, 4608, 128, 1.0) == pytest.approx(4 * 24 * 4608 ** 2 * 128 / 1e9)
    assert bench.sqnr_db(torch.ones(4), torch.ones(4) * 1.1) == pytest.approx(20.0)
    assert bench.config_text(None) == "-"
    assert bench.config_text(dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)) == "BLOCK_M=128 BLOCK_N=64 w8 s3"
    if not torch.cuda.is_available():
        from segquant_torchao.int8_attention import tuned_config

        assert tuned_config() is None  # nothing has been autotuned on a machine without CUDA
    if not torch.cuda.is_available():
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "attention_bench.py"), "--out",
                               str(tmp_path)], capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0 and "needs a CUDA device" in proc.stderr
