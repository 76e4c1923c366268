"""SegQuant for NVIDIA ModelOpt: ``mtq.quantize(model, SEGQUANT_CFG, forward_loop)``.

Importing this package registers the ``segquant`` calibration algorithm (mode ``segquant_calibrate``)
with ModelOpt; ``mto.restore`` of a SegQuant model needs the same import first. ``ModelOptBackend`` is the
``segquant.backend.Backend`` the ``segquant`` application uses (entry point ``segquant.backends: modelopt``).
``export_hf_checkpoint``/``load_hf_checkpoint`` write and read HF checkpoints of SegQuant models (ModelOpt's own
``export_hf_checkpoint`` refuses them once this package is imported: it would mislabel their scales).
"""

try:
    import modelopt.torch.quantization  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without modelopt
    raise ImportError("segquant_modelopt needs nvidia-modelopt>=0.47: pip install 'segquant[modelopt]' "
                      f"(after installing torch) [{e}]") from e

from .algorithm import SegQuantCalibConfig, SegQuantModeDescriptor, plan_of, segquant_calibrate
from .backend import ModelOptBackend, restore
from .configs import (PRECISION_CONFIGS, SEGQUANT_CFG, SEGQUANT_FP8_CFG, SEGQUANT_INT8_CFG,
                      SEGQUANT_INT8_PERCHANNEL_CFG, SEGQUANT_W4A8_CFG, config_for_plan, with_fp8_attention,
                      with_segquant)
from .hf_checkpoint import export_hf_checkpoint, guard_modelopt_export, load_hf_checkpoint
from .quantizer import SegmentTensorQuantizer, SegQuantFlag

guard_modelopt_export()

__all__ = ["PRECISION_CONFIGS", "SEGQUANT_CFG", "SEGQUANT_FP8_CFG", "SEGQUANT_INT8_CFG",
           "SEGQUANT_INT8_PERCHANNEL_CFG", "SEGQUANT_W4A8_CFG", "ModelOptBackend", "SegQuantCalibConfig",
           "SegQuantModeDescriptor", "SegmentTensorQuantizer", "SegQuantFlag", "config_for_plan",
           "export_hf_checkpoint", "load_hf_checkpoint", "plan_of", "restore", "segquant_calibrate",
           "with_fp8_attention", "with_segquant"]
