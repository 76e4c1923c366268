"""The Triton GEMMs of segquant_torchao on the CPU: the kernels themselves under Triton's interpreter
(``TRITON_INTERPRET=1``, set here before the module is imported), the wrapper's shape and dtype handling,
the torch fallback, and whole quantized layers with ``kernel="fused"`` against segquant.numerics.
On the GPU the same kernels are checked by benchmarks/kernel_bench.py before it times them."""

import copy
import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")
if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 9):
    pytest.skip(f"triton {triton.__version__}: interpreters before 3.9 call int() on 1-element numpy arrays, which "
                "numpy 2 rejects; pip install 'triton>=3.9' for these CPU tests", allow_module_level=True)
pytest.importorskip("torchao")
pytest.importorskip("diffusers")

import segquant  # noqa: E402
from segquant import numerics as nx  # noqa: E402
from segquant_torchao import SegQuantConfig, quantize  # noqa: E402
from segquant_torchao import triton_gemm as tg  # noqa: E402
from segquant_torchao.kernels import pad_to  # noqa: E402
from test_torchao import RTOL, ATOL, Block, capture_inputs, check_layers, static_quantize, tiny  # noqa: E402

if not tg.interpreting():  # pragma: no cover - the module was imported before this file set the variable
    pytest.fail("segquant_torchao.triton_gemm was imported without TRITON_INTERPRET=1; run this file first "
                "or set TRITON_INTERPRET=1", pytrace=False)

SMALL = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}


def quantized_weight(n, k, precision, gen, pad_k=0):
    w = torch.randn(n, k, generator=gen)
    ws = nx.scale_from_amax(w.abs().amax(1, keepdim=True), precision)
    q = (w / ws).clamp(-448, 448).to(tg.FP8_DTYPE) if precision == "fp8" else \
        torch.round(w / ws).clamp(-128, 127).to(torch.int8)
    if pad_k:
        q = pad_to(q.view(torch.int8), 1, pad_k).view(q.dtype)
    return q, ws.reshape(-1), nx.fake_quant(w, ws, precision)


def gelu_input(m, k, gen):
    return torch.nn.functional.gelu(torch.randn(m, k, generator=gen) * 2)


@pytest.mark.parametrize("precision", ["fp8", "int8"])
@pytest.mark.parametrize("dual_range", [None, (0, 80), (17, 70)], ids=["plain", "all-K", "unaligned-range"])
@pytest.mark.parametrize("per_token", [True, False])
def test_gemm_kernel_matches_reference(precision, dual_range, per_token):
    """Odd M, K, N (no multiple of any block), a weight padded past K, bias in the epilogue."""
    gen = torch.Generator().manual_seed(0)
    m, k, n = 37, 80, 50
    x = gelu_input(m, k, gen)
    wq, ws, w_hat = quantized_weight(n, k, precision, gen, pad_k=96)
    bias = torch.randn(n, generator=gen)
    if dual_range is None:
        s = nx.scale_from_amax(x.abs().amax(-1, keepdim=True) if per_token else x.abs().amax(), precision)
        q = nx.quantize(x, s, precision)
        x_hat = q * s
        y = tg.scaled_gemm(q.to(wq.dtype), wq, s, ws, torch.float32, bias=bias, config=SMALL)
    else:
        lo, hi = dual_range
        q, sp, sn = nx.dual_scale_quantize(x[:, lo:hi], precision, per_token=per_token)
        # outside the range the sign selects nothing: those codes all read with s+
        outside = torch.cat([x[:, :lo], x[:, hi:]], -1)
        q_out = nx.quantize(outside, sp, precision)
        codes = torch.cat([q_out[:, :lo], q, q_out[:, lo:]], -1)
        x_hat = torch.cat([(q_out * sp)[:, :lo], nx.dual_scale_dequantize(q, sp, sn), (q_out * sp)[:, lo:]], -1)
        y = tg.dual_scale_gemm(codes.to(wq.dtype), wq, sp, sn, ws, torch.float32, bias=bias, dual_range=dual_range,
                               config=SMALL)
    expected = x_hat @ w_hat.t() + bias
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    if dual_range is not None:
        # a wrong negative scale is caught: the same codes read with s+ everywhere are far off
        wrong = tg.scaled_gemm(codes.to(wq.dtype), wq, sp, ws, torch.float32, bias=bias, config=SMALL)
        assert not torch.allclose(wrong, expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("precision", ["fp8", "int8"])
@pytest.mark.parametrize("per_token", [True, False])
def test_tma_loads_match_the_reference(precision, per_token, monkeypatch):
    """The plain GEMM through TMA descriptors (Hopper's path): odd M and N, K not a multiple of the tile, a weight
    padded past K (never loaded), bias in the epilogue."""
    monkeypatch.setenv("SEGQUANT_TRITON_LOADS", "tma")
    gen = torch.Generator().manual_seed(1)
    m, k, n = 37, 80, 50
    x = gelu_input(m, k, gen)
    wq, ws, w_hat = quantized_weight(n, k, precision, gen, pad_k=96)
    bias = torch.randn(n, generator=gen)
    s = nx.scale_from_amax(x.abs().amax(-1, keepdim=True) if per_token else x.abs().amax(), precision)
    q = nx.quantize(x, s, precision).to(wq.dtype)
    assert tg.loads_for(q, wq, dual=False) == "tma"
    y = tg.scaled_gemm(q, wq, s, ws, torch.float32, bias=bias, config=SMALL)
    torch.testing.assert_close(y, nx.quantize(x, s, precision) * s @ w_hat.t() + bias, rtol=1e-4, atol=1e-4)
    wrong = tg.scaled_gemm(q, wq, s * 1.01, ws, torch.float32, bias=bias, config=SMALL)  # a 1% wrong scale fails
    assert not torch.allclose(wrong, y, rtol=1e-3, atol=1e-3)


def test_loads_choice(monkeypatch):
    q = torch.zeros(8, 32, dtype=torch.int8)
    w = torch.zeros(16, 32, dtype=torch.int8)
    assert tg.loads_for(q, w, dual=False) == "pointer"  # auto: a CPU tensor
    monkeypatch.setenv("SEGQUANT_TRITON_LOADS", "tma")
    assert tg.loads_for(q, w, dual=False) == "tma"
    assert tg.loads_for(q, w, dual=True) == "pointer"  # DualScale keeps pointer loads
    assert tg.loads_for(torch.zeros(8, 24, dtype=torch.int8), torch.zeros(16, 24, dtype=torch.int8),
                        dual=False) == "pointer"  # 24-byte rows: TMA needs 16-byte aligned strides
    monkeypatch.setenv("SEGQUANT_TRITON_LOADS", "fast")
    with pytest.raises(ValueError, match="SEGQUANT_TRITON_LOADS must be auto, pointer or tma, got 'fast'"):
        tg.loads_for(q, w, dual=False)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_gemm_writes_out_dtype_and_autoselects_config(out_dtype):
    gen = torch.Generator().manual_seed(1)
    x = gelu_input(40, 64, gen)
    wq, ws, w_hat = quantized_weight(48, 64, "int8", gen)
    q, sp, sn = nx.dual_scale_quantize(x, "int8", per_token=True)
    y = tg.dual_scale_gemm(q.to(torch.int8), wq, sp, sn, ws, out_dtype)  # no config: the interpreter's default
    assert y.dtype == out_dtype and y.shape == (40, 48)
    expected = nx.dual_scale_dequantize(q, sp, sn) @ w_hat.t()
    torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=1e-2)


def test_torch_fallback_matches_reference():
    """What CPU tensors get without the interpreter (and CUDA ones without Triton)."""
    gen = torch.Generator().manual_seed(3)
    x = gelu_input(11, 48, gen)
    for precision in ("fp8", "int8"):
        wq, ws, w_hat = quantized_weight(20, 48, precision, gen, pad_k=64)
        q, sp, sn = nx.dual_scale_quantize(x, precision)
        y = tg._torch_gemm(q.to(wq.dtype), wq, sp.reshape(1), sn.reshape(1), ws, None, 0, 48, torch.float32)
        torch.testing.assert_close(y, nx.dual_scale_fake_quant(x, precision) @ w_hat.t(), rtol=1e-5, atol=1e-5)


def test_wrapper_rejects_bad_input():
    gen = torch.Generator().manual_seed(4)
    wq, ws, _ = quantized_weight(16, 32, "int8", gen)
    q = torch.zeros(8, 32, dtype=torch.int8)
    one = torch.ones(1)
    with pytest.raises(TypeError, match="codes of one dtype"):
        tg.scaled_gemm(q.float(), wq, one, ws, torch.float32)
    with pytest.raises(TypeError, match="codes of one dtype"):
        tg.scaled_gemm(q.view(tg.FP8_DTYPE), wq, one, ws, torch.float32)
    with pytest.raises(ValueError, match="2-D codes"):
        tg.scaled_gemm(q[None], wq, one, ws, torch.float32)
    with pytest.raises(ValueError, match="weight has K=16"):
        tg.scaled_gemm(q, wq[:, :16], one, ws, torch.float32)
    with pytest.raises(ValueError, match="1 or M=8 scales"):
        tg.scaled_gemm(q, wq, torch.ones(3), ws, torch.float32)
    with pytest.raises(ValueError, match="N=16 column scales"):
        tg.scaled_gemm(q, wq, one, ws[:4], torch.float32)
    with pytest.raises(ValueError, match=r"DualScale range \[4, 40\)"):
        tg.dual_scale_gemm(q, wq, one, one, ws, torch.float32, dual_range=(4, 40))
    with pytest.raises(TypeError, match="out_dtype"):
        tg.scaled_gemm(q, wq, one, ws, torch.int32)
    assert tg.scaled_gemm(q[:0], wq, one, ws, torch.float32).shape == (0, 16)


def count_launches(monkeypatch):
    calls = []
    launch = tg._launch_gemm

    def counting(*args, **kwargs):
        calls.append(args[7] > args[6])  # dual_hi > dual_lo: a DualScale GEMM
        return launch(*args, **kwargs)

    monkeypatch.setattr(tg, "_launch_gemm", counting)
    return calls


@pytest.mark.parametrize("precision", ["fp8", "int8"])
@pytest.mark.parametrize("mode", ["dynamic", "folded", "split_k"])
def test_fused_layers_match_reference(precision, mode, monkeypatch):
    model, kwargs, _ = tiny()
    # every layer through the kernels, the output projection too (the analysis keeps it in high precision)
    plan = segquant.analyze(model, analysis_options=segquant.AnalysisOptions(keep_output_layer=False), **kwargs)
    inputs = capture_inputs(model, kwargs)
    quantized = copy.deepcopy(model)
    calls = count_launches(monkeypatch)
    if mode == "dynamic":
        quantize(quantized, SegQuantConfig(plan, precision=precision, kernel="fused"))
        spec = nx.QuantSpec(weight_format=precision, weight_granularity="per_channel", act_format=precision,
                            act_granularity="per_token")
        check_layers(model, quantized, plan, inputs, spec)
    else:
        calibration = static_quantize(quantized, kwargs, plan, precision=precision, realisation=mode,
                                      weight_granularity="per_tensor", kernel="fused")
        spec = nx.QuantSpec(weight_format=precision, weight_granularity="per_tensor", act_format=precision,
                            realisation=mode)
        check_layers(model, quantized, plan, inputs, spec, calibration)
    duals = sum(p.dual_scale for p in plan.layers.values())
    assert sum(calls) >= duals > 0  # every DualScale layer went through the fused kernel
    if precision == "int8":
        assert len(calls) > sum(calls)  # and plain int8 GEMMs through the Triton int8 GEMM


def test_fused_compiles_fullgraph():
    torch.manual_seed(0)
    block = Block().eval()
    x, emb = torch.randn(2, 24, 32), torch.randn(2, 32)
    plan = segquant.analyze(block, x, emb)
    reference = copy.deepcopy(block)
    quantize(block, SegQuantConfig(plan, kernel="fused"))
    quantize(reference, SegQuantConfig(plan))
    with torch.inference_mode():
        eager = block(x, emb)
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(x, emb)
        naive = reference(x, emb)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(eager, naive, rtol=RTOL * 10, atol=ATOL * 10)  # same codes, other GEMM
