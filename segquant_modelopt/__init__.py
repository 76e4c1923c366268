"""SegQuant for NVIDIA ModelOpt: ``mtq.quantize(model, SEGQUANT_CFG, forward_loop)``.

Importing this package registers the ``segquant`` calibration algorithm (mode ``segquant_calibrate``)
with ModelOpt; ``mto.restore`` of a SegQuant model needs the same import first.
"""

try:
    import modelopt.torch.quantization  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without modelopt
    raise ImportError("segquant_modelopt needs nvidia-modelopt>=0.47: pip install 'segquant[modelopt]' "
                      f"(after installing torch) [{e}]") from e

from .algorithm import SegQuantCalibConfig, SegQuantModeDescriptor, plan_of, segquant_calibrate
from .configs import (SEGQUANT_CFG, SEGQUANT_FP8_CFG, SEGQUANT_INT8_CFG, SEGQUANT_INT8_PERCHANNEL_CFG,
                      SEGQUANT_W4A8_CFG, with_segquant)
from .quantizer import SegmentTensorQuantizer, SegQuantFlag

__all__ = ["SEGQUANT_CFG", "SEGQUANT_FP8_CFG", "SEGQUANT_INT8_CFG", "SEGQUANT_INT8_PERCHANNEL_CFG", "SEGQUANT_W4A8_CFG",
           "SegQuantCalibConfig", "SegQuantModeDescriptor", "SegmentTensorQuantizer", "plan_of",
           "SegQuantFlag", "segquant_calibrate", "with_segquant"]
