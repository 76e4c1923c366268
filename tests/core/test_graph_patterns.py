"""Each graph pattern of SPEC section 2/3 on a toy module, through both capture paths."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segquant
from segquant import AnalysisOptions

CAPTURES = ["export", "eager"]


def plan_of(model, *args, capture="export", **options):
    return segquant.analyze(model.eval(), *args,
                            analysis_options=AnalysisOptions(capture=capture, **options))


class AdaLN(nn.Module):
    """silu -> linear -> chunk(6) (FLUX norm1), split_with_sizes and unbind-after-view."""

    def __init__(self):
        super().__init__()
        self.mod = nn.Linear(8, 48)
        self.qkv = nn.Linear(8, 24)
        self.kv = nn.Linear(8, 16)
        self.uneven = nn.Linear(8, 12)

    def forward(self, emb, x):
        shift, scale, gate, a, b, c = self.mod(F.silu(emb)).chunk(6, dim=-1)
        y = x * (1 + scale[:, None]) + shift[:, None]
        q, k, v = self.qkv(y).view(*y.shape[:2], 3, 2, 4).unbind(2)
        k2, v2 = self.kv(y).to(torch.float32).split(8, dim=-1)
        u1, u2 = torch.split(self.uneven(y), [4, 8], dim=2)
        return gate[:, None] * (q + k + v).flatten(-2) + k2 + v2 + a[:, None] + b[:, None] + c[:, None] + u1.sum() + u2.sum()


@pytest.mark.parametrize("capture", CAPTURES)
def test_output_segments(capture):
    plan = plan_of(AdaLN(), torch.randn(2, 8), torch.randn(2, 5, 8), capture=capture)
    assert plan["mod"].out_segments == (8,) * 6 and "linear->chunk" in plan["mod"].patterns
    assert plan["mod"].dual_scale and plan["mod"].activation == "silu"
    assert plan["qkv"].out_segments == (8, 8, 8) and "linear->unbind" in plan["qkv"].patterns
    assert plan["kv"].out_segments == (8, 8) and "linear->split" in plan["kv"].patterns
    assert plan["uneven"].out_segments == (4, 8)
    assert plan.capture == capture


class SingleBlock(nn.Module):
    """FLUX single-block shape: proj_out(cat([attn (heads merged), gelu_tanh(mlp)])) with unequal sizes."""

    def __init__(self, heads=2, dim=8, mlp=24):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj_mlp = nn.Linear(dim, mlp)
        self.act = nn.GELU(approximate="tanh")
        self.proj_out = nn.Linear(dim + mlp, dim)
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        mlp = self.drop(self.act(self.proj_mlp(x)))
        return self.proj_out(torch.cat([attn, mlp.contiguous()], dim=2))


@pytest.mark.parametrize("capture", CAPTURES)
def test_cat_with_activation_segment(capture):
    plan = plan_of(SingleBlock(), torch.randn(1, 6, 8), capture=capture)
    p = plan["proj_out"]
    assert p.in_segments == (8, 24)
    assert p.dual_scale and p.dual_scale_segments == (1,) and p.activation == "gelu_tanh"
    assert p.patterns == ("cat->linear", "act->cat->linear", "linear->output")  # it is also the model's output
    assert p.high_precision
    assert plan["qkv"].out_segments == (8, 8, 8)
    assert plan["proj_mlp"].is_plain


@pytest.mark.parametrize("capture", CAPTURES)
def test_head_segments_option(capture):
    plan = plan_of(SingleBlock(heads=2), torch.randn(1, 6, 8), capture=capture, head_segments=True)
    assert plan["proj_out"].in_segments == (4, 4, 24)
    assert plan["proj_out"].dual_scale_segments == (2,)
    assert "reshape->linear" in plan["proj_out"].patterns


class Gates(nn.Module):
    """GEGLU and SwiGLU feed-forwards, a functional GELU, a ReLU (not DualScale)."""

    def __init__(self):
        super().__init__()
        self.geglu_in = nn.Linear(8, 32)
        self.geglu_out = nn.Linear(16, 8)
        self.swi_in = nn.Linear(8, 32)
        self.swi_out = nn.Linear(16, 8)
        self.gelu_in = nn.Linear(8, 8)
        self.gelu_out = nn.Linear(8, 8)
        self.relu_out = nn.Linear(8, 8)

    def forward(self, x):
        h, gate = self.geglu_in(x).chunk(2, dim=-1)
        x = x + self.geglu_out(h * F.gelu(gate))
        h, gate = self.swi_in(x).chunk(2, dim=-1)
        x = x + self.swi_out(h * nn.functional.silu(gate))
        x = x + self.gelu_out(F.gelu(self.gelu_in(x)).to(torch.float32))
        return self.relu_out(torch.relu(x))


@pytest.mark.parametrize("capture", CAPTURES)
def test_gates_and_activations(capture):
    plan = plan_of(Gates(), torch.randn(3, 8), capture=capture)
    assert plan["geglu_out"].activation == "geglu" and plan["geglu_out"].dual_scale
    assert plan["swi_out"].activation == "swiglu"
    assert plan["gelu_out"].activation == "gelu"
    assert plan["geglu_in"].out_segments == (16, 16)
    assert not plan["relu_out"].dual_scale
    assert plan.dual_scaled() == ["geglu_out", "swi_out", "gelu_out"]


class StackAndTokens(nn.Module):
    """stack(dim=-2)+flatten -> segments; stack(dim=-1)+flatten (interleaved) and token-dim splits -> none."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(4, 6)
        self.stacked = nn.Linear(12, 4)
        self.interleaved = nn.Linear(12, 4)
        self.tokens = nn.Linear(4, 4)

    def forward(self, x):
        pa, pb = self.a(x), F.silu(self.b(x))
        s = self.stacked(torch.stack([pa, pb], dim=-2).flatten(-2))
        i = self.interleaved(torch.stack([pa, pb], dim=-1).flatten(-2))
        t1, t2 = self.tokens(x).split([2, 3], dim=1)
        txt, img = torch.cat([x, x], dim=1).split([5, 5], dim=1)
        return s.sum() + i.sum() + t1.sum() + t2.sum() + self.tokens(img).sum()


@pytest.mark.parametrize("capture", CAPTURES)
def test_stack_and_token_dim(capture):
    plan = plan_of(StackAndTokens(), torch.randn(1, 5, 4), capture=capture)
    assert plan["stacked"].in_segments == (6, 6)
    assert plan["stacked"].dual_scale_segments == (1,) and plan["stacked"].activation == "silu"
    assert "stack->linear" in plan["stacked"].patterns
    assert plan["interleaved"].is_plain
    assert plan["tokens"].is_plain  # splits along tokens are not feature segments


class Modulated(nn.Module):
    """PixArt's adaLN-single: (table + t.reshape(B, 6, -1)).chunk(6, dim=1)."""

    def __init__(self):
        super().__init__()
        self.t_block = nn.Linear(4, 24)
        self.table = nn.Parameter(torch.randn(6, 4))

    def forward(self, t, x):
        mods = (self.table[None] + self.t_block(F.silu(t)).reshape(t.shape[0], 6, -1)).chunk(6, dim=1)
        return x * mods[0] + mods[1]


@pytest.mark.parametrize("capture", CAPTURES)
def test_chunk_after_view_and_param_add(capture):
    plan = plan_of(Modulated(), torch.randn(2, 4), torch.randn(2, 1, 4), capture=capture)
    assert plan["t_block"].out_segments == (4,) * 6 and plan["t_block"].dual_scale


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.spare = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.used(x)


def test_uncalled_linear_is_planned_plain():
    plan = plan_of(Unused(), torch.randn(2, 4))
    assert plan["spare"].is_plain and plan["used"].is_plain and len(plan) == 2


def test_detection_switches():
    plan = plan_of(SingleBlock(), torch.randn(1, 6, 8), seg_linear=False)
    assert plan.input_segmented() == [] and plan.output_segmented() == []
    plan = plan_of(SingleBlock(), torch.randn(1, 6, 8), dual_scale=False)
    assert plan.dual_scaled() == [] and plan["proj_out"].in_segments == (8, 24)


class Slices(nn.Module):
    """Output segments made by slicing, with negative bounds, narrow and Python indexing."""

    def __init__(self):
        super().__init__()
        self.head, self.tail, self.mid, self.narrowed, self.rows = (nn.Linear(4, 12) for _ in range(5))

    def forward(self, x):
        a = self.head(x)[..., :4]
        b = self.tail(x)[..., -4:]
        c = self.mid(x)[..., 4:8]
        d = self.narrowed(x).narrow(-1, -4, 4)
        e = self.rows(x).view(*x.shape[:-1], 3, 4)[..., 1, :]
        return a.sum() + b.sum() + c.sum() + d.sum() + e.sum()


@pytest.mark.parametrize("capture", CAPTURES)
def test_slices_of_outputs(capture):
    plan = plan_of(Slices(), torch.randn(2, 5, 4), capture=capture)
    assert plan["head"].out_segments == (4, 8)
    assert plan["tail"].out_segments == (8, 4)
    assert plan["mid"].out_segments == (4, 4, 4)
    assert plan["narrowed"].out_segments == (8, 4)
    assert plan["rows"].out_segments == (4, 4, 4)


class Keywords(nn.Module):
    """Functional calls with keyword arguments, an empty cat piece and a permuted last dim."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(8, 12)
        self.k = nn.Linear(8, 4)
        self.perm = nn.Linear(7, 4)

    def forward(self, x):
        y = F.linear(input=torch.cat([x, 2 * x, x[..., :0]], axis=-1), weight=self.l.weight, bias=self.l.bias)
        parts = torch.chunk(input=self.k(torch.cat(tensors=[x, x], dim=-1)), chunks=2, dim=-1)
        flipped = torch.cat([x[..., :3], x[..., :4]], -1)[..., torch.arange(6, -1, -1)]
        return y.sum() + parts[0].sum() + self.perm(flipped).sum()


@pytest.mark.parametrize("capture", CAPTURES)
def test_keyword_arguments_and_edge_pieces(capture):
    plan = plan_of(Keywords(), torch.randn(2, 4), capture=capture)
    assert plan["k"].in_segments == (4, 4) and plan["k"].out_segments == (2, 2)
    assert plan["perm"].is_plain  # an index along the last dim reorders features: no segments
    # F.linear with a module's weight outside its forward is attributed by the weight's owner
    assert plan["l"].in_segments == (4, 4)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 12), nn.Linear(8, 12)
        self.b.weight = nn.Parameter(torch.randn(12, 8))
        self.c = nn.Linear(8, 12)
        self.c.weight = self.b.weight  # tied

    def forward(self, x):
        chunks = self.a(x).chunk(3, -1)
        return self.b(torch.cat([x, x], -1)).sum() + self.c(F.silu(torch.cat([x, x], -1))).chunk(2, -1)[0].sum() + chunks[0].sum()


@pytest.mark.parametrize("capture", CAPTURES)
def test_tied_weights_are_planned_per_module(capture):
    plan = plan_of(Tied(), torch.randn(2, 4), capture=capture)
    assert plan["b"].in_segments == (4, 4) and plan["b"].out_segments == (12,) and not plan["b"].dual_scale
    assert plan["c"].out_segments == (6, 6) and plan["c"].dual_scale
    assert plan["a"].out_segments == (4, 4, 4)


@pytest.mark.parametrize("capture", CAPTURES)
def test_parametrized_linear_is_found(capture):
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
    torch.nn.utils.parametrizations.weight_norm(model[2])
    plan = plan_of(model, torch.randn(2, 4), capture=capture)
    assert plan["2"].activation == "gelu"


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)
        self.t = nn.Linear(5, 4)

    def forward(self, c):
        silu_then_transposed = F.silu(c.view(2, 5, 4)).transpose(1, 2)
        return self.l(F.silu(c)) + self.l(c * F.gelu(c)), self.t(silu_then_transposed)


@pytest.mark.parametrize("capture", CAPTURES)
def test_shared_linear_with_different_inputs_is_left_plain(capture, caplog):
    plan = plan_of(Shared(), torch.randn(10, 4), capture=capture)
    assert not plan["l"].dual_scale and plan["l"].activation is None
    assert "called 2 times with different input structure" in caplog.text
    assert plan["t"].activation == "silu"  # DualScale only needs the values: transposes keep them


class OutputLayers(nn.Module):
    """``proj`` reaches an output through reshape/permute/einsum/cast only; ``mixed`` is added to another tensor
    first; ``mid`` feeds the others; ``sliced`` is selected and chunked on its way out."""

    def __init__(self):
        super().__init__()
        self.mid, self.mixed, self.sliced = (nn.Linear(8, 8) for _ in range(3))
        self.proj = nn.Linear(8, 12)

    def forward(self, x):
        h = self.mid(x)
        out = self.proj(h).reshape(2, 5, 3, 4).permute(0, 2, 1, 3).contiguous().to(torch.float32)
        out = torch.einsum("bchw->bhwc", out)
        mixed = self.mixed(h) + x
        first, _ = self.sliced(h)[:, 1:].chunk(2, dim=-1)
        return {"sample": out, "mixed": mixed, "parts": (first.unsqueeze(0),)}


@pytest.mark.parametrize("capture", CAPTURES)
def test_output_layer_is_kept_in_high_precision(capture):
    plan = plan_of(OutputLayers(), torch.randn(2, 5, 8), capture=capture)
    assert sorted(plan.high_precision_layers()) == ["proj", "sliced"]
    assert "linear->output" in plan["proj"].patterns and plan["proj"].precision is None
    assert plan["sliced"].patterns == ("linear->chunk", "linear->output")
    assert not plan["mixed"].high_precision and "linear->output" not in plan["mixed"].patterns
    assert not plan["mid"].high_precision
    plan = plan_of(OutputLayers(), torch.randn(2, 5, 8), capture=capture, keep_output_layer=False)
    assert plan.high_precision_layers() == []
    assert not any("linear->output" in p.patterns for p in plan.layers.values())


class ReshapedOut(nn.Module):
    def __init__(self, add_other=False):
        super().__init__()
        self.add_other = add_other
        self.l = nn.Linear(4, 6)

    def forward(self, x, y):
        out = self.l(x)
        if self.add_other:
            out = out + y
        return out.reshape(-1, 3)


@pytest.mark.parametrize("capture", CAPTURES)
def test_linear_then_reshape_is_the_output_layer(capture):
    x, y = torch.randn(2, 4), torch.randn(2, 6)
    assert plan_of(ReshapedOut(), x, y, capture=capture)["l"].high_precision
    assert not plan_of(ReshapedOut(add_other=True), x, y, capture=capture)["l"].high_precision
