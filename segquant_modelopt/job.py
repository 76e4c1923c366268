"""The ModelOpt side of ``segquant quantize``: a recipe as a ModelOpt config, ``mtq.quantize`` with the
pipeline's calibration loop, ``mto.save``/``mto.restore``, ONNX export."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import modelopt.torch.opt as mto
import modelopt.torch.quantization as mtq
import torch
from torch import nn

from segquant import SegQuantError, SegQuantPlan
from segquant.recipe import Recipe

from .configs import SEGQUANT_FP8_CFG, SEGQUANT_INT8_CFG, SEGQUANT_INT8_PERCHANNEL_CFG, SEGQUANT_W4A8_CFG, \
    with_segquant
from .export import export_onnx as _export_onnx

PRECISIONS = ("int8_w8a8", "int8_perchannel", "fp8", "w4a8")
BASE_CONFIGS = {"int8_w8a8": SEGQUANT_INT8_CFG, "int8_perchannel": SEGQUANT_INT8_PERCHANNEL_CFG, "fp8": SEGQUANT_FP8_CFG,
          "w4a8": SEGQUANT_W4A8_CFG}
"""The SegQuant ModelOpt config each recipe precision starts from."""
CHECKPOINT = "{denoiser}.modelopt.pth"


def config_for(recipe: Recipe, show_progress: bool = True) -> dict[str, Any]:
    """The ModelOpt config of a recipe: its precision's SegQuant config with the recipe's algorithm
    options, plan overrides and skipped layers (every quantizer of a skipped layer off)."""
    if recipe.precision not in BASE_CONFIGS:
        raise SegQuantError(f"recipe {recipe.name}: no ModelOpt config for precision {recipe.precision}")
    cfg = with_segquant(BASE_CONFIGS[recipe.precision], alpha=recipe.smoothquant_alpha, realisation=recipe.realisation,
                        seg_linear=recipe.seg_linear, dual_scale=recipe.dual_scale,
                        overrides=copy.deepcopy(dict(recipe.overrides)), show_progress=show_progress)
    cfg["quant_cfg"] += [{"quantizer_name": f"{glob}.*", "enable": False} for glob in recipe.skip]
    return cfg


def quantize_and_save(denoiser: nn.Module, recipe: Recipe, plan: SegQuantPlan,
                      forward_loop: Callable[[nn.Module], None], out: Path, name: str,
                      show_progress: bool = True) -> tuple[nn.Module, list[Path]]:
    """``mtq.quantize`` (the algorithm analyses the model itself; ``plan`` is the checked recipe plan)
    and ``mto.save``. Returns the quantized denoiser and the files written."""
    quantized = mtq.quantize(denoiser, config_for(recipe, show_progress), forward_loop)
    path = out / CHECKPOINT.format(denoiser=name)
    mto.save(quantized, path)
    return quantized, [path]


def load_denoiser(folder: Path, manifest: dict[str, Any], float_denoiser: Callable[[], nn.Module],
                  dtype: torch.dtype) -> nn.Module:
    """``mto.restore`` of the checkpoint onto the base model's float denoiser."""
    path = folder / CHECKPOINT.format(denoiser=manifest["denoiser"])
    if not path.is_file():
        raise SegQuantError(f"{folder}: the ModelOpt checkpoint {path.name} is missing")
    return mto.restore(float_denoiser(), path)


def export_onnx(denoiser: nn.Module, example_kwargs: dict[str, Any], path: Path) -> Path:
    if not example_kwargs:
        raise SegQuantError("no denoiser call was recorded during calibration: nothing to export")
    return _export_onnx(denoiser, example_kwargs, path)


BASELINE_PRESETS = {"int8_w8a8": "INT8_SMOOTHQUANT_CFG", "int8_perchannel": "INT8_DEFAULT_CFG",
                    "fp8": "FP8_DEFAULT_CFG", "w4a8": "W4A8_AWQ_BETA_CFG"}
"""The ModelOpt preset each SegQuant precision is compared with (``segquant run``'s baseline row)."""


def quantize_baseline(denoiser: nn.Module, precision: str, forward_loop: Callable[[nn.Module], None]) \
        -> tuple[nn.Module, str]:
    """Quantize with ModelOpt's own preset for ``precision``, as shipped (with the layers it skips)."""
    if precision not in BASELINE_PRESETS:
        raise SegQuantError(f"no ModelOpt baseline preset for precision {precision!r}")
    name = BASELINE_PRESETS[precision]
    return mtq.quantize(denoiser, copy.deepcopy(getattr(mtq, name)), forward_loop), f"ModelOpt {name}"


def quantize_segquant(denoiser: nn.Module, recipe: Recipe, plan: SegQuantPlan,
                      forward_loop: Callable[[nn.Module], None], show_progress: bool = True) -> nn.Module:
    """SegQuant in memory (no checkpoint): ``mtq.quantize`` with the recipe's config and ``plan`` (so the
    algorithm quantizes exactly the plan the caller reports on, without analysing again)."""
    cfg = config_for(recipe, show_progress)
    cfg["algorithm"]["plan"] = plan.to_dict()
    return mtq.quantize(denoiser, cfg, forward_loop)


def is_quantized(module: nn.Module) -> bool:
    """True when the module's weight or input quantizer is enabled."""
    quantizers = [getattr(module, q, None) for q in ("weight_quantizer", "input_quantizer")]
    return any(q is not None and getattr(q, "is_enabled", False) for q in quantizers)


def quantized_linears(denoiser: nn.Module) -> set[str]:
    """Names of the Linear layers whose weight or input is quantized."""
    return {name for name, module in denoiser.named_modules() if isinstance(module, nn.Linear) and is_quantized(module)}
