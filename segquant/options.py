"""Every quantization option SegQuant knows, declared once with its allowed values and its one default.

The precision registry, the recipes, the reference numerics and both adapters validate through
``check_choice`` against these tuples, so an option cannot drift between them.
"""

from __future__ import annotations

from .errors import SegQuantError

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "geglu", "swiglu")
"""Activations whose outputs feed DualScale layers."""

SHIFTS = ("per_tensor", "per_channel")
"""Activation shift (SPEC section 3): quantize ``x - c`` and fold ``W c`` into the bias, with one centre ``c``
per input segment (``per_tensor``) or per input channel (``per_channel``)."""

CHOICES = ("fixed", "auto")
"""How a recipe sets the techniques of activation-fed inputs: ``fixed`` (as the recipe says, every layer) or
``auto`` (``segquant.choose``: per layer, the best of plain / shift / DualScale / both by measured error and
GEMM cost)."""

REALISATIONS = ("split_k", "folded")
"""How per-segment input scales are realised: ``split_k`` (exact: one GEMM per input segment, ``a_s``
applied after) or ``folded`` (``a_s`` folded into the weight columns before weight quantization: one GEMM,
a per-tensor activation Q/DQ after a ``pre_quant_scale`` Mul on export)."""
DEFAULT_REALISATION = "split_k"

SMOOTHINGS = ("per_layer", "per_segment")
"""How SmoothQuant factors are computed: ``per_layer`` (one factor per input channel for the whole layer) or
``per_segment`` (the paper's reference code: each output segment of an output-segmented layer gets its own factors,
weight scale and input scale, the input being smoothed once per segment; each input segment of an input-segmented
layer gets its own weight scale)."""
DEFAULT_SMOOTHING = "per_layer"

SCALE_FORMS = ("step", "reciprocal")
"""How a scale is applied: ``step`` (``s = amax / qmax``, ``q = round(x / s)``, ``x_hat = q * s``, as ONNX
QuantizeLinear; SmoothQuant multiplies ``x`` by ``max|W|^(1-alpha) / max|x|^alpha``) or ``reciprocal``
(``r = qmax / amax``, ``q = round(x * r)``, ``x_hat = q / r``, as the paper's reference code and ModelOpt's own fake
quant; SmoothQuant divides ``x`` by ``max|x|^alpha / max|W|^(1-alpha)``). Equal in exact arithmetic; they differ in
the last bit, which can move a value across a rounding boundary."""
DEFAULT_SCALE_FORM = "step"

ACTIVATION_MODES = ("static", "dynamic")
"""``static``: calibrated per-segment scales; ``dynamic``: per-token scales computed at run time."""

ACT_GRANULARITIES = ("per_tensor", "per_token")
"""Activation scales of the reference numerics: one per input segment (``per_tensor``) or per token as well."""

WEIGHT_GRANULARITIES = ("per_tensor", "per_channel")
"""``per_tensor``: one weight scale per output segment of the plan; ``per_channel``: one per output row."""

KERNELS = ("naive", "fused")
"""torchao GEMM kernels: ``naive`` (torch's own, DualScale with M doubled) or ``fused`` (Triton)."""
DEFAULT_KERNEL = "naive"


def check_choice(value: object, allowed: tuple[str, ...], what: str) -> str:
    """``value`` if it is one of ``allowed``; else a ``SegQuantError`` naming the option and its choices."""
    if not isinstance(value, str) or value not in allowed:
        raise SegQuantError(f"{what} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def check_alpha(alpha: object, what: str = "smoothquant_alpha") -> float | None:
    """A SmoothQuant alpha in [0, 1], or None for no smoothing."""
    if alpha is None:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise SegQuantError(f"{what} must be a number in [0, 1] or null (no smoothing); got {alpha!r}")
    return float(alpha)
