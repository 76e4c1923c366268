"""The torchao backend (``segquant.backend.Backend``): an applied plan as static SegQuant layers (prepare ->
calibrate -> convert), real int8/fp8 GEMMs, and torchao's own dynamic configs as the comparison row.

The checkpoint is the quantized denoiser as diffusers writes it (``save_pretrained``: safetensors holding the
8-bit codes and scales of every ``SegQuantTensor``, flattened by torchao's safetensors support, and a
``quantization_config`` in its ``config.json``); ``load`` is ``from_pretrained`` of that folder, which rebuilds
the tensors without quantizing again. Checkpoints of earlier versions (float weights plus
``<denoiser>.segquant_torchao.json``) still load: they are quantized while loading."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from segquant import PRECISIONS as SEGQUANT_PRECISIONS
from segquant import Capabilities, QuantizedLayer, QuantizeOptions, SegQuantError, SegQuantPlan
from segquant.backend import DEFAULT_ONNX_MODE, ForwardLoop, check_quantize_call
from segquant.calib import check_calibration
from segquant.numerics import get_format
from segquant.options import SMOOTHINGS
from segquant.transaction import model_transaction

from .api import SegQuantConfig, calibration_from, quantize, quantized_layers
from .linear import observed, unprepare_linear
from .options import SegQuantOptions
from .tensor import SegQuantTensor

LEGACY_CONFIG = "{denoiser}.segquant_torchao.json"


def _runs(precision: str) -> bool:
    try:
        SegQuantOptions.for_precision(precision)
    except SegQuantError:
        return False
    return True


PRECISIONS = tuple(p for p in SEGQUANT_PRECISIONS if _runs(p))
"""The registry precisions torchao's kernels run here (int8 and fp8 W8A8)."""


def options_for(plan: SegQuantPlan, options: QuantizeOptions) -> SegQuantOptions:
    """The torchao options that realise the applied plan's precision with the run's numeric options."""
    return SegQuantOptions.for_precision(plan.precision(), realisation=options.realisation,
                                         smoothquant_alpha=options.smoothquant_alpha, smoothing=options.smoothing)


class TorchAOBackend:
    """SegQuant through torchao (static activations; ``torch._scaled_mm`` / ``torch._int_mm``). Per-layer and
    per-segment SmoothQuant (``QuantizeOptions.smoothing``), in the ``step`` scale form only."""

    name = "torchao"
    capabilities = Capabilities(precisions=PRECISIONS, activation_modes=("static", "dynamic"), onnx_export=False,
                                save_load=True, smoothings=SMOOTHINGS)

    def _calibrated(self, model: nn.Module, plan: SegQuantPlan, options: QuantizeOptions,
                    forward_loop: ForwardLoop | None, finish: Callable[[SegQuantConfig], Any]) -> Any:
        """Prepare and calibrate, then ``finish(config)`` with the calibrated convert config; on any failure
        the model is left as it was. With ``options.keep_degenerate``, layers without a usable range stay in
        high precision (the plan given to ``finish`` says so)."""
        check_quantize_call(self, plan, options, forward_loop)
        plan.check_model(model, complete=True)
        ao_options = options_for(plan, options)
        if forward_loop is None:
            raise SegQuantError("static SegQuant on torchao needs a forward_loop that runs calibration data")
        with model_transaction(model):  # prepare, calibrate, convert: all or nothing
            quantize(model, SegQuantConfig(plan, options=ao_options, step="prepare"))
            try:
                with torch.no_grad():
                    forward_loop(model)
            except Exception as e:  # noqa: BLE001 - the user's loop failed: say so, keep the cause
                raise SegQuantError(f"forward_loop raised {type(e).__name__} during calibration: {e}") from e
            modules = dict(model.named_modules())
            observers = {n: m.segquant_observer for n, m in modules.items() if observed(m)}
            kept = check_calibration(observers, options.keep_degenerate)
            for name in kept:
                unprepare_linear(modules[name])
            if kept:
                plan = plan.keep_high_precision(kept)
            return finish(SegQuantConfig(plan, options=ao_options, calibration=_calibration_or_none(model)))

    def quantize(self, model: nn.Module, plan: SegQuantPlan, options: QuantizeOptions,
                 forward_loop: ForwardLoop | None) -> nn.Module:
        return self._calibrated(model, plan, options, forward_loop, lambda config: quantize(model, config))

    def quantize_and_save(self, model: nn.Module, plan: SegQuantPlan, options: QuantizeOptions,
                          forward_loop: ForwardLoop | None, folder: Path, name: str) -> tuple[nn.Module, list[Path]]:
        """Prepare, calibrate, convert, then save the quantized denoiser with diffusers ``save_pretrained``."""
        model = self.quantize(model, plan, options, forward_loop)
        model.save_pretrained(Path(folder) / name)
        return model, [Path(folder) / name]

    def load(self, folder: Path, name: str, denoiser_class: str, float_denoiser: Callable[[], nn.Module],
             dtype: torch.dtype) -> nn.Module:
        """The saved quantized denoiser (``from_pretrained``; no quantization while loading)."""
        import diffusers
        from diffusers import TorchAoConfig

        cls = getattr(diffusers, denoiser_class, None)
        if cls is None:
            raise SegQuantError(f"{folder}: {denoiser_class} is not a diffusers model class")
        if not (Path(folder) / name).is_dir():
            raise SegQuantError(f"{folder}: the torchao checkpoint has no {name}/ folder")
        legacy = Path(folder) / LEGACY_CONFIG.format(denoiser=name)
        if legacy.is_file():
            config = _saved_config(json.loads(legacy.read_text()), legacy)
            return cls.from_pretrained(folder, subfolder=name, quantization_config=TorchAoConfig(config),
                                       dtype=dtype)
        model = cls.from_pretrained(folder, subfolder=name, dtype=dtype)
        if not quantized_layers(model):
            raise SegQuantError(f"{folder}/{name}: no quantized layer was loaded; it is not a torchao checkpoint "
                                "of segquant quantize")
        return model

    def export_onnx(self, model: nn.Module, example_kwargs: Mapping[str, Any], path: Path,
                    mode: str = DEFAULT_ONNX_MODE) -> Path:
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
            if not isinstance(m, nn.Linear):
                continue
            if isinstance(m.weight, SegQuantTensor):
                spec, opts = m.weight.spec, m.weight.spec.options
                fmt = get_format(opts.precision).name
                out[name] = QuantizedLayer(spec.in_segments, spec.out_segments, spec.dual_segments, fmt,
                                           opts.weight_granularity, fmt, opts.activation,
                                           spec.shift_segments if spec.shift is not None else ())
            elif isinstance(m.weight, TorchAOBaseTensor):
                out[name] = QuantizedLayer()
        return out


def _calibration_or_none(model: nn.Module) -> dict | None:
    """The calibrated ranges of a prepared model (None when every layer is dynamic)."""
    return calibration_from(model) if any(observed(m) for m in model.modules()) else None


def _saved_config(saved: dict[str, Any], path: Path) -> SegQuantConfig:
    """The ``SegQuantConfig`` of a checkpoint; checkpoints written before ``SegQuantOptions`` stored the
    options as flat keys beside the plan (and the then torchao default realisation, ``folded``)."""
    if not isinstance(saved, dict) or "plan" not in saved:
        raise SegQuantError(f"{path} is not a SegQuant torchao config (no plan)")
    if "options" in saved:
        return SegQuantConfig(saved["plan"], options=SegQuantOptions(**saved["options"]),
                              calibration=saved.get("calibration"))
    flat = {k: saved[k] for k in ("precision", "activation", "realisation", "weight_granularity", "fast_accum",
                                  "kernel") if k in saved}
    flat.setdefault("realisation", "folded")
    return SegQuantConfig(saved["plan"], options=SegQuantOptions(**flat), calibration=saved.get("calibration"),
                          skip=saved.get("skip", []), seg_linear=saved.get("seg_linear", True),
                          dual_scale=saved.get("dual_scale", True))
