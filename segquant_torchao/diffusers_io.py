"""A model quantized in memory, saved the way diffusers saves a model it quantized while loading.

diffusers' ``save_pretrained`` writes torchao tensors as 8-bit safetensors (and the ``quantization_config`` that
makes ``from_pretrained`` rebuild them) only for a model that carries a torchao quantizer, which a model
otherwise only gets from ``from_pretrained(..., quantization_config=TorchAoConfig(...))``. A SegQuant convert of
a diffusers model (``quantize_`` or ``segquant_torchao.quantize``) calls ``attach_quantization_config``, so that
``model.save_pretrained(folder)`` and ``Model.from_pretrained(folder)`` round-trip its quantized weights as they
are. As for any diffusers model quantized while loading, ``.to(dtype)``, ``.half()`` and ``.float()`` then raise
diffusers' error ("Casting a quantized model to a new `dtype` is unsupported"); ``.to(device)`` works.
"""

from __future__ import annotations

from torch import nn
from torchao.core.config import AOBaseConfig

from segquant import SegQuantError


def is_diffusers_model(model: nn.Module) -> bool:
    try:
        from diffusers import ModelMixin
    except ImportError:  # pragma: no cover - diffusers is optional for the torchao adapter
        return False
    return isinstance(model, ModelMixin)


def attach_quantization_config(model: nn.Module, config: AOBaseConfig) -> nn.Module:
    """Mark a diffusers model quantized with ``config`` as diffusers marks a model it quantized while loading
    (``config`` is what ``config.json`` stores: the plan and options, not the calibration, since a pre-quantized
    load does not quantize again).

    Raises:
        SegQuantError: ``model`` is not a diffusers model, or carries another library's quantizer.
    """
    from diffusers import TorchAoConfig
    from diffusers.quantizers.torchao import TorchAoHfQuantizer

    if not is_diffusers_model(model):
        raise SegQuantError(f"{type(model).__name__} is not a diffusers model; save its state_dict instead")
    existing = getattr(model, "hf_quantizer", None)
    if existing is not None and not isinstance(getattr(existing.quantization_config, "quant_type", None),
                                               type(config)):
        raise SegQuantError(f"{type(model).__name__} already carries a {type(existing).__name__}; "
                            "quantize a float model")
    quantizer = TorchAoHfQuantizer(TorchAoConfig(config), pre_quantized=True)
    quantizer.validate_environment(device_map=None)
    model.register_to_config(quantization_config=quantizer.quantization_config)  # written to config.json
    quantizer.preprocess_model(model, device_map=None)
    model.hf_quantizer = quantizer
    return model
