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
_BASES = {"int8_w8a8": SEGQUANT_INT8_CFG, "int8_perchannel": SEGQUANT_INT8_PERCHANNEL_CFG, "fp8": SEGQUANT_FP8_CFG,
          "w4a8": SEGQUANT_W4A8_CFG}
CHECKPOINT = "{denoiser}.modelopt.pth"


def config_for(recipe: Recipe, show_progress: bool = True) -> dict[str, Any]:
    """The ModelOpt config of a recipe: its precision's SegQuant config with the recipe's algorithm
    options, plan overrides and skipped layers (every quantizer of a skipped layer off)."""
    if recipe.precision not in _BASES:
        raise SegQuantError(f"recipe {recipe.name}: no ModelOpt config for precision {recipe.precision}")
    cfg = with_segquant(_BASES[recipe.precision], alpha=recipe.smoothquant_alpha, realisation=recipe.realisation,
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
