"""The Triton kernels compile for Hopper (sm_90) without a GPU, through Triton's real compiler: every
autotune config of the GEMM kernel (fp8/int8 x DualScale/plain), with the
16-byte divisibility Triton's JIT infers for torch's allocations. Each must use wgmma, be software-pipelined
(cp.async) and not spill. Runs in a subprocess: test_triton_kernels.py switches on the interpreter."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("torchao")

SCRIPT = r'''
import itertools
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from segquant_torchao import triton_gemm as tg

target = GPUTarget("cuda", 90, 32)
ints = ["M", "N", "K", "stride_am", "stride_wn", "stride_om", "stride_sp", "stride_sn", "dual_lo", "dual_hi"]
count = 0
for is_fp8, dual in itertools.product((True, False), (True, False)):
    code = "*fp8e4nv" if is_fp8 else "*i8"
    sig = dict(a_ptr=code, w_ptr=code, out_ptr="*bf16", sp_ptr="*fp32", sn_ptr="*fp32", ws_ptr="*fp32",
               bias_ptr="*bf16", **{n: "i32" for n in ints})
    aligned = [i for i, n in enumerate(sig) if n not in ("stride_sp", "stride_sn", "dual_lo", "dual_hi")]
    for cfg in tg._configs(dual):
        consts = dict(IS_FP8=is_fp8, DUAL=dual, HAS_BIAS=True, **cfg.kwargs)
        src = ASTSource(fn=tg._scaled_gemm_kernel, signature=dict(sig, **{k: "constexpr" for k in consts}),
                        constexprs=consts, attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
        k = triton.compile(src, target=target, options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        ptx = k.asm["ptx"]
        what = f"fp8={is_fp8} dual={dual} {cfg}"
        assert "wgmma.mma_async" in ptx, f"{what}: no wgmma"
        assert "cp.async" in ptx, f"{what}: loads not pipelined"
        assert ".local" not in ptx, f"{what}: register spills"
        assert k.metadata.shared <= 227 * 1024, f"{what}: {k.metadata.shared} B of shared memory"
        count += 1
print(f"compiled {count} GEMM kernels")
'''


def test_kernels_compile_for_hopper():
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "compiled 18 GEMM kernels" in result.stdout
