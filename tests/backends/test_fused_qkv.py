"""diffusers' fused QKV projections (``fuse_qkv_projections``): one Linear whose output is chunked into q, k and v
is an output-segmented layer, so q, k and v keep their own weight scales on both backends (what SegLinear is for:
one per-tensor scale over the three would be set by the largest). diffusers keeps the unfused to_q/to_k/to_v
modules, which never run: calibration cannot reach them, so they are kept in high precision by name
(``keep_degenerate``) and the plan says so."""

import copy

import pytest
import torch

pytest.importorskip("diffusers")

import segquant  # noqa: E402
from segquant.recipe import load_recipe  # noqa: E402
from segquant.recording import record_linears  # noqa: E402
from test_contract import BACKENDS, assert_realises, backend_or_skip, loop_over, tiny_inputs  # noqa: E402


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_fused_qkv_is_output_segmented_with_a_scale_per_projection(backend_name):
    backend = backend_or_skip(backend_name)
    model, batches = tiny_inputs("FluxTransformer2DModel")
    model.fuse_qkv_projections()
    recipe = load_recipe("flux.1-dev/int8_w8a8")
    plan = recipe.apply(segquant.analyze(model, **batches[0]))
    fused = [n for n in plan.layers if n.endswith(("to_qkv", "to_added_qkv"))]
    assert fused and all(len(plan[n].out_segments) == 3 and "linear->chunk" in plan[n].patterns for n in fused)
    with pytest.raises(segquant.SegQuantError, match="calibration reached no data for 18 layer"):
        backend.quantize(copy.deepcopy(model), plan, recipe.quantize_options(show_progress=False), loop_over(batches))
    options = recipe.quantize_options(show_progress=False, keep_degenerate=True)
    quantized = backend.quantize(copy.deepcopy(model), plan, options, loop_over(batches))
    dead = [n for n in plan.quantized_layers() if n.endswith(("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj",
                                                               "add_v_proj"))]
    assert len(dead) == 18
    assert_realises(backend, quantized, plan.keep_high_precision(dead))
    with torch.no_grad():
        exact = model(**batches[0])[0]
        approx = quantized(**batches[0])[0]
    assert segquant.numerics.sqnr_db(exact, approx) > 20
    name = fused[0]  # the three projections' weight ranges differ: one scale would waste codes on two of them
    w = dict(model.named_modules())[name].weight.detach()
    ranges = torch.stack([part.abs().max() for part in w.chunk(3)])
    with record_linears(model, [name]) as rec, torch.no_grad():
        model(**batches[0])
    assert rec.inputs[name] and not torch.allclose(ranges, ranges.max().expand(3))
