"""Tiny random diffusers denoisers (built from config dicts): exact plan entries for the layers SPEC names."""

import logging

import pytest
import torch
from torch import nn

import segquant
from segquant import AnalysisOptions, GraphAnalysisError, SegQuantError
from _models import TINY_CONFIGS, build_tiny

pytest.importorskip("diffusers")


# the Linear that makes each model's output (UNet: conv_out does, so none)
OUTPUT_LAYERS = {"FluxTransformer2DModel": ["proj_out"], "SD3Transformer2DModel": ["proj_out"],
                 "UNet2DConditionModel": [], "PixArtTransformer2DModel": ["proj_out"],
                 "DiTTransformer2DModel": ["proj_out_2"], "SanaTransformer2DModel": ["proj_out"]}


def analyze_tiny(name, capture="auto", **options):
    model = build_tiny(name)
    return segquant.analyze(model, analysis_options=AnalysisOptions(capture=capture, **options),
                            **segquant.example_inputs(model))


def entry(plan, name):
    p = plan[name]
    return (p.in_segments, p.out_segments, p.dual_scale_segments if p.dual_scale else None, p.activation)


def test_flux():
    plan = analyze_tiny("FluxTransformer2DModel")
    assert plan.capture == "export"
    # adaLN modulation chunks: double-block norm1 -> 6, single-block norm -> 3, norm_out -> 2; all SiLU-fed
    assert entry(plan, "transformer_blocks.0.norm1.linear") == ((32,), (32,) * 6, (0,), "silu")
    assert entry(plan, "transformer_blocks.1.norm1_context.linear") == ((32,), (32,) * 6, (0,), "silu")
    assert entry(plan, "single_transformer_blocks.0.norm.linear") == ((32,), (32,) * 3, (0,), "silu")
    assert entry(plan, "norm_out.linear") == ((32,), (32, 32), (0,), "silu")
    # single-block proj_out = cat([attention 32, gelu_tanh(mlp) 128]): unequal segments, DualScale on the mlp part
    assert entry(plan, "single_transformer_blocks.1.proj_out") == ((32, 128), (32,), (1,), "gelu_tanh")
    # timestep/guidance embedder linear_1 reads cat([cos, sin])
    assert entry(plan, "time_text_embed.timestep_embedder.linear_1") == ((128, 128), (32,), None, None)
    assert entry(plan, "time_text_embed.guidance_embedder.linear_1") == ((128, 128), (32,), None, None)
    assert entry(plan, "transformer_blocks.0.ff.net.2") == ((128,), (32,), (0,), "gelu_tanh")
    # FLUX's joint attention splits text|image along TOKENS before to_out: not a feature segment
    assert plan["transformer_blocks.0.attn.to_out.0"].is_plain
    assert plan["transformer_blocks.0.attn.to_q"].is_plain
    assert plan.summary() == ("7 output-segmented, 4 input-segmented, 16 DualScale of 50 Linear, "
                              "1 kept in high precision")  # proj_out, the output layer


def test_sd3_with_dual_attention():
    plan = analyze_tiny("SD3Transformer2DModel")
    # block 0 uses SD35AdaLayerNormZeroX (9 chunks); the last block's context norm is AdaLayerNormContinuous
    assert entry(plan, "transformer_blocks.0.norm1.linear") == ((16,), (16,) * 9, (0,), "silu")
    assert entry(plan, "transformer_blocks.1.norm1.linear") == ((16,), (16,) * 6, (0,), "silu")
    assert entry(plan, "transformer_blocks.1.norm1_context.linear") == ((16,), (16, 16), (0,), "silu")
    assert entry(plan, "transformer_blocks.0.ff_context.net.2") == ((64,), (16,), (0,), "gelu_tanh")
    assert entry(plan, "time_text_embed.timestep_embedder.linear_1") == ((128, 128), (16,), None, None)


def test_sdxl_unet():
    plan = analyze_tiny("UNet2DConditionModel")
    ff = "down_blocks.1.attentions.0.transformer_blocks.0.ff.net"
    assert entry(plan, f"{ff}.0.proj") == ((32,), (128, 128), None, None)  # GEGLU: hidden | gate
    assert entry(plan, f"{ff}.2") == ((128,), (32,), (0,), "geglu")
    # SDXL add_embedding reads cat([text_embeds 32, time_ids embedding 6 x 8])
    assert entry(plan, "add_embedding.linear_1") == ((32, 48), (64,), None, None)
    assert entry(plan, "time_embedding.linear_1") == ((8, 8), (64,), None, None)
    assert entry(plan, "down_blocks.0.resnets.0.time_emb_proj") == ((64,), (16,), (0,), "silu")


def test_pixart():
    plan = analyze_tiny("PixArtTransformer2DModel")
    # adaLN-single: t_block output reshaped (B, 6, D), added to scale_shift_table, chunked on dim 1
    assert entry(plan, "adaln_single.linear") == ((16,), (16,) * 6, (0,), "silu")
    assert entry(plan, "transformer_blocks.1.ff.net.2") == ((64,), (16,), (0,), "gelu_tanh")
    assert entry(plan, "caption_projection.linear_2") == ((16,), (16,), (0,), "gelu_tanh")


def test_dit():
    plan = analyze_tiny("DiTTransformer2DModel")
    assert entry(plan, "transformer_blocks.0.norm1.linear") == ((16,), (16,) * 6, (0,), "silu")
    assert entry(plan, "proj_out_1") == ((16,), (16, 16), (0,), "silu")
    assert entry(plan, "transformer_blocks.1.ff.net.2") == ((64,), (16,), (0,), "gelu_tanh")


def test_sana():
    plan = analyze_tiny("SanaTransformer2DModel")
    assert entry(plan, "time_embed.linear") == ((16,), (16,) * 6, (0,), "silu")
    assert entry(plan, "caption_projection.linear_2") == ((16,), (16,), (0,), "gelu_tanh")


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_eager_trace_gives_the_export_plan(name):
    exported, eager = analyze_tiny(name, "export"), analyze_tiny(name, "eager")
    assert eager.capture == "eager"
    for layer in exported:
        assert entry(exported, layer) == entry(eager, layer), layer
        assert exported[layer].high_precision == eager[layer].high_precision, layer


@pytest.mark.parametrize("capture", ["export", "eager"])
@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_output_layer_stays_in_high_precision(name, capture):
    plan = analyze_tiny(name, capture)
    assert plan.capture == capture
    assert plan.high_precision_layers() == OUTPUT_LAYERS[name]
    for layer in OUTPUT_LAYERS[name]:
        assert plan[layer].patterns[-1] == "linear->output" and plan[layer].precision is None
    assert not any("linear->output" in plan[n].patterns for n in plan if n not in OUTPUT_LAYERS[name])
    if "transformer_blocks.0.ff.net.2" in plan:
        assert not plan["transformer_blocks.0.ff.net.2"].high_precision  # a Linear in the middle: never
    plan = analyze_tiny(name, capture, keep_output_layer=False)
    assert plan.high_precision_layers() == []
    assert not any("linear->output" in plan[n].patterns for n in plan)


class DataDependent(nn.Module):
    """torch.export cannot trace the data-dependent branch; the eager trace can."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(4, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = self.up(x)
        if h.sum() > 0:
            h = h * 1.0
        return self.down(torch.nn.functional.gelu(h))


def test_falls_back_to_eager_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="segquant"):
        plan = segquant.analyze(DataDependent(), torch.randn(2, 4))
    assert plan.capture == "eager"
    assert "falling back to an eager trace" in caplog.text
    assert plan["down"].activation == "gelu"


def test_bad_inputs_raise_one_clear_error():
    with pytest.raises(SegQuantError, match="expects a torch.nn.Module, got str"):
        segquant.analyze("not a model")
    with pytest.raises(SegQuantError, match="has no nn.Linear layer"):
        segquant.analyze(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()), torch.randn(1, 3, 4, 4))
    model = build_tiny("FluxTransformer2DModel")
    kwargs = segquant.example_inputs(model)
    kwargs["hidden_states"] = torch.randn(1, 16, 7)  # wrong channel count
    with pytest.raises(GraphAnalysisError, match=r"torch.export failed.*eager trace failed.*example inputs"):
        segquant.analyze(model, **kwargs)
    with pytest.raises(GraphAnalysisError, match="eager trace failed"):
        segquant.analyze(DataDependent(), torch.randn(2, 5), analysis_options=AnalysisOptions(capture="eager"))
    with pytest.raises(GraphAnalysisError, match="unknown capture method"):
        segquant.analyze(DataDependent(), torch.randn(2, 4), analysis_options=AnalysisOptions(capture="fx"))
    with pytest.raises(SegQuantError, match="no example inputs for Linear"):
        segquant.example_inputs(nn.Linear(2, 2))


def test_model_is_left_untouched():
    model = build_tiny("UNet2DConditionModel").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    segquant.analyze(model, **segquant.example_inputs(model))
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    kwargs = segquant.example_inputs(model)
    kwargs["sample"] = torch.randn(1, 3, 4, 4)
    with pytest.raises(GraphAnalysisError):
        segquant.analyze(model, **kwargs)
    assert model.training and all(torch.equal(before[k], model.state_dict()[k]) for k in before)
