"""The row scales of ones that folded layers hand the GEMM (``kernels.unit_rows``): one cached buffer per device
behind a custom op, so that a compiled graph reads it instead of filling a new tensor before every GEMM, and the
compile cache keys on the code that computes a SegQuant layer."""

import pytest
import torch
from torch import nn
from torch._inductor.utils import run_and_get_code

import segquant
from segquant_torchao import SegQuantConfig, calibration_from, quantize
from segquant_torchao import kernels, tensor


def test_unit_rows_are_views_of_one_cached_buffer(monkeypatch):
    monkeypatch.setattr(kernels, "_UNIT_ROWS", {})
    monkeypatch.setattr(kernels, "UNIT_ROWS", 8)
    like = torch.zeros(3, dtype=torch.float8_e4m3fn)
    a, b = kernels.unit_rows(5, like), kernels.unit_rows(2, like)
    assert a.shape == (5, 1) and a.dtype == torch.float32 and torch.equal(a, torch.ones(5, 1))
    assert a.data_ptr() == b.data_ptr() and a.is_contiguous()
    big = kernels.unit_rows(20, like)  # past the buffer: a longer one replaces it
    assert big.shape == (20, 1) and torch.equal(big, torch.ones(20, 1))
    assert kernels._UNIT_ROWS["cpu"].shape == (20, 1)


def test_scaled_mm_without_row_scales_equals_ones():
    gen = torch.Generator().manual_seed(0)
    a = (torch.randn(6, 32, generator=gen) * 20).to(torch.float8_e4m3fn)
    w = (torch.randn(16, 32, generator=gen) * 20).to(torch.float8_e4m3fn)
    ws = torch.rand(1, 16, generator=gen) + 0.5
    bias = torch.randn(16, generator=gen)
    explicit = kernels.scaled_mm(a, w, torch.ones(6, 1), ws, torch.float32, bias)
    torch.testing.assert_close(kernels.scaled_mm(a, w, None, ws, torch.float32, bias), explicit, rtol=0, atol=0)
    one = torch.ones(1, 1) * 0.25  # one weight scale: the tensorwise GEMM, with a scalar one for the rows
    torch.testing.assert_close(kernels.scaled_mm(a, w, None, one, torch.float32),
                               kernels.scaled_mm(a, w, torch.ones(1, 1), one, torch.float32), rtol=0, atol=0)


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


def test_compiled_folded_layers_read_the_cached_rows():
    model, x = folded_block()
    with torch.inference_mode():
        eager = model(x)
        torch._dynamo.reset()
        compiled, codes = run_and_get_code(torch.compile(model, fullgraph=True), x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    source = "\n".join(codes)
    folded = [m for m in model.modules() if isinstance(getattr(m, "weight", None), tensor.SegQuantTensor)]
    assert len(folded) == 2  # up and gate (the output layer stays in high precision)
    assert source.count("torch.ops.segquant.unit_rows.default(") == len(folded)  # read, not filled, per GEMM


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
def test_unit_rows_at_the_edges(m):
    rows = kernels.unit_rows(m, torch.zeros(1))
    assert rows.shape == (m, 1)
