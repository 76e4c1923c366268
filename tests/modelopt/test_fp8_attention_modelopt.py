"""``segquant_modelopt.with_fp8_attention``: ModelOpt's attention quantizers (Q, K, V and the softmax output) in FP8,
max-calibrated by SegQuant's calibration loop, on a tiny FLUX; the Linear layers are quantized exactly as without
it."""

import copy

import pytest
import torch

mtq = pytest.importorskip("modelopt.torch.quantization")
pytest.importorskip("diffusers")

import segquant_modelopt as sm  # noqa: E402
from segquant import SegQuantError  # noqa: E402
from segquant.numerics import sqnr_db  # noqa: E402
from _models import build_tiny, seeded_batches  # noqa: E402

ATTENTION_QUANTIZERS = ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer", "softmax_quantizer")


@pytest.fixture(scope="module")
def tiny_flux():
    model = build_tiny("FluxTransformer2DModel")
    return model, seeded_batches(model, 3, first_seed=100)


def quantized(model, data, cfg):
    return mtq.quantize(copy.deepcopy(model), cfg, lambda m: [m(**batch) for batch in data])


def attention_modules(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, "q_bmm_quantizer")}


def test_attention_is_quantized_in_fp8_and_the_linears_as_before(tiny_flux):
    model, data = tiny_flux
    plain_cfg = sm.with_segquant(sm.SEGQUANT_FP8_CFG, show_progress=False)
    plain = quantized(model, data, plain_cfg)
    fp8 = quantized(model, data, sm.with_fp8_attention(plain_cfg))
    modules = attention_modules(fp8)
    assert modules, "ModelOpt's diffusers plugin converted no attention module"
    for name, module in modules.items():
        for q in ATTENTION_QUANTIZERS:
            quantizer = getattr(module, q)
            assert quantizer.is_enabled and quantizer.num_bits == (4, 3), f"{name}.{q}"
            if q != "softmax_quantizer":  # ModelOpt's SDPA path leaves P to TensorRT's fused FP8 attention
                assert quantizer.amax is not None and torch.isfinite(quantizer.amax).all() and quantizer.amax > 0
        assert not any(getattr(attention_modules(plain)[name], q).is_enabled for q in ATTENTION_QUANTIZERS)
    # calibration sees float attention either way: every Linear gets the same plan and the same scales
    assert sm.plan_of(fp8) == sm.plan_of(plain)
    plain_linears = dict(plain.named_modules())
    for name, module in fp8.named_modules():
        if isinstance(module, torch.nn.Linear) and module.input_quantizer.is_enabled:
            other = plain_linears[name]
            for q in ("input_quantizer", "weight_quantizer"):
                assert torch.equal(getattr(module, q).amax, getattr(other, q).amax), f"{name}.{q}"
    with torch.no_grad():
        reference = model(**data[0])[0]
        out_plain, out_fp8 = plain(**data[0])[0], fp8(**data[0])[0]
    assert not torch.equal(out_plain, out_fp8)  # the attention quantizers did quantize
    assert sqnr_db(reference, out_fp8) > 15 and sqnr_db(reference, out_fp8) < sqnr_db(reference, out_plain) + 1


def test_with_segquant_keeps_the_attention_rules_in_either_order():
    once = sm.with_fp8_attention(sm.SEGQUANT_FP8_CFG)
    again = sm.with_segquant(once, show_progress=False)
    names = [e["quantizer_name"] for e in again["quant_cfg"]]
    assert "*[qkv]_bmm_quantizer" in names and "*softmax_quantizer" in names
    assert [e for e in once["quant_cfg"] if e not in sm.SEGQUANT_FP8_CFG["quant_cfg"]] == sm.configs.FP8_ATTENTION
    assert sm.SEGQUANT_FP8_CFG["quant_cfg"][-1] not in sm.configs.FP8_ATTENTION  # the constant is left as it was


@pytest.mark.parametrize("bad", [None, {"quant_cfg": {}}, [1, 2]])
def test_bad_input(bad):
    with pytest.raises(SegQuantError, match="with_fp8_attention expects a ModelOpt config in list form"):
        sm.with_fp8_attention(bad)
