"""segquant.attention: the FP8 attention reference numerics and the scope that puts them into a diffusers model."""

import math

import pytest
import torch
import torch.nn.functional as F

import segquant
from segquant.attention import FP8AttentionSpec, fp8_attention, fp8_attention_scope
from segquant.errors import SegQuantError
from _models import build_tiny


def _sqnr(ref: torch.Tensor, got: torch.Tensor) -> float:
    return 10 * math.log10(ref.pow(2).mean().item() / (got - ref).pow(2).mean().item())


def _qkv(offset: float = 0.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 40, 3, 16, generator=g)
    k = torch.randn(2, 48, 3, 16, generator=g) + offset
    v = torch.randn(2, 48, 3, 16, generator=g)
    return q, k, v


def _exact(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def test_fp8_attention_is_close_to_attention_but_quantized():
    q, k, v = _qkv()
    sqnr = _sqnr(_exact(q, k, v), fp8_attention(q, k, v))
    assert 20 < sqnr < 40  # e4m3 has 3 mantissa bits: close, not exact


def test_centring_k_makes_the_output_blind_to_a_key_offset():
    q, k, v = _qkv()
    offset = torch.randn(1, 1, 3, 16, generator=torch.Generator().manual_seed(5)) * 4
    centred = FP8AttentionSpec(center_k=True)
    torch.testing.assert_close(fp8_attention(q, k + offset, v, centred), fp8_attention(q, k, v, centred),
                               rtol=1e-5, atol=1e-5)
    raw = FP8AttentionSpec(center_k=False)
    exact = _exact(q, k + offset, v)  # exact attention is blind to the offset; uncentred FP8 pays for the range
    shifted = k + offset
    assert _sqnr(exact, fp8_attention(q, shifted, v, centred)) > _sqnr(exact, fp8_attention(q, shifted, v, raw)) + 3


def test_per_head_scales_protect_a_small_head_from_a_large_one():
    q, k, v = _qkv()
    v = v.clone()
    v[:, :, 0] *= 1e5  # head 0's values dwarf the others' beyond e4m3's 2^15 dynamic range
    exact = _exact(q, k, v)[:, :, 1:]
    per_head = fp8_attention(q, k, v, FP8AttentionSpec(granularity="per_head"))[:, :, 1:]
    per_tensor = fp8_attention(q, k, v, FP8AttentionSpec(granularity="per_tensor"))[:, :, 1:]
    assert _sqnr(exact, per_head) > _sqnr(exact, per_tensor) + 10


def test_quantizing_p_costs_little_and_changes_the_output():
    q, k, v = _qkv()
    with_p, without_p = fp8_attention(q, k, v), fp8_attention(q, k, v, FP8AttentionSpec(quantize_p=False))
    assert not torch.equal(with_p, without_p) and _sqnr(without_p, with_p) > 20


def test_layouts_agree_and_dtype_is_kept():
    q, k, v = (t.to(torch.bfloat16) for t in _qkv())
    bshd = fp8_attention(q, k, v)
    bhsd = fp8_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout="bhsd")
    assert bshd.dtype == torch.bfloat16 and bshd.shape == q.shape
    torch.testing.assert_close(bshd, bhsd.transpose(1, 2))


def test_int8_qk_per_block_is_finer_than_e4m3():
    q, k, v = _qkv()
    exact = _exact(q, k, v)
    sage = FP8AttentionSpec(qk_format="int8", granularity="per_block", block=16, v_format=None)
    assert _sqnr(exact, fp8_attention(q, k, v, sage)) > _sqnr(exact, fp8_attention(q, k, v)) + 6


def test_per_block_scales_confine_an_outlier_to_its_block():
    q, k, v = _qkv()
    q = q.clone()
    q[:, 0] *= 1000  # one query token far out of range (40 tokens: blocks of 16, 16 and a padded 8)
    exact = _exact(q, k, v)[:, 16:]
    spec = dict(qk_format="int8", v_format=None)
    blocks = fp8_attention(q, k, v, FP8AttentionSpec(granularity="per_block", block=16, **spec))[:, 16:]
    heads = fp8_attention(q, k, v, FP8AttentionSpec(granularity="per_head", **spec))[:, 16:]
    assert _sqnr(exact, blocks) > _sqnr(exact, heads) + 10


@pytest.mark.parametrize("call, message", [
    (lambda q, k, v: fp8_attention(q, k, v, layout="sbhd"), "layout must be 'bshd' or 'bhsd'"),
    (lambda q, k, v: fp8_attention(q[0], k, v), "takes 4-D query, key and value"),
    (lambda q, k, v: fp8_attention(q, k[:, :, :2], v), "do not fit"),
    (lambda q, k, v: fp8_attention(q, k, v[:, :10]), "do not fit"),
    (lambda q, k, v: FP8AttentionSpec(granularity="per_token"), "granularity must be one of"),
    (lambda q, k, v: FP8AttentionSpec(qk_format="int4"), "qk_format must be one of"),
    (lambda q, k, v: FP8AttentionSpec(v_format="int8"), "v_format must be 'fp8' or None"),
    (lambda q, k, v: FP8AttentionSpec(block=0), "block must be >= 1 token"),
])
def test_bad_input(call, message):
    with pytest.raises(SegQuantError, match=message):
        call(*_qkv())


@pytest.mark.parametrize("name", ["FluxTransformer2DModel", "UNet2DConditionModel"])
def test_scope_puts_fp8_attention_into_a_diffusers_model_and_takes_it_out(name):
    model = build_tiny(name)
    inputs = segquant.example_inputs(model)
    original = F.scaled_dot_product_attention
    with torch.no_grad():
        before = model(**inputs)[0]
        with fp8_attention_scope(model):
            inside = model(**inputs)[0]
        after = model(**inputs)[0]
    assert torch.equal(before, after) and F.scaled_dot_product_attention is original
    assert not torch.equal(before, inside) and 15 < _sqnr(before, inside) < 80


def test_enable_runs_every_forward_with_fp8_attention_until_disable():
    model = build_tiny("FluxTransformer2DModel")
    inputs = segquant.example_inputs(model)
    original = F.scaled_dot_product_attention
    with torch.no_grad():
        before = model(**inputs)[0]
        scope = fp8_attention_scope(model).enable()
        first, second = model(**inputs)[0], model(**inputs)[0]
        assert F.scaled_dot_product_attention is original  # patched only while a forward runs
        scope.disable()
        after = model(**inputs)[0]
    assert torch.equal(first, second) and not torch.equal(first, before) and torch.equal(before, after)


def test_a_failing_forward_leaves_attention_unpatched():
    model = build_tiny("FluxTransformer2DModel")
    original = F.scaled_dot_product_attention
    scope = fp8_attention_scope(model).enable()
    with pytest.raises(Exception):
        model(hidden_states=torch.zeros(1))  # wrong inputs: the forward raises after the pre-hook patched
    assert F.scaled_dot_product_attention is original
    scope.disable()


def test_a_model_without_attention_is_refused():
    with pytest.raises(SegQuantError, match="Linear has no attention processors"):
        fp8_attention_scope(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("name", ["FluxTransformer2DModel", "UNet2DConditionModel"])
def test_scope_routes_attention_to_a_kernel_in_bshd(name):
    """A kernel gets (B, S, H, D) tensors whichever function the model calls (diffusers' dispatch in (B, S, H, D),
    torch's SDPA in (B, H, S, D)), and its output is what the model uses: a kernel of exact attention in
    (B, S, H, D) gives the unpatched model's output, one that runs the reference the reference scope's."""
    model = build_tiny(name)
    inputs = segquant.example_inputs(model)
    calls = []

    def exact(query, key, value, scale):  # written out: F.scaled_dot_product_attention is patched in the scope
        calls.append(scale)
        logits = torch.einsum("bqhd,bkhd->bhqk", query, key) * (scale or query.shape[-1] ** -0.5)
        return torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), value)

    with torch.no_grad():
        plain = model(**inputs)[0]
        with fp8_attention_scope(model, attend=exact):
            routed_exact = model(**inputs)[0]
        with fp8_attention_scope(model):
            reference = model(**inputs)[0]
        with fp8_attention_scope(model, attend=lambda q, k, v, s: fp8_attention(q, k, v, FP8AttentionSpec(), s)):
            routed_reference = model(**inputs)[0]
    assert calls and torch.allclose(routed_exact, plain, rtol=1e-4, atol=1e-5)
    assert torch.equal(routed_reference, reference) and not torch.allclose(reference, plain, rtol=1e-4, atol=1e-5)


def test_scope_refuses_a_spec_with_a_kernel_and_a_kernel_that_is_not_callable():
    model = build_tiny("FluxTransformer2DModel")
    with pytest.raises(SegQuantError, match="a spec .* or a kernel, not both"):
        fp8_attention_scope(model, FP8AttentionSpec(), attend=lambda q, k, v, s: q)
    with pytest.raises(SegQuantError, match="attend must be callable"):
        fp8_attention_scope(model, attend="fa3")


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_head_codes_are_each_heads_fake_quantization(fmt):
    """The codes kernels take (one scale per batch item and head) times their scales are exactly each head
    fake-quantized on its own with ``segquant.formats``."""
    from segquant.attention import head_codes
    from segquant.formats import fake_quant, scale_from_amax

    heads_range = torch.tensor([0.5, 4.0, 30.0])[:, None, None]  # heads far apart: one scale each matters
    x = torch.randn(2, 3, 40, 16, generator=torch.Generator().manual_seed(3)) * heads_range
    codes, scale = head_codes(x, fmt)
    assert scale.shape == (2, 3)
    for b in range(2):
        for h in range(3):
            head = x[b, h]
            expected = fake_quant(head, scale_from_amax(head.abs().amax(), fmt), fmt)
            assert torch.equal(codes[b, h] * scale[b, h], expected)
