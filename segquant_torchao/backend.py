"""The torchao backend (``segquant.backend.Backend``): an applied plan as static SegQuant layers (prepare ->
calibrate -> convert), real int8/fp8 GEMMs, and torchao's own dynamic configs as the comparison row.

The checkpoint is the denoiser's float weights (diffusers ``save_pretrained``) with the calibrated
``SegQuantConfig``; ``load`` runs ``from_pretrained(quantization_config=TorchAoConfig(...))``, which quantizes
every layer in place while loading."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from segquant import Capabilities, QuantizedLayer, QuantizeOptions, SegQuantError, SegQuantPlan
from segquant.backend import ForwardLoop, check_supported

from .api import SegQuantConfig, calibration_from, quantize
from .linear import SegQuantLinear
from .options import SegQuantOptions

CONFIG = "{denoiser}.segquant_torchao.json"
PRECISIONS = ("int8_w8a8", "int8_perchannel", "fp8")


def options_for(plan: SegQuantPlan, options: QuantizeOptions) -> SegQuantOptions:
    """The torchao options that realise the applied plan's precision with the run's numeric options."""
    return SegQuantOptions.for_precision(plan.precision(), realisation=options.realisation,
                                         smoothquant_alpha=options.smoothquant_alpha)


class TorchAOBackend:
    """SegQuant through torchao (static activations; ``torch._scaled_mm`` / ``torch._int_mm``)."""

    name = "torchao"
    capabilities = Capabilities(precisions=PRECISIONS, activation_modes=("static", "dynamic"), onnx_export=False,
                                save_load=True)

    def _prepare_and_calibrate(self, model: nn.Module, plan: SegQuantPlan, options: QuantizeOptions,
                               forward_loop: ForwardLoop | None) -> SegQuantOptions:
        check_supported(self, plan)
        ao_options = options_for(plan, options)
        if ao_options.activation == "static" and forward_loop is None:
            raise SegQuantError("static SegQuant on torchao needs a forward_loop that runs calibration data")
        quantize(model, SegQuantConfig(plan, options=ao_options, step="prepare"))
        if forward_loop is not None:
            with torch.no_grad():
                forward_loop(model)
        return ao_options

    def quantize(self, model: nn.Module, plan: SegQuantPlan, options: QuantizeOptions,
                 forward_loop: ForwardLoop | None) -> nn.Module:
        ao_options = self._prepare_and_calibrate(model, plan, options, forward_loop)
        return quantize(model, SegQuantConfig(plan, options=ao_options, step="convert"))

    def quantize_and_save(self, model: nn.Module, plan: SegQuantPlan, options: QuantizeOptions,
                          forward_loop: ForwardLoop | None, folder: Path, name: str) -> tuple[nn.Module, list[Path]]:
        """Prepare, calibrate, save the float weights and the calibrated config, convert in place."""
        ao_options = self._prepare_and_calibrate(model, plan, options, forward_loop)
        config = SegQuantConfig(plan, options=ao_options, calibration=calibration_from(model))
        model.save_pretrained(Path(folder) / name)  # prepared layers still hold their float weights
        config_path = Path(folder) / CONFIG.format(denoiser=name)
        config_path.write_text(json.dumps({"plan": plan.to_dict(), "calibration": config.calibration,
                                           "options": dataclasses.asdict(ao_options)}) + "\n")
        return quantize(model, config), [Path(folder) / name, config_path]

    def load(self, folder: Path, manifest: Mapping[str, Any], float_denoiser: Callable[[], nn.Module],
             dtype: torch.dtype) -> nn.Module:
        """The saved float weights, quantized while loading by diffusers' ``TorchAoConfig``."""
        import diffusers
        from diffusers import TorchAoConfig

        name = manifest["denoiser"]
        config_path = Path(folder) / CONFIG.format(denoiser=name)
        if not config_path.is_file() or not (Path(folder) / name).is_dir():
            raise SegQuantError(f"{folder}: the torchao checkpoint ({name}/ and {config_path.name}) is incomplete")
        saved = json.loads(config_path.read_text())
        config = SegQuantConfig(saved["plan"], options=SegQuantOptions(**saved["options"]),
                                calibration=saved["calibration"])
        cls = getattr(diffusers, manifest["denoiser_class"])
        return cls.from_pretrained(folder, subfolder=name, quantization_config=TorchAoConfig(config), torch_dtype=dtype)

    def export_onnx(self, model: nn.Module, example_kwargs: Mapping[str, Any], path: Path) -> Path:
        raise SegQuantError("ONNX export is a ModelOpt path: use --backend modelopt")

    def quantize_baseline(self, model: nn.Module, precision: str, forward_loop: ForwardLoop | None) \
            -> tuple[nn.Module, str]:
        """torchao's own dynamic config for ``precision`` (int8: per-token int8 activations and per-channel
        int8 weights; fp8: per-row e4m3), on every Linear; needs no calibration."""
        from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig,
                                          Int8DynamicActivationInt8WeightConfig, PerRow, quantize_)

        if precision in ("int8_w8a8", "int8_perchannel"):
            config, label = Int8DynamicActivationInt8WeightConfig(), "torchao Int8DynamicActivationInt8WeightConfig"
        elif precision == "fp8":
            config, label = (Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                             "torchao Float8DynamicActivationFloat8WeightConfig(PerRow)")
        else:
            raise SegQuantError(f"no torchao baseline for precision {precision!r}; torchao supports {PRECISIONS}")
        quantize_(model, config)
        return model, label

    def quantized_linears(self, model: nn.Module) -> dict[str, QuantizedLayer]:
        """SegQuant layers with their segments, and Linears whose weight is a torchao quantized tensor."""
        from torchao.utils import TorchAOBaseTensor

        out = {}
        for name, m in model.named_modules():
            if isinstance(m, SegQuantLinear):
                spec = m.segquant_spec
                out[name] = QuantizedLayer(spec.in_segments, spec.out_segments, spec.dual_segments)
            elif isinstance(m, nn.Linear) and isinstance(m.weight, TorchAOBaseTensor):
                out[name] = QuantizedLayer()
        return out
