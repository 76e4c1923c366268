"""The row scales of ones that folded layers' GEMMs take (``kernels.cached_ones``): one buffer cached per device,
read only inside the custom ops that run the GEMM (so a compiled graph neither fills a new tensor before every GEMM
nor can write into the buffer), and the compile cache keyed on the code that computes a SegQuant layer."""

import pytest
import torch
from torch import nn
from torch._inductor.utils import run_and_get_code

import segquant
from segquant_torchao import SegQuantConfig, calibration_from, quantize
from segquant_torchao import kernels, tensor
from segquant_torchao.triton_gemm import scaled_gemm


def test_cached_ones_are_views_of_one_buffer_and_outgrown_buffers_stay(monkeypatch):
    monkeypatch.setattr(kernels, "_UNIT_ROWS", {})
    monkeypatch.setattr(kernels, "UNIT_ROWS", 8)
    cpu = torch.device("cpu")
    a, b = kernels.cached_ones(5, cpu), kernels.cached_ones(2, cpu)
    assert a.shape == (5, 1) and a.dtype == torch.float32 and torch.equal(a, torch.ones(5, 1))
    assert a.data_ptr() == b.data_ptr() and a.is_contiguous()
    big = kernels.cached_ones(20, cpu)  # past the buffer: a longer one, the first kept (graphs may read it)
    assert big.shape == (20, 1) and torch.equal(big, torch.ones(20, 1))
    assert [t.shape[0] for t in kernels._UNIT_ROWS["cpu"]] == [8, 20]
    assert kernels.cached_ones(0, cpu).shape == (0, 1)


def codes_and_scales(seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = (torch.randn(6, 32, generator=gen) * 20).to(torch.float8_e4m3fn)
    w = (torch.randn(16, 32, generator=gen) * 20).to(torch.float8_e4m3fn)
    return a, w, torch.rand(1, 16, generator=gen) + 0.5, torch.randn(16, generator=gen)


def test_scaled_mm_without_row_scales_equals_ones():
    a, w, ws, bias = codes_and_scales()
    explicit = kernels.scaled_mm(a, w, torch.ones(6, 1), ws, torch.float32, bias)
    torch.testing.assert_close(kernels.scaled_mm(a, w, None, ws, torch.float32, bias), explicit, rtol=0, atol=0)
    one = torch.ones(1, 1) * 0.25  # one weight scale: the tensorwise GEMM, with a scalar one for the rows
    torch.testing.assert_close(kernels.scaled_mm(a, w, None, one, torch.float32),
                               kernels.scaled_mm(a, w, torch.ones(1, 1), one, torch.float32), rtol=0, atol=0)
    a8, w8 = a.float().round().clamp(-127, 127).to(torch.int8), w.float().round().clamp(-127, 127).to(torch.int8)
    torch.testing.assert_close(kernels.scaled_mm(a8, w8, None, ws, torch.float32, bias),
                               kernels.scaled_mm(a8, w8, torch.ones(6, 1), ws, torch.float32, bias), rtol=0, atol=0)


def test_triton_gemm_without_row_scales_equals_ones():
    a, w, ws, bias = codes_and_scales(1)
    for codes_a, codes_w in ((a, w), (a.float().round().clamp(-127, 127).to(torch.int8),
                                      w.float().round().clamp(-127, 127).to(torch.int8))):
        ones = torch.ones(6)
        torch.testing.assert_close(scaled_gemm(codes_a, codes_w, None, ws, torch.float32, bias=bias),
                                   scaled_gemm(codes_a, codes_w, ones, ws, torch.float32, bias=bias), rtol=0, atol=0)
        s_neg = torch.full((1,), 0.5)  # DualScale: the negative codes of K columns 8..24 scaled by s- / s+
        torch.testing.assert_close(
            scaled_gemm(codes_a, codes_w, None, ws, torch.float32, s_neg=s_neg, dual_range=(8, 24)),
            scaled_gemm(codes_a, codes_w, ones, ws, torch.float32, s_neg=s_neg, dual_range=(8, 24)), rtol=0, atol=0)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.up, self.gate, self.down = nn.LayerNorm(32), nn.Linear(32, 64), nn.Linear(32, 64), \
            nn.Linear(64, 32)

    def forward(self, x):
        h = self.norm(x)
        return self.down(nn.functional.gelu(self.up(h)) * self.gate(h))


def folded_block() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model, x = Block(), torch.randn(48, 32)
    plan = segquant.analyze(model, x)
    common = dict(precision="fp8", realisation="folded")
    quantize(model, SegQuantConfig(plan, activation="static", step="prepare", **common))
    with torch.inference_mode():
        model(x)
    quantize(model, SegQuantConfig(plan, activation="static", step="convert", calibration=calibration_from(model),
                                   **common))
    return model, x


def test_compiled_folded_layers_run_their_gemm_with_the_cached_rows():
    model, x = folded_block()
    with torch.inference_mode():
        eager = model(x)
        torch._dynamo.reset()
        compiled, codes = run_and_get_code(torch.compile(model, fullgraph=True), x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    source = "\n".join(codes)
    folded = [m for m in model.modules() if isinstance(getattr(m, "weight", None), tensor.SegQuantTensor)]
    assert len(folded) == 2  # up and gate (the output layer stays in high precision)
    assert source.count("torch.ops.segquant.scaled_mm_unit_rows.default(") == len(folded)
    assert "_scaled_mm(" not in source.replace("scaled_mm_unit_rows", "")  # no GEMM outside the op: no fill
    assert all(torch.equal(t, torch.ones_like(t)) for t in kernels._UNIT_ROWS["cpu"])  # never written into


def test_compile_cache_key_holds_the_forward_code(monkeypatch):
    model, _ = folded_block()
    weight = model.up.weight
    before = weight._stable_hash_for_caching()
    monkeypatch.setattr(tensor, "FORWARD_DIGEST", "another version of forward.py")
    assert weight._stable_hash_for_caching() != before
    assert len(tensor.FORWARD_DIGEST) > 0 and tensor._forward_digest() != "another version of forward.py"
    with monkeypatch.context() as patch:  # sources not on disk: the installed version keys the cache instead
        patch.setattr(tensor.Path, "read_bytes", lambda self: (_ for _ in ()).throw(OSError("zipped")))
        assert len(tensor._forward_digest()) == 16


@pytest.mark.parametrize("m", [0, 1])
def test_folded_layers_at_the_edges(m):
    model, _ = folded_block()
    with torch.inference_mode():
        assert model.up(torch.zeros(m, 32)).shape == (m, 64)
