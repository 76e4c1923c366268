"""How closely the ModelOpt backend follows segquant.numerics, and what DualScale does per format.

    python benchmarks/reference_agreement.py        # CPU, about a minute; prints a short report

1. Every quantized layer of tiny FLUX, SD3 and SDXL-UNet models under SEGQUANT_INT8_CFG, against the
   reference on the same (smoothed) inputs: the share of output elements within 1e-5 relative and the worst
   deviation. (ModelOpt's own fake quant rounds x * (127 / amax) where the reference, like ONNX
   QuantizeLinear, rounds x / (amax / 127); SegmentTensorQuantizer therefore fake-quantizes through
   segquant.numerics and keeps ModelOpt's Q/DQ for the ONNX export.)
2. The negative side of GELU outputs: mean squared error of DualScale over one symmetric scale, per format.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]

import modelopt.torch.quantization as mtq  # noqa: E402

import segquant  # noqa: E402
import segquant_modelopt as sm  # noqa: E402
from segquant import SegmentAmaxObserver  # noqa: E402
from segquant import numerics as nx  # noqa: E402
from _models import build_tiny  # noqa: E402


def agreement() -> None:
    total = outside = 0
    worst = 0.0
    for name in ("FluxTransformer2DModel", "SD3Transformer2DModel", "UNet2DConditionModel"):
        model = build_tiny(name)
        data = []
        for seed in range(3):
            torch.manual_seed(100 + seed)
            data.append(segquant.example_inputs(model))
        seen, hooks = {}, []
        for layer_name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                hooks.append(module.register_forward_pre_hook(
                    lambda m, a, n=layer_name: seen.setdefault(n, []).append(a[0].detach())))
        with torch.no_grad():
            for batch in data:
                model(**batch)
        for h in hooks:
            h.remove()
        cfg = sm.with_segquant(sm.SEGQUANT_INT8_CFG, show_progress=False)
        quantized = mtq.quantize(copy.deepcopy(model), cfg, lambda m: [m(**b) for b in data])
        plan, modules = sm.plan_of(quantized), dict(quantized.named_modules())
        for layer_name, float_layer in model.named_modules():
            if not isinstance(float_layer, nn.Linear) or not modules[layer_name].input_quantizer.is_enabled:
                continue
            smooth = modules[layer_name].input_quantizer.pre_quant_scale
            observer = SegmentAmaxObserver(plan[layer_name])
            for x in seen[layer_name]:
                observer.update(x * smooth)
            x = seen[layer_name][0]
            expected = nx.reference_linear(x * smooth, float_layer.weight / smooth, float_layer.bias, plan[layer_name],
                                           nx.QuantSpec(weight_granularity="per_tensor"), observer.stats())
            with torch.no_grad():
                got = modules[layer_name](x)
            scale = expected.abs().max().item()
            close = torch.isclose(got, expected, rtol=1e-5, atol=1e-5 * scale)
            total += close.numel()
            outside += int((~close).sum())
            worst = max(worst, (got - expected).abs().max().item() / scale)
    print(f"ModelOpt SEGQUANT_INT8_CFG vs segquant.numerics (tiny FLUX, SD3, SDXL-UNet): {total} output elements, "
          f"{outside} ({outside / total:.3%}) outside 1e-5 relative, worst {worst:.2e} of the layer's output range")


def dual_scale_by_format() -> None:
    torch.manual_seed(0)
    x = torch.nn.functional.gelu(torch.randn(1 << 16) * 3)
    negative = x < 0
    for fmt in ("int8", "int6", "int4", "fp8"):
        dual = (x - nx.dual_scale_fake_quant(x, fmt))[negative].pow(2).mean().item()
        single = (x - nx.fake_quant_tensor(x, fmt))[negative].pow(2).mean().item()
        print(f"GELU outputs, negative side, {fmt}: DualScale MSE / one-scale MSE = {dual / single:.3g}")


if __name__ == "__main__":
    print(f"torch {torch.__version__}, CPU")
    agreement()
    dual_scale_by_format()
