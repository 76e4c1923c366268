"""SegQuant for torchao: ``quantize_(model, SegQuantConfig(plan), filter_fn=None)``.

Real fp8 (``torch._scaled_mm``) and int8 (``torch._int_mm``) GEMMs; static (prepare -> calibrate ->
convert, optionally with SmoothQuant) or dynamic (per-token) activation scales; DualScale as one GEMM with M
doubled. ``TorchAOBackend`` is the ``segquant.backend.Backend`` the ``segquant`` application uses.
"""

try:
    import torchao  # noqa: F401
    import torchao.core.config as _ao_config
except ImportError as e:  # pragma: no cover - exercised only without torchao
    raise ImportError(f"segquant_torchao needs torchao>=0.18: pip install 'segquant[torchao]' [{e}]") from e

from .api import SegLinearConfig, SegQuantConfig, calibration_from, check_plan, quantize, quantized_layers
from .backend import TorchAOBackend
from .linear import ObservedSegQuantLinear, SegQuantLinear
from .options import SegQuantOptions

_ao_config.ALLOWED_AO_MODULES.add(__name__)

__all__ = ["ObservedSegQuantLinear", "SegLinearConfig", "SegQuantConfig", "SegQuantLinear", "SegQuantOptions",
           "TorchAOBackend", "calibration_from", "check_plan", "quantize", "quantized_layers"]
