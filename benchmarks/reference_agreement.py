"""How closely the ModelOpt backend follows segquant.numerics, and what DualScale does per format.

    python benchmarks/reference_agreement.py        # CPU, about a minute; prints a short report

1. Every layer the ModelOpt backend (``segquant.get_backend("modelopt")``) quantizes in small random FLUX, SD3
   and SDXL-UNet models (the bundled configs, shrunk) under the int8_w8a8 plan with SmoothQuant alpha 0.5,
   against the reference on the same inputs, smoothed and calibrated as ``segquant.calib.static_calibration``
   does: the share of output elements within 1e-5 relative and the worst deviation. (ModelOpt's own fake
   quant rounds x * (127 / amax) where the reference, like ONNX QuantizeLinear, rounds x / (amax / 127); the
   backend therefore fake-quantizes through segquant.numerics and keeps ModelOpt's Q/DQ for the ONNX export.)
2. The negative side of GELU outputs: mean squared error of DualScale over one symmetric scale, per format.
"""

from __future__ import annotations

import copy

import torch
from _common import linear_inputs, parser
from torch import nn

import segquant
from segquant import QuantizeOptions, SegmentAmaxObserver, get_precision
from segquant import numerics as nx
from segquant.calib import static_calibration
from segquant.model_configs import load_bundled_config

PRECISION = "int8_w8a8"
ALPHA = 0.5
SMALL = {  # bundled config -> what makes it small
    "tiny-flux": {},
    "sd3.5-medium": dict(sample_size=8, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                         num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                         pooled_projection_dim=16, pos_embed_max_size=16, dual_attention_layers=[0]),
    "sdxl-base": dict(sample_size=16, layers_per_block=1, block_out_channels=[16, 32, 32], attention_head_dim=[2, 4, 4],
                      transformer_layers_per_block=[1, 1, 1], cross_attention_dim=32, norm_num_groups=8,
                      addition_time_embed_dim=8, projection_class_embeddings_input_dim=80),
}


def small_model(config: str, seed: int = 0) -> nn.Module:
    """A randomly initialised, shrunk copy of the bundled diffusers config ``config``."""
    import diffusers

    values = dict(load_bundled_config(config), **SMALL[config])
    torch.manual_seed(seed)
    return getattr(diffusers, values.pop("_class_name")).from_config(values).eval()


def layer_agreement(float_layer: nn.Linear, quantized_layer: nn.Module, plan: segquant.LinearPlan,
                    inputs: list[torch.Tensor]) -> tuple[int, int, float]:
    """(output elements, elements outside 1e-5 relative, worst deviation / output range) on the first input."""
    observer = SegmentAmaxObserver(plan)
    for x in inputs:
        observer.update(x)
    weight = float_layer.weight.detach().float()
    stats, smooth = static_calibration(observer, weight, ALPHA)
    smooth = torch.ones(weight.shape[1]) if smooth is None else smooth
    x = inputs[0]
    expected = nx.reference_linear(x * smooth, weight / smooth, float_layer.bias, plan,
                                   get_precision(PRECISION).quant_spec("split_k"), stats)
    with torch.no_grad():
        got = quantized_layer(x)
    scale = expected.abs().max().item()
    close = torch.isclose(got, expected, rtol=1e-5, atol=1e-5 * scale)
    return close.numel(), int((~close).sum()), (got - expected).abs().max().item() / scale


def agreement() -> None:
    backend = segquant.get_backend("modelopt")
    options = QuantizeOptions(smoothquant_alpha=ALPHA, realisation="split_k", show_progress=False)
    total = outside = 0
    worst = 0.0
    for config in SMALL:
        model = small_model(config)
        data = []
        for seed in range(3):
            torch.manual_seed(100 + seed)
            data.append(segquant.example_inputs(model))

        def forward_loop(m: nn.Module) -> None:
            for batch in data:
                m(**batch)

        seen = linear_inputs(model, lambda: forward_loop(model))
        plan = segquant.analyze(model, **data[0]).with_precision(PRECISION)
        with torch.no_grad():
            quantized = backend.quantize(copy.deepcopy(model), plan, options, forward_loop)
        for name in backend.quantized_linears(quantized):
            n, bad, err = layer_agreement(model.get_submodule(name), quantized.get_submodule(name), plan[name],
                                          seen[name])
            total, outside, worst = total + n, outside + bad, max(worst, err)
    print(f"ModelOpt backend, {PRECISION}, SmoothQuant alpha {ALPHA}, vs segquant.numerics (small FLUX, SD3, "
          f"SDXL-UNet): {total} output elements, {outside} ({outside / total:.3%}) outside 1e-5 relative, worst "
          f"{worst:.2e} of the layer's output range")


def dual_scale_by_format() -> None:
    torch.manual_seed(0)
    x = torch.nn.functional.gelu(torch.randn(1 << 16) * 3)
    negative = x < 0
    for fmt in ("int8", "int6", "int4", "fp8"):
        dual = (x - nx.dual_scale_fake_quant(x, fmt))[negative].pow(2).mean().item()
        single = (x - nx.fake_quant_tensor(x, fmt))[negative].pow(2).mean().item()
        print(f"GELU outputs, negative side, {fmt}: DualScale MSE / one-scale MSE = {dual / single:.3g}")


def main(argv=None) -> None:
    parser(__doc__, out=False).parse_args(argv)
    print(f"torch {torch.__version__}, CPU")
    agreement()
    dual_scale_by_format()


if __name__ == "__main__":
    main()
