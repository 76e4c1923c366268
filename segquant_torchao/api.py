"""torchao configs for SegQuant: ``SegQuantConfig`` (a whole model, from a plan) and ``SegLinearConfig``
(one Linear), with the registered handler ``_seg_linear_transform``.

``SegQuantConfig`` is an ``FqnToConfig`` that maps every planned layer to its ``SegLinearConfig``, so it
works both with ``quantize_(model, config, filter_fn=None)`` and with loaders that quantize one leaf
Linear at a time (diffusers' ``TorchAoConfig``), where the handler changes the Linear in place.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchao.quantization import FqnToConfig
from torchao.core.config import AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler

from segquant import PlanError, SegQuantError, SegQuantPlan
from segquant.numerics import ActivationStats

from .kernels import PRECISIONS
from .linear import LayerSpec, ObservedSegQuantLinear, SegQuantLinear, convert_linear, prepare_linear, \
    unprepare_linear

logger = logging.getLogger(__name__)

ACTIVATION_MODES = ("dynamic", "static")
STEPS = ("prepare", "convert")
REALISATIONS = ("folded", "split_k")
WEIGHT_GRANULARITIES = ("per_channel", "per_tensor")
KERNELS = ("naive", "fused")


class _Session:
    """Layers prepared by one ``SegQuantConfig``: lets convert check every layer before changing any,
    and lets a failing prepare undo the layers it already prepared."""

    def __init__(self) -> None:
        self.prepared: list[tuple[str, nn.Module]] = []
        self.checked = False


def _choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise SegQuantError(f"{what} must be one of {allowed}, got {value!r}")


@dataclass
class SegLinearConfig(AOBaseConfig):
    """Quantize one ``nn.Linear`` under its SegQuant plan entry.

    Args:
        name: module name, for messages.
        in_features, out_features: the layer's shape (checked against the module).
        in_segments: K sizes, each with its own activation scale.
        out_segments: N sizes, each with its own weight scale when ``weight_granularity="per_tensor"``.
        dual_scale_segments: indices of input segments quantized with DualScale.
        precision: ``"fp8"`` (e4m3, ``torch._scaled_mm``) or ``"int8"`` (``torch._int_mm``). Default fp8.
        activation: ``"dynamic"`` (per-token scales, no calibration; default) or ``"static"``.
        step: static only: ``"prepare"`` inserts observers, ``"convert"`` quantizes. Default convert.
        realisation: static input segments ``"folded"`` into the weight (one GEMM; default) or
            ``"split_k"`` (one GEMM per segment).
        weight_granularity: ``"per_channel"`` (default) or ``"per_tensor"`` (one scale per output segment).
        fast_accum: fp8 GEMMs with Hopper's fast accumulation (default True, as torchao's fp8 inference).
        kernel: ``"naive"`` (torch's GEMMs, DualScale with M doubled; default) or ``"fused"`` (the Triton
            DualScale GEMM and Triton int8 GEMM of ``triton_gemm.py``; a torch fallback off CUDA).
        amax, pos_amax, neg_amax: calibrated ranges per input segment; when given, a static convert
            needs no observers (e.g. inside ``from_pretrained``).
    """

    name: str = ""
    in_features: int = 0
    out_features: int = 0
    in_segments: list = field(default_factory=list)
    out_segments: list = field(default_factory=list)
    dual_scale_segments: list = field(default_factory=list)
    precision: str = "fp8"
    activation: str = "dynamic"
    step: str = "convert"
    realisation: str = "folded"
    weight_granularity: str = "per_channel"
    fast_accum: bool = True
    kernel: str = "naive"
    amax: list | None = None
    pos_amax: list | None = None
    neg_amax: list | None = None

    def __post_init__(self) -> None:
        _choice(self.precision, PRECISIONS, "precision")
        _choice(self.activation, ACTIVATION_MODES, "activation")
        _choice(self.step, STEPS, "step")
        _choice(self.realisation, REALISATIONS, "realisation")
        _choice(self.weight_granularity, WEIGHT_GRANULARITIES, "weight_granularity")
        _choice(self.kernel, KERNELS, "kernel")
        if self.activation == "dynamic" and self.step == "prepare":
            raise SegQuantError("dynamic activation scales need no prepare step; use step='convert'")

    def spec(self) -> LayerSpec:
        return LayerSpec(self.name or "<layer>", self.in_features, self.out_features,
                         tuple(self.in_segments or [self.in_features]),
                         tuple(self.out_segments or [self.out_features]), tuple(self.dual_scale_segments),
                         self.precision, self.activation, self.realisation, self.weight_granularity,
                         self.fast_accum, self.kernel)

    def stats(self) -> ActivationStats | None:
        """Calibrated ranges carried by the config, checked against the layer's segments."""
        given = [k for k in ("amax", "pos_amax", "neg_amax") if getattr(self, k) is not None]
        if not given:
            return None
        if len(given) != 3:
            raise SegQuantError(f"{self.name}: calibration needs amax, pos_amax and neg_amax, got only {given}")
        stats = ActivationStats(*(torch.tensor(getattr(self, k), dtype=torch.float32)
                                  for k in ("amax", "pos_amax", "neg_amax")))
        stats.check(self.spec().layer())
        return stats


@register_quantize_module_handler(SegLinearConfig)
def _seg_linear_transform(module: nn.Module, config: SegLinearConfig, *, parameter_name: str = "weight") -> nn.Module:
    spec = config.spec()
    session: _Session | None = getattr(config, "_session", None)
    if config.activation == "static" and config.step == "prepare":
        try:
            prepare_linear(module, spec)
        except SegQuantError:
            if session is not None:
                for _, done in session.prepared:
                    unprepare_linear(done)
                session.prepared.clear()
            raise
        if session is not None:
            module._segquant_session = session
            session.prepared.append((spec.name, module))
        return module
    stats = config.stats()
    if config.activation == "static" and stats is None:
        if not isinstance(module, ObservedSegQuantLinear):
            raise SegQuantError(f"{spec.name}: convert before prepare: run quantize_ with step='prepare', "
                                "calibrate, then step='convert' (or pass calibrated amax in the config)")
        prepared: _Session | None = getattr(module, "_segquant_session", None)
        if prepared is not None and not prepared.checked:
            missing = [name for name, m in prepared.prepared
                       if isinstance(m, ObservedSegQuantLinear) and m.segquant_observer.batches == 0]
            if missing:
                raise SegQuantError(f"calibration reached no data for {len(missing)} layer(s), e.g. "
                                    f"{', '.join(missing[:3])}: run the model on calibration inputs between "
                                    "prepare and convert; nothing was converted")
            prepared.checked = True
        stats = module.segquant_observer.stats()
    module.__dict__.pop("_segquant_session", None)
    return convert_linear(module, spec, stats)


def _as_plan(plan: Any) -> SegQuantPlan:
    if isinstance(plan, SegQuantPlan):
        return plan
    if isinstance(plan, (str, Path)):
        return SegQuantPlan.load(plan)
    if isinstance(plan, dict):
        return SegQuantPlan.from_dict(plan)
    raise SegQuantError(f"plan must be a SegQuantPlan, a plan dict or a path to a plan JSON, got {type(plan).__name__}")


@dataclass(init=False)
class SegQuantConfig(FqnToConfig):
    """SegQuant for a whole model: one ``SegLinearConfig`` per layer of a ``segquant`` plan.

    Example:
        >>> plan = segquant.analyze(model, **segquant.example_inputs(model))
        >>> quantize_(model, SegQuantConfig(plan), filter_fn=None)   # fp8, dynamic per-token
        >>> # static: prepare, calibrate, convert
        >>> quantize_(model, SegQuantConfig(plan, activation="static", step="prepare"), filter_fn=None)
        >>> for batch in calibration: model(**batch)
        >>> quantize_(model, SegQuantConfig(plan, activation="static", step="convert"), filter_fn=None)

    Args:
        plan: a ``SegQuantPlan``, its dict, or a path to a saved plan.
        precision, activation, step, realisation, weight_granularity, fast_accum, kernel: as in
            ``SegLinearConfig``.
        skip: globs of layer names left in high precision (e.g. ``["proj_out"]``).
        seg_linear, dual_scale: switch SegLinear / DualScale off everywhere (the ablation).
        calibration: ``{layer: {"amax": [...], "pos_amax": [...], "neg_amax": [...]}}`` from
            ``calibration_from(model)``; lets a static config convert a float model directly.
    """

    plan: Any = None
    precision: str = "fp8"
    activation: str = "dynamic"
    step: str = "convert"
    realisation: str = "folded"
    weight_granularity: str = "per_channel"
    fast_accum: bool = True
    kernel: str = "naive"
    skip: list = field(default_factory=list)
    seg_linear: bool = True
    dual_scale: bool = True
    calibration: dict | None = None

    def __init__(self, plan: Any = None, precision: str = "fp8", activation: str = "dynamic", step: str = "convert",
                 realisation: str = "folded", weight_granularity: str = "per_channel", fast_accum: bool = True,
                 kernel: str = "naive", skip: list | None = None,
                 seg_linear: bool = True, dual_scale: bool = True, calibration: dict | None = None,
                 fqn_to_config: Any = None, module_fqn_to_config: Any = None, version: int = 1) -> None:
        # fqn_to_config/module_fqn_to_config are derived from the plan; accepted for config_from_dict.
        self.plan, self.precision, self.activation, self.step = plan, precision, activation, step
        self.realisation, self.weight_granularity, self.fast_accum = realisation, weight_granularity, fast_accum
        self.kernel = kernel
        self.skip, self.seg_linear, self.dual_scale = list(skip or []), seg_linear, dual_scale
        self.calibration, self.version = calibration, version
        self.__post_init__()

    def __post_init__(self) -> None:
        if self.plan is None:
            raise SegQuantError("SegQuantConfig needs a plan: SegQuantConfig(segquant.analyze(model, ...))")
        plan = _as_plan(self.plan).ablate(seg_linear=self.seg_linear, dual_scale=self.dual_scale)
        self.plan = plan.to_dict()
        calibration = self.calibration or {}
        unknown = sorted(set(calibration) - set(plan.layers))
        if unknown:
            raise PlanError(f"calibration names layers that are not in the plan: {unknown[:3]}")
        for pattern in self.skip:
            if not plan.matching(pattern):
                raise PlanError(f"skip pattern {pattern!r} matches no layer of the plan")
        # one template carries (and validates) the options every layer shares, even if skip leaves no layer
        template = SegLinearConfig(precision=self.precision, activation=self.activation, step=self.step,
                                   realisation=self.realisation, weight_granularity=self.weight_granularity,
                                   fast_accum=self.fast_accum, kernel=self.kernel)
        self._session = _Session()
        layers: OrderedDict[str, AOBaseConfig] = OrderedDict()
        for name, layer in plan.layers.items():
            if any(fnmatch.fnmatchcase(name, p) for p in self.skip):
                continue
            stats = calibration.get(name, {})
            cfg = dataclasses.replace(template, name=name, in_features=layer.in_features,
                                      out_features=layer.out_features, in_segments=list(layer.in_segments),
                                      out_segments=list(layer.out_segments),
                                      dual_scale_segments=list(layer.dual_scale_segments), amax=stats.get("amax"),
                                      pos_amax=stats.get("pos_amax"), neg_amax=stats.get("neg_amax"))
            cfg._session = self._session
            layers[name] = cfg
        self.fqn_to_config = layers
        self.module_fqn_to_config = OrderedDict()
        super().__post_init__()

    def segquant_plan(self) -> SegQuantPlan:
        return SegQuantPlan.from_dict(self.plan)


def check_plan(model: nn.Module, plan: SegQuantPlan | SegQuantConfig) -> None:
    """Raise ``PlanError`` unless every planned layer exists in ``model`` with the planned shape."""
    plan = plan.segquant_plan() if isinstance(plan, SegQuantConfig) else plan
    if plan.model_class and plan.model_class != type(model).__name__:
        raise PlanError(f"the plan was made for {plan.model_class}, the model is a {type(model).__name__}: "
                        "re-run segquant.analyze on this model")
    modules = dict(model.named_modules())
    for name, layer in plan.layers.items():
        if name not in modules:
            raise PlanError(f"{name}: in the plan but not in {type(model).__name__}; the plan belongs to "
                            f"{plan.model_class or 'another model'}: re-run segquant.analyze on this model")
        layer.check_module(modules[name])


def quantize(model: nn.Module, config: SegQuantConfig) -> nn.Module:
    """``quantize_(model, config, filter_fn=None)`` after checking the whole plan (and any calibration the
    config carries) against the model, so that a mismatch leaves the model unchanged."""
    from torchao.quantization import quantize_

    if not isinstance(config, SegQuantConfig):
        raise SegQuantError(f"expected a SegQuantConfig, got {type(config).__name__}")
    check_plan(model, config)
    for layer_config in config.fqn_to_config.values():
        layer_config.stats()  # calibration carried by the config must fit every layer before any changes
    quantize_(model, config, filter_fn=None)
    return model


def calibration_from(model: nn.Module) -> dict[str, dict[str, list[float]]]:
    """The calibrated ranges of every observed layer, for ``SegQuantConfig(calibration=...)``."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, ObservedSegQuantLinear):
            stats = module.segquant_observer.stats()
            out[name] = {"amax": stats.amax.tolist(), "pos_amax": stats.pos_amax.tolist(),
                         "neg_amax": stats.neg_amax.tolist()}
    if not out:
        raise SegQuantError("no observed layers: run quantize_ with step='prepare' and calibrate first")
    return out


def quantized_layers(model: nn.Module) -> dict[str, SegQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SegQuantLinear)}
