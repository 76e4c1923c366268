"""SegQuant for NVIDIA ModelOpt: ``mtq.quantize(model, SEGQUANT_CFG, forward_loop)``.

Importing this package registers the ``segquant`` calibration algorithm (mode ``segquant_calibrate``)
with ModelOpt; ``mto.restore`` of a SegQuant model needs the same import first. ``ModelOptBackend`` is the
``segquant.backend.Backend`` the ``segquant`` application uses (entry point ``segquant.backends: modelopt``).
"""

try:
    import modelopt.torch.quantization  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without modelopt
    raise ImportError("segquant_modelopt needs nvidia-modelopt>=0.47: pip install 'segquant[modelopt]' "
                      f"(after installing torch) [{e}]") from e

from .algorithm import SegQuantCalibConfig, SegQuantModeDescriptor, plan_of, segquant_calibrate
from .backend import ModelOptBackend, restore
from .configs import (PRECISION_CONFIGS, SEGQUANT_CFG, SEGQUANT_FP8_CFG, SEGQUANT_INT8_CFG,
                      SEGQUANT_INT8_PERCHANNEL_CFG, SEGQUANT_W4A8_CFG, config_for_plan, with_segquant)
from .quantizer import SegmentTensorQuantizer, SegQuantFlag

__all__ = ["PRECISION_CONFIGS", "SEGQUANT_CFG", "SEGQUANT_FP8_CFG", "SEGQUANT_INT8_CFG",
           "SEGQUANT_INT8_PERCHANNEL_CFG", "SEGQUANT_W4A8_CFG", "ModelOptBackend", "SegQuantCalibConfig",
           "SegQuantModeDescriptor", "SegmentTensorQuantizer", "SegQuantFlag", "config_for_plan", "plan_of",
           "restore", "segquant_calibrate", "with_segquant"]
