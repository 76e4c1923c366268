"""SegQuant for torchao: ``quantize_(model, SegQuantConfig(plan), filter_fn=None)``.

Quantized weights are torchao tensor subclasses (``SegQuantTensor``; plain dynamic layers get torchao's own
``Int8Tensor``/``Float8Tensor``), so diffusers ``save_pretrained``/``from_pretrained``, ``state_dict`` and
``torch.compile`` work as with torchao's configs. Real fp8 (``torch._scaled_mm``) and int8 (``torch._int_mm``)
GEMMs; static (prepare -> calibrate -> convert, optionally with SmoothQuant, per layer or per output segment) or
dynamic (per-token) activation scales; DualScale as one GEMM with M doubled; the activation shift as ``x - c``
quantized and ``W_hat c`` folded into the bias (one plain GEMM). ``TorchAOBackend`` is the ``segquant.backend.Backend`` the ``segquant`` application uses.
"""

try:
    import torchao  # noqa: F401
    import torchao.core.config as _ao_config
except ImportError as e:  # pragma: no cover - exercised only without torchao
    raise ImportError(f"segquant_torchao needs torchao>=0.18: pip install 'segquant[torchao]' [{e}]") from e

from .api import (SegLinearConfig, SegQuantConfig, SegQuantModelCheck, UnplannedLinear, calibration_from, check_plan,
                  quantize, quantized_layers, segquant_layers)
from .backend import TorchAOBackend
from .options import SegQuantOptions
from .tensor import SegLinearSpec, SegQuantTensor, register_safetensors

_ao_config.ALLOWED_AO_MODULES.add(__name__)
register_safetensors()

__all__ = ["SegLinearConfig", "SegLinearSpec", "SegQuantConfig", "SegQuantModelCheck", "SegQuantOptions",
           "SegQuantTensor", "TorchAOBackend", "UnplannedLinear", "calibration_from", "check_plan", "quantize",
           "quantized_layers", "segquant_layers"]
