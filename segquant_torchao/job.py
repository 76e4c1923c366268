"""The torchao side of ``segquant quantize``: static SegQuant (prepare -> calibrate -> convert) from a
recipe; the checkpoint is the denoiser's float weights (diffusers ``save_pretrained``) with the
calibrated ``SegQuantConfig``, loaded back with ``from_pretrained(quantization_config=TorchAoConfig(...))``,
which quantizes every layer in place while loading."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from segquant import SegQuantError, SegQuantPlan
from segquant.recipe import Recipe

from .api import SegQuantConfig, calibration_from, quantize

logger = logging.getLogger(__name__)

PRECISIONS = ("int8_w8a8", "int8_perchannel", "fp8")
_OPTIONS = {"int8_w8a8": ("int8", "per_tensor"), "int8_perchannel": ("int8", "per_channel"),
            "fp8": ("fp8", "per_tensor")}
CONFIG = "{denoiser}.segquant_torchao.json"


def options_for(recipe: Recipe) -> dict[str, Any]:
    """``SegQuantConfig`` options of a recipe (static activations, as the paper's W8A8 and FP8)."""
    if recipe.precision not in _OPTIONS:
        raise SegQuantError(f"recipe {recipe.name}: the torchao backend supports {', '.join(PRECISIONS)}, not "
                            f"{recipe.precision} (use --backend modelopt)")
    if recipe.smoothquant_alpha is not None:
        logger.warning("recipe %s: SmoothQuant (alpha %s) is not part of the torchao backend; not applied",
                       recipe.name, recipe.smoothquant_alpha)
    precision, granularity = _OPTIONS[recipe.precision]
    return dict(precision=precision, weight_granularity=granularity, activation="static",
                realisation=recipe.realisation, skip=list(recipe.skip), seg_linear=recipe.seg_linear,
                dual_scale=recipe.dual_scale)


def quantize_and_save(denoiser: nn.Module, recipe: Recipe, plan: SegQuantPlan,
                      forward_loop: Callable[[nn.Module], None], out: Path, name: str,
                      show_progress: bool = True) -> tuple[nn.Module, list[Path]]:
    """Prepare, calibrate, save the float weights and the calibrated config, convert in place."""
    options = _prepare_and_calibrate(denoiser, recipe, plan, forward_loop)
    calibration = calibration_from(denoiser)
    denoiser.save_pretrained(out / name)  # prepared layers still hold their float weights
    config_path = out / CONFIG.format(denoiser=name)
    config_path.write_text(json.dumps({"plan": plan.to_dict(), "calibration": calibration, **options}) + "\n")
    quantize(denoiser, SegQuantConfig(plan, step="convert", **options))
    return denoiser, [out / name, config_path]


def _prepare_and_calibrate(denoiser: nn.Module, recipe: Recipe, plan: SegQuantPlan,
                           forward_loop: Callable[[nn.Module], None]) -> dict[str, Any]:
    """Static SegQuant's first two steps in place; returns the ``SegQuantConfig`` options for ``convert``."""
    options = options_for(recipe)
    quantize(denoiser, SegQuantConfig(plan, step="prepare", **options))
    forward_loop(denoiser)
    return options


def load_denoiser(folder: Path, manifest: dict[str, Any], float_denoiser: Callable[[], nn.Module],
                  dtype: torch.dtype) -> nn.Module:
    """The saved float weights, quantized while loading by diffusers' ``TorchAoConfig``."""
    import diffusers
    from diffusers import TorchAoConfig

    name = manifest["denoiser"]
    config_path = folder / CONFIG.format(denoiser=name)
    if not config_path.is_file() or not (folder / name).is_dir():
        raise SegQuantError(f"{folder}: the torchao checkpoint ({name}/ and {config_path.name}) is incomplete")
    config = SegQuantConfig(**json.loads(config_path.read_text()))
    cls = getattr(diffusers, manifest["denoiser_class"])
    return cls.from_pretrained(folder, subfolder=name, quantization_config=TorchAoConfig(config), torch_dtype=dtype)


def export_onnx(denoiser: nn.Module, example_kwargs: dict[str, Any], path: Path) -> Path:
    raise SegQuantError("ONNX export is a ModelOpt path: use --backend modelopt")


def quantize_baseline(denoiser: nn.Module, precision: str, forward_loop: Callable[[nn.Module], None]) \
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
    quantize_(denoiser, config)
    return denoiser, label


def quantize_segquant(denoiser: nn.Module, recipe: Recipe, plan: SegQuantPlan,
                      forward_loop: Callable[[nn.Module], None], show_progress: bool = True) -> nn.Module:
    """Static SegQuant in memory (no checkpoint): prepare, calibrate, convert."""
    options = _prepare_and_calibrate(denoiser, recipe, plan, forward_loop)
    quantize(denoiser, SegQuantConfig(plan, step="convert", **options))
    return denoiser


def quantized_linears(denoiser: nn.Module) -> set[str]:
    """Names of the Linear layers that run quantized (SegQuant layers or torchao quantized weights)."""
    from torchao.utils import TorchAOBaseTensor

    from .linear import SegQuantLinear

    return {name for name, m in denoiser.named_modules() if isinstance(m, nn.Linear)
            and (isinstance(m, SegQuantLinear) or isinstance(m.weight, TorchAOBaseTensor))}
