"""SegQuant configs in ModelOpt's list form, ``with_segquant`` to add SegQuant to any preset, and
``config_for_plan`` for an applied plan.

Unlike ModelOpt's INT8/FP8 presets, which switch off every ``*proj_out.*`` (in FLUX: all 38 single-block
``proj_out``, the layers SegLinear exists for), these configs name no layer: which Linear stays in high
precision is the plan's to say (the analysis keeps the model's output layer; recipes add their ``skip``).
Non-Linear layers (norms, convolutions) are left in high precision.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import modelopt.torch.quantization as mtq

from segquant import QuantizeOptions, SegQuantError, SegQuantPlan, get_precision
from segquant.options import DEFAULT_REALISATION, REALISATIONS, check_alpha, check_choice

_NOT_LINEAR = ["nn.LayerNorm", "nn.InstanceNorm1d", "nn.InstanceNorm2d", "nn.InstanceNorm3d", "nn.Conv1d",
               "nn.Conv2d", "nn.Conv3d", "nn.ConvTranspose1d", "nn.ConvTranspose2d", "nn.ConvTranspose3d",
               "nn.MaxPool1d", "nn.MaxPool2d", "nn.MaxPool3d", "nn.AvgPool1d", "nn.AvgPool2d", "nn.AvgPool3d"]
# SegQuant quantizes Linear layers only (SPEC section 1): ModelOpt's presets also quantize the inputs of
# LayerNorms and convolutions.
_LINEAR_ONLY = [{"quantizer_name": "*", "parent_class": cls, "enable": False} for cls in _NOT_LINEAR]


def with_segquant(base: dict[str, Any], **algorithm: Any) -> dict[str, Any]:
    """A copy of the ModelOpt config ``base`` that calibrates with SegQuant and quantizes the Linear layers
    the SegQuant plan quantizes (all but the model's output layer, when the algorithm analyses the model).

    Example:
        >>> cfg = with_segquant(mtq.FP8_DEFAULT_CFG)
        >>> cfg = with_segquant(mtq.INT8_SMOOTHQUANT_CFG, alpha=0.5, dual_scale=False)

    Args:
        base: a ModelOpt config in list form (``{"quant_cfg": [...], "algorithm": ...}``).
        algorithm: fields of the ``segquant`` algorithm (``seg_linear``, ``dual_scale``, ``realisation``,
            ``alpha``, ``overrides``, ``head_segments``, ``show_progress``, ``plan``). A SmoothQuant base keeps
            smoothing with its alpha unless ``alpha`` is given.
    """
    if not isinstance(base, dict) or not isinstance(base.get("quant_cfg"), list):
        raise SegQuantError("with_segquant expects a ModelOpt config in list form: {'quant_cfg': [...], "
                            "'algorithm': ...} (e.g. mtq.INT8_DEFAULT_CFG)")
    cfg = copy.deepcopy(base)
    cfg["quant_cfg"] = [e for e in cfg["quant_cfg"] if not _names_layers(e)] + copy.deepcopy(_LINEAR_ONLY)
    base_algorithm = base.get("algorithm")
    options = {"method": "segquant"}
    if isinstance(base_algorithm, dict) and base_algorithm.get("method") == "segquant":
        options = dict(base_algorithm)  # deriving from a SegQuant config keeps its options
    elif isinstance(base_algorithm, dict) and base_algorithm.get("method") == "smoothquant":
        options["alpha"] = base_algorithm.get("alpha", 1.0)
    elif base_algorithm == "smoothquant":
        options["alpha"] = 1.0
    options.update(algorithm)
    check_alpha(options.get("alpha"), "alpha")
    check_choice(options.get("realisation", DEFAULT_REALISATION), REALISATIONS, "realisation")
    cfg["algorithm"] = options
    return cfg


def _names_layers(entry: dict[str, Any]) -> bool:
    """A ModelOpt rule that picks layers by name (``*proj_out.*``, ``*lm_head*``, ``*router*`` ...), not by
    quantizer kind (``*``, ``*weight_quantizer``) or module class: with SegQuant the plan decides which layers
    are quantized, so such rules are dropped."""
    name = entry.get("quantizer_name", "*")
    return "parent_class" not in entry and name != "*" and not re.fullmatch(r"\*(\[\w+\])?\w*_quantizer", name)


def _with_weights(base: dict[str, Any], axis: int | None) -> dict[str, Any]:
    cfg = copy.deepcopy(base)
    for entry in cfg["quant_cfg"]:
        if entry.get("quantizer_name") == "*weight_quantizer" and "cfg" in entry:
            entry["cfg"]["axis"] = axis
    return cfg


SEGQUANT_INT8_CFG = with_segquant(_with_weights(mtq.INT8_DEFAULT_CFG, None), alpha=0.5)
"""The paper's W8A8: INT8 per-tensor static weights (one scale per output segment) and activations
(one per input segment, DualScale on SiLU/GELU inputs), SmoothQuant alpha 0.5."""

SEGQUANT_INT8_PERCHANNEL_CFG = with_segquant(mtq.INT8_DEFAULT_CFG, alpha=0.5)
"""INT8 per-channel weights and per-segment static activations (NVIDIA's diffusers INT8 recipe + SegQuant)."""

SEGQUANT_FP8_CFG = with_segquant(mtq.FP8_DEFAULT_CFG, dual_scale=False)
"""FP8 e4m3 per-tensor weights (per output segment) and activations (per input segment), no smoothing, and
no DualScale: FP8's precision is relative to the value, so a separate negative scale changes only values in
the subnormal range (measured: +0.06 dB, not significant, on the embedded FLUX; benchmarks/results/quality.md)
while a DualScale GEMM costs 2.6-2.8x a plain FP8 GEMM (benchmarks/results/kernel_bench.md). Turn it on with
``with_segquant(SEGQUANT_FP8_CFG, dual_scale=True)``."""

SEGQUANT_W4A8_CFG = with_segquant({
    "quant_cfg": [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 4, "axis": 0}},
        {"quantizer_name": "*input_quantizer",
         "cfg": {"num_bits": 8, "axis": None, "type": "dynamic", "block_sizes": {-1: None}}},
    ],
    "algorithm": "max",
})
"""INT4 per-channel weights, INT8 per-token dynamic activations (one scale per token and input segment,
two on DualScale segments). Runs without a forward_loop on known diffusers models. The paper's W4A8 also
uses GPTQ and a rank-64 SVD branch, which are not part of this config."""

SEGQUANT_CFG = SEGQUANT_INT8_PERCHANNEL_CFG
"""The recommended default: ``mtq.quantize(model, SEGQUANT_CFG, forward_loop)``."""

PRECISION_CONFIGS = {"int8_w8a8": SEGQUANT_INT8_CFG, "int8_perchannel": SEGQUANT_INT8_PERCHANNEL_CFG,
                     "fp8": SEGQUANT_FP8_CFG, "w4a8": SEGQUANT_W4A8_CFG}
"""The ModelOpt config of each ``segquant.precision`` name (its quantizer formats are that precision's)."""


FP8_ATTENTION = [{"quantizer_name": f"*{name}_quantizer", "cfg": {"num_bits": (4, 3), "axis": None}}
                 for name in ("[qkv]_bmm", "softmax")]
"""ModelOpt's attention quantizers (its diffusers plugin) in FP8 e4m3, one static max-calibrated scale each per
attention module: Q, K and V where the module calls ``F.scaled_dot_product_attention`` (their scales go to the FP8
attention TensorRT runs after ONNX export, which quantizes the softmax output P itself) or ``torch.bmm``, and P on the
``bmm`` path."""


def with_fp8_attention(base: dict[str, Any]) -> dict[str, Any]:
    """A copy of the ModelOpt config ``base`` that also quantizes attention in FP8 (``FP8_ATTENTION``): what TensorRT
    runs as an FP8 attention after ONNX export. SegQuant's calibration loop max-calibrates these quantizers along
    with its own observers.

    Fidelity on mnist-flux: on top of the FP8 recipe it costs -5.38 dB [-6.09, -4.64]
    (benchmarks/results/fp8_attention_quality.md). It is an option for speed, not a default.

    Example:
        >>> cfg = with_fp8_attention(SEGQUANT_FP8_CFG)

    Raises:
        SegQuantError: ``base`` is not a ModelOpt config in list form.
    """
    if not isinstance(base, dict) or not isinstance(base.get("quant_cfg"), list):
        raise SegQuantError("with_fp8_attention expects a ModelOpt config in list form: {'quant_cfg': [...], "
                            "'algorithm': ...} (e.g. SEGQUANT_FP8_CFG)")
    cfg = copy.deepcopy(base)
    cfg["quant_cfg"] = cfg["quant_cfg"] + copy.deepcopy(FP8_ATTENTION)
    return cfg


def config_for_plan(plan: SegQuantPlan, options: QuantizeOptions = QuantizeOptions()) -> dict[str, Any]:
    """The ModelOpt config that quantizes exactly the applied ``plan``: the quantizers of the plan's precision
    and the ``segquant`` algorithm with the plan itself (no analysis, no second application of a recipe).

    Raises:
        SegQuantError: the plan names no precision, or one ModelOpt has no config for.
    """
    if not isinstance(plan, SegQuantPlan) or not isinstance(options, QuantizeOptions):
        raise SegQuantError("config_for_plan(plan, options) takes a segquant.SegQuantPlan and a "
                            f"segquant.QuantizeOptions, got {type(plan).__name__} and {type(options).__name__}")
    precision = plan.precision()
    if precision is None:
        raise SegQuantError("config_for_plan needs an applied plan (Recipe.apply or plan.with_precision)")
    get_precision(precision)
    if precision not in PRECISION_CONFIGS:
        raise SegQuantError(f"no ModelOpt config for precision {precision}; one of {', '.join(PRECISION_CONFIGS)}")
    cfg = copy.deepcopy(PRECISION_CONFIGS[precision])
    cfg["algorithm"] = {"method": "segquant", "plan": plan.to_dict(), "alpha": options.smoothquant_alpha,
                        "realisation": options.realisation, "show_progress": options.show_progress,
                        "keep_degenerate": options.keep_degenerate, "smoothing": options.smoothing,
                        "scale_form": options.scale_form}
    return cfg
