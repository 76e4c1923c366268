"""torchao configs for SegQuant: ``SegQuantConfig`` (a whole model, from a plan) and ``SegLinearConfig``
(one Linear), with the registered handler ``_seg_linear_transform``.

``SegQuantConfig`` is an ``FqnToConfig`` that maps every quantized layer of the plan to its ``SegLinearConfig``
(layers the plan keeps in high precision are left out), so it works both with
``quantize_(model, config, filter_fn=None)`` and with loaders that quantize one leaf Linear at a time
(diffusers' ``TorchAoConfig``), where the handler changes the Linear in place. Configs are plain data. A whole
model converts all or nothing: ``quantize()`` in one transaction, a direct ``quantize_`` through ``_Journal``.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization import FqnToConfig
from torchao.utils import TorchAOBaseTensor
from torchao.quantization.transform_module import _QUANTIZE_CONFIG_HANDLER, register_quantize_module_handler

from segquant import PRECISIONS, LinearPlan, PlanError, SegQuantError, SegQuantPlan
from segquant.calib import check_calibration, layer_alpha
from segquant.numerics import ActivationStats
from segquant.options import SHIFTS, check_choice
from segquant.transaction import ModelSnapshot, model_transaction

from .diffusers_io import attach_quantization_config, is_diffusers_model
from .kernels import PRECISIONS as KERNEL_PRECISIONS
from .linear import Calibration, check_linear, convert_linear, observed, observed_calibration, prepare_linear, \
    unprepare_linear
from .options import SegQuantOptions
from .plain import plain_config
from .tensor import SegLinearSpec, SegQuantTensor

logger = logging.getLogger(__name__)

STEPS = ("prepare", "convert")
ANY_MODULE = "re:.*"  # matched after every exact name (torchao deprecates "_default")
_CALIBRATION_KEYS = ("amax", "pos_amax", "neg_amax")


@dataclass
class SegLinearConfig(AOBaseConfig):
    """Quantize one ``nn.Linear`` under its SegQuant plan entry.

    Args:
        name: module name, for messages.
        in_features, out_features: the layer's shape (checked against the module).
        in_segments: K sizes, each with its own activation scale.
        out_segments: N sizes, each with its own weight scale when ``weight_granularity="per_tensor"``.
        dual_scale_segments: indices of input segments quantized with DualScale.
        options: ``SegQuantOptions`` (precision, activation, realisation, ...).
        step: ``"prepare"`` inserts observers, ``"convert"`` quantizes (default). Static layers, and dynamic
            ones with a shift (their centres come from calibration).
        shift: activation shift ``"per_tensor"`` / ``"per_channel"`` on ``shift_segments`` (input segment
            indices; empty = all), or None (default): the layer quantizes ``x - c`` and its bias becomes
            ``b + W_hat c``.
        smoothquant_alpha: this layer's SmoothQuant alpha (the plan's, from an alpha search); None (default) =
            the options' alpha.
        amax, pos_amax, neg_amax: calibrated ranges per input segment (of the smoothed, shifted input); when
            given, a convert needs no observers (e.g. inside ``from_pretrained``). Per-segment SmoothQuant: one
            row per output segment (of that segment's smoothed input).
        smooth: the SmoothQuant factors per input channel that go with them (per-segment: one row per output
            segment).
        center: a shifted layer's centres, one per input channel (of the smoothed input).
    """

    name: str = ""
    in_features: int = 0
    out_features: int = 0
    in_segments: list = field(default_factory=list)
    out_segments: list = field(default_factory=list)
    dual_scale_segments: list = field(default_factory=list)
    options: SegQuantOptions = field(default_factory=SegQuantOptions)
    step: str = "convert"
    shift: str | None = None
    shift_segments: list = field(default_factory=list)
    smoothquant_alpha: float | None = None
    amax: list | None = None
    pos_amax: list | None = None
    neg_amax: list | None = None
    smooth: list | None = None
    center: list | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.options, SegQuantOptions):
            raise SegQuantError(f"options must be a SegQuantOptions, got {type(self.options).__name__}")
        check_choice(self.step, STEPS, "step")
        name = self.name or "<layer>"
        if self.shift is not None:
            check_choice(self.shift, SHIFTS, f"{name}: shift")
        if self.options.activation == "dynamic" and self.step == "prepare" and self.shift is None:
            raise SegQuantError("dynamic activation scales need no prepare step (only a shifted layer's centres "
                                "do); use step='convert'")
        if self.options.smoothing == "per_segment" and self.shift is not None:
            raise SegQuantError(f"{name}: per-segment SmoothQuant (smoothing='per_segment') has no activation shift; "
                                "drop the shift from the plan (plan.ablate(shift=False)) or use "
                                "smoothing='per_layer'")
        if self.options.activation == "dynamic" and self.smoothquant_alpha is not None:
            raise SegQuantError(f"{name}: the plan's smoothquant_alpha {self.smoothquant_alpha} needs calibrated "
                                "static activations; these are dynamic: use a static precision or drop the "
                                "layer's smoothquant_alpha")

    def spec(self) -> SegLinearSpec:
        """The layer's ``SegLinearSpec``; its options carry this layer's SmoothQuant alpha (``layer_alpha``)."""
        in_segments = tuple(self.in_segments or [self.in_features])
        alpha = layer_alpha(LinearPlan(self.in_features, self.out_features, smoothquant_alpha=self.smoothquant_alpha),
                            self.options.smoothquant_alpha)
        options = self.options if alpha == self.options.smoothquant_alpha else \
            self.options.replace(smoothquant_alpha=alpha)
        shift_segments = tuple(self.shift_segments) or tuple(range(len(in_segments)) if self.shift else ())
        return SegLinearSpec(self.name or "<layer>", self.in_features, self.out_features, in_segments,
                             tuple(self.out_segments or [self.out_features]), tuple(self.dual_scale_segments),
                             options, self.shift, shift_segments)

    def calibration(self) -> tuple[Calibration, torch.Tensor | None] | None:
        """Calibrated ranges (and SmoothQuant factors, shift centres) carried by the config, checked against
        the layer; with per-segment SmoothQuant one ``ActivationStats`` per output segment."""
        given = [k for k in _CALIBRATION_KEYS if getattr(self, k) is not None]
        if not given:
            return None
        if len(given) != 3:
            raise SegQuantError(f"{self.name}: calibration needs amax, pos_amax and neg_amax, got only {given}")
        spec = self.spec()
        smooth = None if self.smooth is None else torch.tensor(self.smooth, dtype=torch.float32)
        alpha = spec.options.smoothquant_alpha
        factors = (len(spec.blocks), self.in_features) if spec.tiled else (self.in_features,)
        if (smooth is None) == (alpha is not None) or (smooth is not None and smooth.shape != factors):
            want = factors if alpha is not None else None
            raise SegQuantError(f"{self.name}: the calibration's SmoothQuant factors do not fit the options "
                                f"(alpha {alpha}, smoothing {spec.options.smoothing}: factors {want}, got "
                                f"{None if smooth is None else tuple(smooth.shape)}); calibrate again")
        ranges = [torch.tensor(getattr(self, k), dtype=torch.float32) for k in _CALIBRATION_KEYS]
        if spec.tiled:
            return self._block_calibration(spec, ranges), smooth
        center = None if self.center is None else torch.tensor(self.center, dtype=torch.float32)
        stats = ActivationStats(*ranges, center=center)
        stats.check(spec.layer())
        return stats, smooth

    def _block_calibration(self, spec: SegLinearSpec, ranges: list[torch.Tensor]) -> list[ActivationStats]:
        """Per-segment SmoothQuant's ranges: ``(B, S)`` each, one row per output segment; no shift centres."""
        shape = (len(spec.blocks), len(spec.in_segments))
        if self.center is not None or any(r.shape != shape for r in ranges):
            got = ", ".join(f"{k} {tuple(r.shape)}" for k, r in zip(_CALIBRATION_KEYS, ranges))
            raise SegQuantError(f"{self.name}: per-segment SmoothQuant calibration holds {shape[0]} x {shape[1]} "
                                f"ranges (output x input segments) and no centre; got {got}"
                                f"{', a centre' if self.center is not None else ''}; calibrate again")
        stats = [ActivationStats(*(r[b] for r in ranges)) for b in range(shape[0])]
        for st in stats:
            st.check(spec.layer())
        return stats


@dataclass
class _Journal:
    """A direct ``quantize_(model, SegQuantConfig(...))`` as one transaction: the root entry snapshots the model
    (it is visited first) and the layer handlers count down; the first layer that fails (Ctrl-C included) puts
    the whole model back before the error propagates. ``segquant_torchao.quantize`` runs its own transaction."""

    snapshot: ModelSnapshot
    modules: dict[int, nn.Module]
    remaining: int

    def covers(self, module: nn.Module) -> bool:
        return self.modules.get(id(module)) is module


_journal: _Journal | None = None


def _start_journal(model: nn.Module, layers: int) -> None:
    global _journal
    _journal = _Journal(ModelSnapshot(model), {id(m): m for m in model.modules()}, layers) if layers else None


def _journaled(module: nn.Module, step: Any) -> nn.Module:
    """``step()`` for one layer; on failure the journal's model is restored, on the last layer it is dropped."""
    global _journal
    journal = _journal if _journal is not None and _journal.covers(module) else None
    try:
        result = step()
    except BaseException:
        if journal is not None:
            _journal = None
            journal.snapshot.restore()
        raise
    if journal is not None:
        journal.remaining -= 1
        if journal.remaining <= 0:
            _journal = None
    return result


@register_quantize_module_handler(SegLinearConfig)
def _seg_linear_transform(module: nn.Module, config: SegLinearConfig, *, parameter_name: str = "weight") -> nn.Module:
    return _journaled(module, lambda: _transform_linear(module, config, parameter_name))


def _transform_linear(module: nn.Module, config: SegLinearConfig, parameter_name: str) -> nn.Module:
    if parameter_name != "weight":
        raise SegQuantError(f"{config.name}: SegQuant quantizes a Linear's weight, not {parameter_name!r}")
    spec = config.spec()
    if config.step == "prepare":  # static, or a dynamic layer's shift (SegLinearConfig checks which)
        return prepare_linear(module, spec)
    if config.options.activation == "dynamic" and spec.shift is None:
        return _convert(module, spec, None, None)
    carried = config.calibration()
    if carried is not None:
        return _convert(module, spec, *carried)
    if not observed(module):
        raise SegQuantError(f"{spec.name}: convert before prepare{_why_calibrate(spec)}: run quantize_ with "
                            "step='prepare', calibrate, then step='convert' (or pass calibrated amax in the config)")
    return _convert(module, spec, *observed_calibration(module.segquant_observer, module.weight, spec))


def _why_calibrate(spec: SegLinearSpec) -> str:
    """Why a dynamic layer needs calibration: its shift's centres come from it."""
    if spec.options.activation == "dynamic":
        return f" (the layer's activation shift, {spec.shift}, takes its centres from calibration)"
    return ""


def _convert(module: nn.Module, spec: SegLinearSpec, stats: Calibration | None,
             smooth: torch.Tensor | None) -> nn.Module:
    """A plain layer that torchao's own configs express gets their tensor and kernel; the rest a SegQuantTensor."""
    torchao_config = plain_config(spec, module.weight.device)
    if torchao_config is None:
        return convert_linear(module, spec, stats, smooth)
    check_linear(module, spec.layer())
    unprepare_linear(module)
    return _QUANTIZE_CONFIG_HANDLER[type(torchao_config)](module, torchao_config)


@dataclass
class SegQuantModelCheck(AOBaseConfig):
    """The root entry (``""``) of a ``SegQuantConfig``: ``quantize_`` visits the root module first, so its
    handler checks the whole plan (and, for a static convert, every layer's calibration) before any layer
    changes."""

    plan: dict = field(default_factory=dict)
    options: SegQuantOptions = field(default_factory=SegQuantOptions)
    step: str = "convert"
    calibrated: list = field(default_factory=list)


def _check_model(model: nn.Module, config: SegQuantModelCheck) -> SegQuantPlan:
    """Raise unless the plan fits ``model`` (and a static convert's calibration is usable); returns the plan."""
    plan = SegQuantPlan.from_dict(config.plan)
    plan.check_model(model, complete=True)
    modules = dict(model.named_modules())
    for name in plan.quantized_layers():
        check_linear(modules[name], plan[name])
    if config.step == "convert":
        _check_calibrated(model, _calibrated_layers(plan, config.options), set(config.calibrated),
                          config.options.activation)
    return plan


def _calibrated_layers(plan: SegQuantPlan, options: SegQuantOptions) -> list[str]:
    """The layers a convert calibrates: every quantized one (static), the shifted ones (dynamic)."""
    return plan.quantized_layers() if options.activation == "static" else plan.shifted()


@register_quantize_module_handler(SegQuantModelCheck)
def _check_model_transform(module: nn.Module, config: SegQuantModelCheck, **_: Any) -> nn.Module:
    """Check everything first; a diffusers model being converted is marked quantized (``diffusers_io``) so
    that ``save_pretrained`` writes its 8-bit weights."""
    plan = _check_model(module, config)
    visited = plan.shifted() if config.step == "prepare" and config.options.activation == "dynamic" \
        else plan.quantized_layers()
    _start_journal(module, len(visited))
    if config.step == "convert" and is_diffusers_model(module):
        attach_quantization_config(module, SegQuantConfig(plan, options=config.options))
    return module


@dataclass
class UnplannedLinear(AOBaseConfig):
    """The catch-all entry (``"re:.*"``) of a ``SegQuantConfig``: a Linear the plan does not name means the plan
    belongs to another model (loaders such as diffusers' visit one Linear at a time and never the root). Other
    modules pass through."""

    model_class: str = ""


@register_quantize_module_handler(UnplannedLinear)
def _unplanned_linear(module: nn.Module, config: UnplannedLinear, *, parameter_name: str = "weight") -> nn.Module:
    if not isinstance(module, nn.Linear):
        return module
    raise PlanError(f"a Linear ({getattr(module, 'in_features', '?')} -> {getattr(module, 'out_features', '?')}) "
                    f"that the plan of {config.model_class or 'this model'} does not name: the plan belongs to "
                    "another model; re-run segquant.analyze on this model")


def _as_plan(plan: Any) -> SegQuantPlan:
    if isinstance(plan, SegQuantPlan):
        return plan
    if isinstance(plan, (str, Path)):
        if not Path(plan).is_file():
            raise PlanError(f"plan file {plan} does not exist (write one with segquant analyze --json)")
        return SegQuantPlan.load(plan)
    if isinstance(plan, dict):
        return SegQuantPlan.from_dict(plan)
    raise SegQuantError(f"plan must be a SegQuantPlan, a plan dict or a path to a plan JSON, got {type(plan).__name__}")


def _options_for(plan: SegQuantPlan, options: SegQuantOptions | None, changes: dict[str, Any]) -> SegQuantOptions:
    """The options of a config: given, else those of the plan's precision (applied plans), else the defaults.
    ``precision`` may also name a registry precision (``int8_w8a8`` ...). Options that contradict an applied
    plan's precision are refused."""
    if options is not None and changes:
        raise SegQuantError(f"pass either options=SegQuantOptions(...) or option keywords {sorted(changes)}")
    if options is not None and not isinstance(options, SegQuantOptions):
        raise SegQuantError(f"options must be a SegQuantOptions, got {type(options).__name__}")
    named = changes.get("precision")  # "fp8"/"int8" are GEMM formats here; "int8_w8a8" ... registry names
    registry = named if named in PRECISIONS and named not in KERNEL_PRECISIONS else None
    precision = plan.precision() or registry
    if registry is not None:
        changes = {k: v for k, v in changes.items() if k != "precision"}
    fixed = ("precision", "activation", "weight_granularity")  # what a registry precision decides
    try:
        if options is None and precision is None:  # all at once: static-only options need activation='static'
            options = SegQuantOptions(**changes)
        elif options is None:
            rest = {k: v for k, v in changes.items() if k not in fixed}
            options = SegQuantOptions.for_precision(precision, **rest)
            options = options.replace(**{k: v for k, v in changes.items() if k in fixed})
    except TypeError as e:
        raise SegQuantError(f"SegQuantConfig: {e}; options are the fields of SegQuantOptions") from None
    if precision is not None:
        wanted = SegQuantOptions.for_precision(precision)
        if any(getattr(options, k) != getattr(wanted, k) for k in fixed):
            want = ", ".join(f"{k}={getattr(wanted, k)}" for k in fixed)
            got = ", ".join(f"{k}={getattr(options, k)}" for k in fixed)
            raise SegQuantError(f"the plan's precision {precision} is {want}; the options say {got}")
    return options


def _check_config_args(skip: Any, seg_linear: Any, dual_scale: Any, calibration: Any) -> None:
    if skip is not None and (isinstance(skip, str) or not isinstance(skip, (list, tuple))
                             or not all(isinstance(g, str) for g in skip)):
        raise SegQuantError(f"skip must be a list of layer-name globs, got {skip!r}")
    for key, value in (("seg_linear", seg_linear), ("dual_scale", dual_scale)):
        if not isinstance(value, bool):
            raise SegQuantError(f"{key} must be True or False, got {value!r}")
    if calibration is not None and (not isinstance(calibration, dict) or not all(
            isinstance(v, dict) for v in calibration.values())):
        raise SegQuantError("calibration maps layer names to {'amax': [...], 'pos_amax': [...], 'neg_amax': [...]} "
                            "(and 'smooth', 'center' where they apply; calibration_from(model))")


@dataclass(init=False)
class SegQuantConfig(FqnToConfig):
    """SegQuant for a whole model: one ``SegLinearConfig`` per quantized layer of a ``segquant`` plan.

    Example:
        >>> plan = segquant.analyze(model, **segquant.example_inputs(model))
        >>> quantize_(model, SegQuantConfig(plan), filter_fn=None)   # fp8, dynamic per-token
        >>> # static: prepare, calibrate, convert
        >>> quantize_(model, SegQuantConfig(plan, activation="static", step="prepare"), filter_fn=None)
        >>> for batch in calibration: model(**batch)
        >>> quantize_(model, SegQuantConfig(plan, activation="static", step="convert"), filter_fn=None)
        >>> # a plan with an activation shift (plan.with_shift("per_tensor")) calibrates the same way, also
        >>> # with dynamic activations (the centres come from calibration; only shifted layers are prepared)

    Args:
        plan: a ``SegQuantPlan``, its dict, or a path to a saved plan. Its high-precision layers are left
            alone; an applied plan's precision gives the default options.
        options: ``SegQuantOptions``; or pass its fields as keywords (``precision="int8"``, ...).
        step: ``"prepare"`` or ``"convert"``: static, or dynamic with shifted layers (only those are prepared).
        skip: globs of layer names also kept in high precision (applied to the plan).
        seg_linear, dual_scale: switch SegLinear / DualScale off everywhere (``plan.ablate``).
        calibration: ``{layer: {"amax": [...], "pos_amax": [...], "neg_amax": [...], "smooth": [...],
            "center": [...]}}`` from ``calibration_from(model)``; lets a static config (or a dynamic one with
            shifted layers) convert a float model directly.
    """

    plan: Any = None
    options: SegQuantOptions | None = None
    step: str = "convert"
    skip: list = field(default_factory=list)
    seg_linear: bool = True
    dual_scale: bool = True
    calibration: dict | None = None

    def __init__(self, plan: Any = None, options: SegQuantOptions | None = None, step: str = "convert",
                 skip: list | None = None, seg_linear: bool = True, dual_scale: bool = True,
                 calibration: dict | None = None, fqn_to_config: Any = None, module_fqn_to_config: Any = None,
                 version: int = 1, **option_changes: Any) -> None:
        # fqn_to_config/module_fqn_to_config are derived from the plan; accepted for config_from_dict.
        if plan is None:
            raise SegQuantError("SegQuantConfig needs a plan: SegQuantConfig(segquant.analyze(model, ...))")
        _check_config_args(skip, seg_linear, dual_scale, calibration)
        given = _as_plan(plan)
        resolved = given.ablate(seg_linear=seg_linear, dual_scale=dual_scale).keep_high_precision(skip or [])
        if given.applied and resolved != given:
            raise SegQuantError("the plan was applied by a recipe; skip, seg_linear and dual_scale would change it: "
                                "set them in the recipe (or on the analysed plan) instead")
        self.plan, self.step, self.skip = resolved.to_dict(), step, list(skip or [])
        self.options = _options_for(resolved, options, option_changes)
        self.seg_linear, self.dual_scale, self.calibration, self.version = seg_linear, dual_scale, calibration, version
        self.fqn_to_config = self._layer_configs(resolved)
        super().__post_init__()

    # The per-layer map is derived from the plan: kept out of the instance's public attributes, so that
    # config_to_dict (diffusers' config.json) stores the plan and options once, not every layer's config.
    @property
    def fqn_to_config(self) -> OrderedDict[str, AOBaseConfig | None]:
        return self._fqn_to_config

    @fqn_to_config.setter
    def fqn_to_config(self, value: OrderedDict[str, AOBaseConfig | None]) -> None:
        self._fqn_to_config = value

    module_fqn_to_config = fqn_to_config  # torchao's older name for the same map

    def _layer_configs(self, plan: SegQuantPlan) -> OrderedDict[str, AOBaseConfig | None]:
        """The root check, one ``SegLinearConfig`` per quantized layer, ``None`` (left alone) per
        high-precision layer, and ``UnplannedLinear`` for anything else (it refuses unplanned Linears)."""
        calibration = self.calibration or {}
        unknown = sorted(set(calibration) - set(plan.quantized_layers()))
        if unknown:
            raise PlanError(f"calibration names layers that the plan does not quantize: {unknown[:3]}")
        # checks the shared options even if no layer is left (a dynamic prepare needs a shifted layer)
        shifted = plan.shifted()
        SegLinearConfig(name=shifted[0] if shifted else "", options=self.options, step=self.step,
                        shift=SHIFTS[0] if shifted else None)
        layers: OrderedDict[str, AOBaseConfig | None] = OrderedDict()
        layers[""] = SegQuantModelCheck(plan=plan.to_dict(), options=self.options, step=self.step,
                                        calibrated=sorted(calibration))
        for name in plan.quantized_layers():
            layers[name] = self._layer_config(name, plan[name], calibration.get(name, {}))
        for name in plan.high_precision_layers():
            layers[name] = None
        layers[ANY_MODULE] = UnplannedLinear(model_class=plan.model_class)
        return layers

    def _layer_config(self, name: str, layer: LinearPlan, stats: dict) -> SegLinearConfig | None:
        """One layer's config; None (left alone) for an unshifted layer in a dynamic prepare."""
        if self.step == "prepare" and self.options.activation == "dynamic" and layer.shift is None:
            return None
        return SegLinearConfig(
            name=name, in_features=layer.in_features, out_features=layer.out_features,
            in_segments=list(layer.in_segments), out_segments=list(layer.out_segments),
            dual_scale_segments=list(layer.dual_scale_segments), options=self.options, step=self.step,
            shift=layer.shift, shift_segments=list(layer.shift_segments), smoothquant_alpha=layer.smoothquant_alpha,
            amax=stats.get("amax"), pos_amax=stats.get("pos_amax"), neg_amax=stats.get("neg_amax"),
            smooth=stats.get("smooth"), center=stats.get("center"))

    def layer_configs(self) -> dict[str, SegLinearConfig]:
        """The per-layer configs of the quantized layers (without the root check and the fallbacks)."""
        return {k: v for k, v in self.fqn_to_config.items() if isinstance(v, SegLinearConfig)}

    def segquant_plan(self) -> SegQuantPlan:
        return SegQuantPlan.from_dict(self.plan)


def check_plan(model: nn.Module, plan: SegQuantPlan | SegQuantConfig) -> None:
    """Raise ``PlanError`` unless every planned layer exists in ``model`` with the planned shape."""
    (plan.segquant_plan() if isinstance(plan, SegQuantConfig) else plan).check_model(model)


def _check_calibrated(model: nn.Module, names: list[str], calibrated: set[str], activation: str = "static") -> None:
    """A convert from observers (static, or a dynamic layer's shift): every layer in ``names`` must be prepared
    and have seen usable data, before any changes (``segquant.calib.check_calibration``)."""
    modules = dict(model.named_modules())
    observers = {}
    for name in names:
        if name in calibrated:
            continue
        if not observed(modules[name]):
            why = (" (its activation shift takes the centres from calibration, also with dynamic scales)"
                   if activation == "dynamic" else "")
            raise SegQuantError(f"{name}: convert before prepare{why}: run quantize with step='prepare', "
                                "calibrate, then step='convert' (or pass calibration=calibration_from(model))")
        observers[name] = modules[name].segquant_observer
    check_calibration(observers)


def quantize(model: nn.Module, config: SegQuantConfig) -> nn.Module:
    """``quantize_(model, config, filter_fn=None)`` as one transaction: the whole plan (and any calibration
    the config carries, and for a static convert every layer's observations) is checked against the model
    first, and a step that fails half-way is undone, so that a failure leaves the model unchanged."""
    from torchao.quantization import quantize_

    global _journal
    if not isinstance(config, SegQuantConfig):
        raise SegQuantError(f"expected a SegQuantConfig, got {type(config).__name__}")
    _journal = None  # this call is its own transaction
    check = config.fqn_to_config[""]
    plan = _check_model(model, check)
    run = copy.copy(config)  # the same layers without the root entry: checked above, marked only on success
    run.fqn_to_config = OrderedDict(config.fqn_to_config, **{"": None})
    with model_transaction(model):  # weights, observers and torchao's per-instance patches, all or nothing
        quantize_(model, run, filter_fn=None)
    if config.step == "convert" and is_diffusers_model(model):
        attach_quantization_config(model, SegQuantConfig(plan, options=check.options))
    return model


def calibration_from(model: nn.Module) -> dict[str, dict[str, list[float]]]:
    """The calibrated ranges (and SmoothQuant factors, shift centres) of every observed layer, for
    ``SegQuantConfig(calibration=...)``."""
    check_calibration({name: m.segquant_observer for name, m in model.named_modules() if observed(m)})
    out = {name: _calibration_entry(*observed_calibration(m.segquant_observer, m.weight, m.segquant_spec))
           for name, m in model.named_modules() if observed(m)}
    if not out:
        raise SegQuantError("no observed layers: run quantize_ with step='prepare' and calibrate first")
    return out


def _calibration_entry(stats: Calibration, smooth: torch.Tensor | None) -> dict[str, list]:
    """One layer's calibration as plain lists (per-segment SmoothQuant: one row per output segment)."""
    if isinstance(stats, ActivationStats):
        entry = {k: getattr(stats, k).tolist() for k in _CALIBRATION_KEYS}
        if stats.center is not None:
            entry["center"] = stats.center.tolist()
    else:
        entry = {k: torch.stack([getattr(st, k) for st in stats]).tolist() for k in _CALIBRATION_KEYS}
    if smooth is not None:
        entry["smooth"] = smooth.tolist()
    return entry


def quantized_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linears whose weight SegQuant quantized: ``SegQuantTensor`` weights and, for plain layers, torchao's
    own quantized tensors."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and isinstance(m.weight, TorchAOBaseTensor)}


def segquant_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linears whose weight is a ``SegQuantTensor``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and isinstance(m.weight, SegQuantTensor)}
