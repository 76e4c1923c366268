"""segquant_torchao.fa3_attention: the quantization around FlashAttention-3's e4m3 kernel (the reference's per-head
codes and scales), the custom op that calls it (eager and under torch.compile) and its errors. The kernel itself
runs on Hopper only; here a stand-in registered as ``flash_attn_3::fwd`` computes what it computes, without the
rounding of the probabilities, in float32 (attention_bench.md times and measures the real kernel)."""

import sys

import pytest
import torch

from segquant.attention import FP8AttentionSpec, _fake, fp8_attention
from segquant.errors import SegQuantError
from segquant_torchao import fa3_attention
from segquant_torchao.fa3_attention import fa3_fp8_attention, fp8_codes, load_fa3


@pytest.fixture
def stand_in():
    """``flash_attn_3::fwd`` on the CPU: attention of the dequantized codes; records what it was given."""
    calls = []
    lib = torch.library.Library("flash_attn_3", "DEF")
    lib.define("fwd(Tensor q, Tensor k, Tensor v, *, Tensor? q_descale=None, Tensor? k_descale=None, "
               "Tensor? v_descale=None, float? softmax_scale=None, int num_splits=0, bool? pack_gqa=None) "
               "-> (Tensor, Tensor, Tensor, Tensor)")

    def fwd(q, k, v, *, q_descale=None, k_descale=None, v_descale=None, softmax_scale=None, num_splits=0,
            pack_gqa=None):
        calls.append(dict(dtypes=(q.dtype, k.dtype, v.dtype), scale_shape=tuple(q_descale.shape),
                          softmax_scale=softmax_scale))
        q, k, v = (t.float() * s[:, None, :, None] for t, s in ((q, q_descale), (k, k_descale), (v, v_descale)))
        p = (torch.einsum("bqhd,bkhd->bhqk", q, k) * softmax_scale).softmax(-1)
        out = torch.einsum("bhqk,bkhd->bqhd", p, v).bfloat16().contiguous()  # as the kernel allocates it
        return out, torch.empty(0), torch.empty(0), torch.empty(0)

    lib.impl("fwd", fwd, "CPU")
    yield calls
    lib._destroy()


def _qkv(offset=3.0, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 40, 3, 16, generator=g)
    k = torch.randn(2, 48, 3, 16, generator=g) + offset * torch.randn(1, 1, 3, 16, generator=g)
    v = torch.randn(2, 48, 3, 16, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _sqnr(ref, got):
    return float(10 * torch.log10(ref.float().pow(2).mean() / (got.float() - ref.float()).pow(2).mean()))


@pytest.mark.parametrize("centre", [False, True])
def test_codes_times_scales_are_the_references_per_head_values(centre):
    _, k, _ = _qkv()
    codes, scale = fp8_codes(k, centre=centre)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (2, 3) and scale.dtype == torch.float32
    x = k.float().transpose(1, 2)  # the reference works in (B, H, S, D)
    if centre:
        x = x - x.mean(dim=2, keepdim=True)
    expected = _fake(x, "fp8", "per_head", 64).transpose(1, 2)
    assert torch.equal(codes.float() * scale[:, None, :, None], expected)
    assert codes.float().abs().amax(dim=(1, 3)).eq(448).all()  # every head's largest value on e4m3's largest code


def test_the_kernel_gets_codes_and_scales_and_matches_the_reference(stand_in):
    q, k, v = _qkv()
    out = fa3_fp8_attention(q, k, v)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    call = stand_in[0]
    assert call["dtypes"] == (torch.float8_e4m3fn,) * 3 and call["scale_shape"] == (2, 3)
    assert call["softmax_scale"] == pytest.approx(16 ** -0.5)
    # the stand-in leaves P in float: the reference without P's rounding, up to bf16's output rounding
    reference = fp8_attention(q, k, v, FP8AttentionSpec(quantize_p=False))
    uncentred = fp8_attention(q, k, v, FP8AttentionSpec(quantize_p=False, center_k=False))
    assert _sqnr(reference, out) > 45 > _sqnr(reference, uncentred)  # K's centring is there
    assert fa3_fp8_attention(q, k, v, scale=0.5).shape == q.shape and stand_in[-1]["softmax_scale"] == 0.5


def test_compiled_it_equals_eager(stand_in):
    q, k, v = _qkv()

    def attend(q, k, v):
        return fa3_fp8_attention(q * 2, k, v)  # exact in bf16 and in float32

    eager = attend(q, k, v)
    compiled = torch.compile(attend, fullgraph=True, backend="inductor")(q, k, v)
    reference = fp8_attention(q * 2, k, v, FP8AttentionSpec(quantize_p=False))
    assert compiled.dtype == torch.bfloat16 and _sqnr(reference, compiled) > 45 and _sqnr(eager, compiled) > 45
    assert len(stand_in) == 2  # the kernel ran in both


@pytest.mark.parametrize("args,message", [
    ((torch.zeros(2, 4, 16), torch.zeros(2, 4, 16), torch.zeros(2, 4, 16)), "takes \\(B, S, H, D\\)"),
    ((torch.zeros(1, 4, 2, 16), torch.zeros(1, 4, 3, 16), torch.zeros(1, 4, 3, 16)), "do not fit"),
    ((torch.zeros(1, 4, 2, 16), torch.zeros(1, 4, 2, 16), torch.zeros(1, 5, 2, 16)), "do not fit"),
    ((torch.zeros(1, 4, 2, 16), torch.zeros(1, 4, 2, 16), torch.zeros(1, 4, 2, 16)), "bf16 or fp16"),
])
def test_bad_inputs_are_refused(args, message):
    with pytest.raises(SegQuantError, match=message):
        fa3_fp8_attention(*args)


def test_load_refuses_a_missing_library_and_a_missing_install(tmp_path, monkeypatch):
    with pytest.raises(SegQuantError, match="no FlashAttention-3 library at"):
        load_fa3(tmp_path / "_C.so")
    monkeypatch.setattr(fa3_attention, "fa3_loaded", lambda: False)
    monkeypatch.setitem(sys.modules, "flash_attn_3", None)  # import flash_attn_3 raises ImportError
    with pytest.raises(SegQuantError, match="flash_attn_3\\) is not installed"):
        load_fa3()


def test_load_accepts_registered_operators(stand_in):
    assert fa3_attention.fa3_loaded()
    load_fa3()  # already registered (an import or a loaded library did it): nothing to do


def test_build_script_refuses_missing_sources(tmp_path):
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "fa3_build.py"
    proc = subprocess.run([sys.executable, str(script), "--hopper", str(tmp_path), "--cutlass", str(tmp_path / "no"),
                           "--out", str(tmp_path / "build")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "no CUTLASS include folder or archive" in proc.stderr
