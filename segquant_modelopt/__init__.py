"""SegQuant for NVIDIA ModelOpt (``mtq.quantize(model, SEGQUANT_CFG, forward_loop)``).

The adapter reads a ``segquant.SegQuantPlan``; its quantized modules, configs and calibration
algorithm are built in the issue "segquant_modelopt: SegQuant inside mtq.quantize". Importing it
checks that ModelOpt is installed.
"""

try:
    import modelopt.torch.quantization  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without modelopt
    raise ImportError("segquant_modelopt needs nvidia-modelopt>=0.47: pip install 'segquant[modelopt]' "
                      f"(after installing torch) [{e}]") from e

__all__: list[str] = []
