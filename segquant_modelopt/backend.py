"""The ModelOpt backend (``segquant.backend.Backend``): an applied plan through ``mtq.quantize``, checkpoints
with ``mto.save``/``mto.restore``, ONNX export, and ModelOpt's own presets as the comparison row."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import modelopt.torch.opt as mto
import modelopt.torch.quantization as mtq
import torch
from torch import nn

from segquant import Capabilities, QuantizedLayer, QuantizeOptions, SegQuantError, SegQuantPlan
from segquant.backend import DEFAULT_ONNX_MODE, ForwardLoop, check_quantize_call
from segquant.options import SCALE_FORMS, SMOOTHINGS

from .configs import PRECISION_CONFIGS, config_for_plan
from .export import export_onnx
from .quantizer import format_of, is_marked
from .segment_smoothing import check_exportable, is_reference_arithmetic

logger = logging.getLogger(__name__)

CHECKPOINT = "{denoiser}.modelopt.pth"

BASELINE_PRESETS = {"int8_w8a8": "INT8_SMOOTHQUANT_CFG", "int8_perchannel": "INT8_DEFAULT_CFG",
                    "fp8": "FP8_DEFAULT_CFG", "w4a8": "W4A8_AWQ_BETA_CFG"}
"""The ModelOpt preset each precision is compared with (``segquant run``'s baseline row)."""


def restore(model: nn.Module, f: str | Path, **kwargs: Any) -> nn.Module:
    """``mto.restore`` for SegQuant checkpoints (importing this function registers SegQuant with ModelOpt).

    ``mto.restore`` unpickles with ``weights_only=True``; a class that no imported package allow-lists makes
    torch suggest ``weights_only=False``. Here that is one line naming the class and the import that provides it.
    """
    try:
        return mto.restore(model, f, **kwargs)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(e))
        name = found.group(1) if found else "a class torch does not allow"
        raise SegQuantError(f"{f}: the checkpoint holds {name}, which no imported package allow-lists; import "
                            f"the package that defines it before restoring (SegQuant's quantizers: `import "
                            "segquant_modelopt`), and only load checkpoints you trust") from None


def quantize_quietly(model: nn.Module, config: dict[str, Any], forward_loop: ForwardLoop | None) -> nn.Module:
    """``mtq.quantize`` with what ModelOpt prints (``Inserted N quantizers``, ``Smoothed N modules``) logged at
    INFO on this module's logger instead of written to stdout: ModelOpt has no switch for its prints."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            return mtq.quantize(model, config, forward_loop)
    finally:
        for line in out.getvalue().splitlines():
            if line.strip():
                logger.info("modelopt: %s", line.strip())


_NOT_CALIBRATED = re.compile(r"(?P<name>\S+) is not calibrated, skip smoothing")


@contextlib.contextmanager
def _switched_off_layers_not_warned(model: nn.Module) -> Iterator[None]:
    """ModelOpt's SmoothQuant warns ``<layer> is not calibrated, skip smoothing`` for every Linear whose input
    quantizer its own preset switched off (``*proj_out.*``, six on the embedded FLUX): expected, so logged at
    DEBUG instead. The same warning for a layer that is on, and every other warning, is shown as it was."""
    with warnings.catch_warnings():  # puts showwarning back
        show = warnings.showwarning

        def drop_switched_off(message, category, filename, lineno, file=None, line=None):
            found = _NOT_CALIBRATED.fullmatch(str(message))
            module = dict(model.named_modules()).get(found["name"]) if found else None
            quantizer = getattr(module, "input_quantizer", None)
            if quantizer is not None and not quantizer.is_enabled:
                logger.debug("ModelOpt: %s (its preset switched the layer off)", message)
                return
            show(message, category, filename, lineno, file, line)

        warnings.showwarning = drop_switched_off
        yield


def _is_quantized(module: nn.Module) -> bool:
    quantizers = [getattr(module, q, None) for q in ("weight_quantizer", "input_quantizer")]
    return any(q is not None and getattr(q, "is_enabled", False) for q in quantizers)


def _layer_state(module: nn.Module) -> QuantizedLayer:
    """Segments, DualScale and formats as the layer's quantizers hold them (segments empty for a layer that a
    ModelOpt preset quantized)."""
    inputs, weights = module.input_quantizer, module.weight_quantizer
    w_fmt, a_fmt = format_of(weights), format_of(inputs)
    granularity = getattr(weights, "_segquant_weight_granularity", None) or \
        ("per_channel" if weights.axis == 0 else "per_tensor")
    formats = dict(weight_format=w_fmt.name if w_fmt else "", act_format=a_fmt.name if a_fmt else "",
                   weight_granularity=granularity,
                   activation="dynamic" if inputs._dynamic else "static")
    if not is_marked(inputs):
        return QuantizedLayer(**formats)
    return QuantizedLayer(tuple(inputs._segquant_segments), tuple(getattr(weights, "_segquant_out_segments", ())),
                          tuple(inputs._segquant_dual_segments), **formats,
                          shift_segments=tuple(getattr(inputs, "_segquant_shift_segments", None) or ()))


class ModelOptBackend:
    """SegQuant through NVIDIA ModelOpt (fake quantization in PyTorch, Q/DQ ONNX for TensorRT)."""

    name = "modelopt"
    capabilities = Capabilities(precisions=tuple(PRECISION_CONFIGS), activation_modes=("static", "dynamic"),
                                onnx_export=True, save_load=True, smoothings=SMOOTHINGS, scale_forms=SCALE_FORMS)

    def quantize(self, model: nn.Module, plan: SegQuantPlan, options: QuantizeOptions,
                 forward_loop: ForwardLoop | None) -> nn.Module:
        check_quantize_call(self, plan, options, forward_loop)
        plan.check_model(model, complete=True)  # before mtq.quantize inserts a single quantizer
        return quantize_quietly(model, config_for_plan(plan, options), forward_loop)

    def quantize_and_save(self, model: nn.Module, plan: SegQuantPlan, options: QuantizeOptions,
                          forward_loop: ForwardLoop | None, folder: Path, name: str) -> tuple[nn.Module, list[Path]]:
        if is_reference_arithmetic(options.smoothing, options.scale_form):
            raise SegQuantError(f"smoothing={options.smoothing!r}, scale_form={options.scale_form!r} (reference mode) "
                                "is a fake-quantization mode with no checkpoint; quantize with the default options")
        quantized = self.quantize(model, plan, options, forward_loop)
        path = Path(folder) / CHECKPOINT.format(denoiser=name)
        mto.save(quantized, path)
        return quantized, [path]

    def load(self, folder: Path, name: str, denoiser_class: str, float_denoiser: Callable[[], nn.Module],
             dtype: torch.dtype) -> nn.Module:
        path = Path(folder) / CHECKPOINT.format(denoiser=name)
        if not path.is_file():
            raise SegQuantError(f"{folder}: the ModelOpt checkpoint {path.name} is missing")
        return restore(float_denoiser(), path)

    def export_onnx(self, model: nn.Module, example_kwargs: Mapping[str, Any], path: Path,
                    mode: str = DEFAULT_ONNX_MODE) -> Path:
        """Q/DQ ONNX (``segquant_modelopt.export.export_onnx``): ``tensorrt`` mode refuses per-K input scales
        and DualScale, ``qdq`` mode exports them as per-channel Q/DQ and two Q/DQ branches."""
        if not example_kwargs:
            raise SegQuantError("no denoiser call was recorded during calibration: nothing to export")
        check_exportable(model)
        return export_onnx(model, dict(example_kwargs), path, mode=mode)

    def quantize_baseline(self, model: nn.Module, precision: str, forward_loop: ForwardLoop | None) \
            -> tuple[nn.Module, str]:
        """ModelOpt's own preset for ``precision``, as shipped (with the layers it skips)."""
        if precision not in BASELINE_PRESETS:
            raise SegQuantError(f"no ModelOpt baseline preset for precision {precision!r}")
        preset = BASELINE_PRESETS[precision]
        with _switched_off_layers_not_warned(model):
            quantized = quantize_quietly(model, copy.deepcopy(getattr(mtq, preset)), forward_loop)
        return quantized, f"ModelOpt {preset}"

    def quantized_linears(self, model: nn.Module) -> dict[str, QuantizedLayer]:
        return {name: _layer_state(module) for name, module in model.named_modules()
                if isinstance(module, nn.Linear) and _is_quantized(module)}
