"""Full-size published configs analysed on the meta device (no weights), with counts derived from the
diffusers model code. Each must finish in under 60 s on a 2-core CPU."""

import json
import time
from collections import Counter

import pytest
import torch

import segquant
from full_configs import FULL_CONFIGS

diffusers = pytest.importorskip("diffusers")


def analyze_meta(key):
    config = FULL_CONFIGS[key]
    start = time.process_time()  # CPU time of this process: what the analysis costs, not how busy the machine is
    with torch.device("meta"):
        model = getattr(diffusers, config["_class_name"]).from_config(config)
    plan = segquant.analyze(model, **segquant.example_inputs(model))
    seconds = time.process_time() - start
    assert seconds < 60, f"{key} took {seconds:.1f} s of CPU time on meta"
    return plan


def whole_input_activations(plan):
    return Counter(plan[n].activation for n in plan.dual_scaled() if len(plan[n].in_segments) == 1)


@pytest.mark.slow
def test_flux_1_dev():
    plan = analyze_meta("flux.1-dev")
    # 19 FluxTransformerBlocks x (norm1.linear + norm1_context.linear, AdaLayerNormZero: chunk(6)) = 38
    # + 38 FluxSingleTransformerBlocks x norm.linear (AdaLayerNormZeroSingle: chunk(3)) = 38
    # + norm_out.linear (AdaLayerNormContinuous: chunk(2)) = 1                         -> 77
    assert len(plan.output_segmented()) == 77
    # 38 single-block proj_out(cat([attn 3072, gelu(mlp) 12288])) + timestep_embedder.linear_1 and
    # guidance_embedder.linear_1 (Timesteps: cat([cos, sin]) of 128 each)              -> 40
    assert len(plan.input_segmented()) == 40
    assert Counter(plan[n].in_segments for n in plan.input_segmented()) == {(3072, 12288): 38, (128, 128): 2}
    # SiLU-fed: 3 embedder linear_2 (timestep, guidance, text) + 38 double-block adaLN (2 per block)
    # + 38 single-block adaLN + norm_out.linear = 80; GELU-fed: ff.net.2 + ff_context.net.2 in 19 blocks = 38
    assert whole_input_activations(plan) == {"silu": 80, "gelu_tanh": 38}
    # plus the gelu(mlp) segment of each single-block proj_out                         -> 156 in all
    assert len(plan.dual_scaled()) == 156
    assert all(plan[f"single_transformer_blocks.{i}.proj_out"].dual_scale_segments == (1,) for i in range(38))
    assert len(plan) == 504


@pytest.mark.slow
@pytest.mark.parametrize("key, out_segments, activations", [
    # 38 JointTransformerBlocks: norm1 (AdaLayerNormZero, chunk 6) x 38; norm1_context chunk 6 x 37 and, in the
    # last block (context_pre_only), AdaLayerNormContinuous chunk 2 x 1; + norm_out chunk 2              -> 77
    # SiLU: timestep + text embedder linear_2 (2) + norm1 (38) + norm1_context (38) + norm_out (1) = 79;
    # GELU: ff.net.2 (38) + ff_context.net.2 (37: the last block has no context feed-forward) = 75
    ("sd3.5-large", {6: 38 + 37, 2: 2}, {"silu": 79, "gelu_tanh": 75}),
    # 24 blocks, dual_attention_layers 0..12 use SD35AdaLayerNormZeroX (chunk 9) for norm1 (13), the other 11
    # AdaLayerNormZero (chunk 6); norm1_context chunk 6 x 23 + chunk 2 x 1 (last block); norm_out chunk 2 -> 49
    # SiLU: 2 embedders + 24 norm1 + 24 norm1_context + norm_out = 51; GELU: 24 ff + 23 ff_context = 47
    ("sd3.5-medium", {9: 13, 6: 11 + 23, 2: 2}, {"silu": 51, "gelu_tanh": 47}),
])
def test_sd3_5(key, out_segments, activations):
    plan = analyze_meta(key)
    assert Counter(len(plan[n].out_segments) for n in plan.output_segmented()) == out_segments
    # only time_text_embed.timestep_embedder.linear_1 (cat([cos, sin])); no guidance embedder
    assert plan.input_segmented() == ["time_text_embed.timestep_embedder.linear_1"]
    assert whole_input_activations(plan) == activations
    assert len(plan.dual_scaled()) == sum(activations.values())  # no input-segmented layer has DualScale


@pytest.mark.slow
def test_sdxl_base_unet():
    plan = analyze_meta("sdxl-base")
    # BasicTransformerBlocks: down 2 x 2 (640) + 2 x 10 (1280), mid 1 x 10, up 3 x 10 (1280) + 3 x 2 (640) = 70;
    # each FeedForward is GEGLU: net.0.proj output chunk(2) -> 70 output-segmented, net.2 reads h * gelu(gate)
    assert len(plan.output_segmented()) == 70
    assert Counter(plan[n].out_segments for n in plan.output_segmented()) == {(5120, 5120): 60, (2560, 2560): 10}
    # time_embedding.linear_1 (cat([cos, sin]) of 160 each) and add_embedding.linear_1
    # (cat([text_embeds 1280, time_ids 6 x 256])) -> 2
    assert {n: plan[n].in_segments for n in plan.input_segmented()} == {
        "time_embedding.linear_1": (160, 160), "add_embedding.linear_1": (1280, 1536)}
    # SiLU: time_embedding.linear_2 + add_embedding.linear_2 + 17 ResnetBlock2D time_emb_proj
    # (down 3 x 2, mid 2, up 3 x 3) = 19; GEGLU: 70 ff.net.2
    assert whole_input_activations(plan) == {"silu": 19, "geglu": 70}
    assert len(plan.dual_scaled()) == 89


def test_bundled_configs_are_the_published_ones():
    from segquant.model_configs import bundled_configs

    bundled = bundled_configs()
    for key, config in FULL_CONFIGS.items():
        assert json.loads(bundled[key].read_text()) == config
