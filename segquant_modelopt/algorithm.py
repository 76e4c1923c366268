"""The ModelOpt calibration algorithm ``"segquant"``: quantize by a SegQuant plan, calibrate per segment and
per sign, optionally smooth (SmoothQuant), and set the quantizers.

Used through a config: ``{"quant_cfg": [...], "algorithm": {"method": "segquant", "plan": plan.to_dict()}}``.
The applied plan (``Recipe.apply``) is the contract: its high-precision layers keep their quantizers off, the
others get exactly its segments and DualScale. Without a plan (a bare ``mtq.quantize(model, SEGQUANT_CFG,
loop)``) the algorithm analyses the model on the first calibration batch, once.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn
from modelopt.torch.opt.config import ModeloptField
from modelopt.torch.opt.conversion import ModeloptStateManager
from modelopt.torch.quantization.config import QuantizeAlgorithmConfig
from modelopt.torch.quantization.mode import BaseCalibrateModeDescriptor, CalibrateModeRegistry
from modelopt.torch.quantization.model_calib import max_calibrate
from modelopt.torch.quantization.nn import SequentialQuantizer, TensorQuantizer
from modelopt.torch.quantization.nn.modules.quant_module import QuantModule

from segquant import AnalysisOptions, LinearPlan, SegmentAmaxObserver, SegQuantError, SegQuantPlan, analyze, \
    example_inputs, get_precision
from segquant.calib import check_calibration, layer_alpha, static_calibration
from segquant.numerics import QuantFormat, expand_segments, fold_activation_scales, get_format, weight_amax
from segquant.options import DEFAULT_REALISATION, DEFAULT_SCALE_FORM, DEFAULT_SMOOTHING, REALISATIONS, SCALE_FORMS, \
    SMOOTHINGS
from segquant.recording import record_linears
from segquant.transaction import ModelSnapshot

from .quantizer import format_of, is_marked, mark
from .segment_smoothing import apply_reference, is_reference_arithmetic, reference_settings

logger = logging.getLogger(__name__)


class SegQuantCalibConfig(QuantizeAlgorithmConfig):
    """The ``segquant`` calibration algorithm: SegLinear + DualScale on top of max calibration."""

    method: Literal["segquant"] = ModeloptField("segquant", title="SegQuant calibration.",
                                                description="SegLinear segments and DualScale from graph analysis.")
    seg_linear: bool | None = ModeloptField(
        default=None, title="SegLinear on/off.",
        description="Give each input/output segment its own scale. None: on when analysing, as the plan says "
                    "when one is given; False switches it off (plan.ablate) either way.")
    dual_scale: bool | None = ModeloptField(
        default=None, title="DualScale on/off.",
        description="Separate negative-side scales for SiLU/GELU-fed inputs; None/False as for seg_linear.")
    realisation: Literal[REALISATIONS] = ModeloptField(
        default=DEFAULT_REALISATION, title="Input segments realisation.",
        description="split_k: per-K activation amax (exact); folded: scales folded into the weight, one "
                    "per-tensor activation scale (pre_quant_scale), the TensorRT-friendly form.")
    alpha: float | None = ModeloptField(default=None, title="SmoothQuant alpha.",
                                        description="None = no smoothing; the paper uses 0.5.")
    overrides: dict = ModeloptField(default={}, title="Plan overrides.",
                                    description="{glob: {field: value}} applied to the plan (LinearPlan fields).")
    head_segments: bool = ModeloptField(default=False, title="One input segment per attention head.",
                                        description="See segquant.AnalysisOptions.head_segments.")
    keep_degenerate: bool = ModeloptField(
        default=False, title="Keep degenerate layers in high precision.",
        description="Layers that calibration never reached, or whose range is zero on an input segment, stay in "
                    "high precision (a warning names them) instead of being an error.")
    smoothing: Literal[SMOOTHINGS] = ModeloptField(
        default=DEFAULT_SMOOTHING, title="SmoothQuant granularity.",
        description="per_layer, or per_segment (the paper's reference code: one factor set, weight scale and input "
                    "scale per output segment; one weight scale per input segment). See segquant.reference_mode.")
    scale_form: Literal[SCALE_FORMS] = ModeloptField(
        default=DEFAULT_SCALE_FORM, title="Scale form.",
        description="step: q = round(x / s); reciprocal: q = round(x * r), x_hat = q / r (the reference code's).")
    show_progress: bool = ModeloptField(default=True, title="Progress bar.",
                                        description="Show a tqdm bar over calibration batches.")
    plan: dict | None = ModeloptField(default=None, title="The applied plan.",
                                      description="SegQuantPlan.to_dict() (normally Recipe.apply's) quantized "
                                      "exactly as it says, instead of analysing the first batch.")


class _FirstBatch(Exception):
    """Stops the forward loop once the first batch's inputs are captured."""


def _quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and isinstance(getattr(m, "input_quantizer", None), TensorQuantizer)
            and isinstance(getattr(m, "weight_quantizer", None), TensorQuantizer)}


@contextlib.contextmanager
def _quantizers_off(model: nn.Module):
    quantizers = [m for m in model.modules() if isinstance(m, TensorQuantizer)]
    states = [q._disabled for q in quantizers]
    for q in quantizers:
        q._disabled = True
    try:
        yield
    finally:
        for q, disabled in zip(quantizers, states):
            q._disabled = disabled


def _run_loop(forward_loop: Callable, model: nn.Module, what: str) -> None:
    try:
        forward_loop(model)
    except (_FirstBatch, SegQuantError):
        raise
    except Exception as e:  # noqa: BLE001 - the user's loop failed: say so, keep the cause
        raise SegQuantError(f"forward_loop raised {type(e).__name__} during {what}: {e}") from e


def _first_batch(model: nn.Module, forward_loop: Callable) -> tuple[tuple, dict]:
    captured: dict[str, Any] = {}

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.update(args=args, kwargs=kwargs)
        raise _FirstBatch

    handle = model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            _run_loop(forward_loop, model, "graph analysis")
    except _FirstBatch:
        pass
    finally:
        handle.remove()
    if not captured:
        raise SegQuantError(f"forward_loop never called {type(model).__name__}; it must run the model on "
                            "calibration inputs, e.g. `def forward_loop(m): [m(**batch) for batch in data]`")
    return captured["args"], captured["kwargs"]


def _format(quantizer: TensorQuantizer, name: str) -> QuantFormat:
    """The number format of a static input quantizer: INT8, FP8 e4m3, or INT6 (W8A6 studies; simulated in
    PyTorch, not an ONNX/TensorRT format)."""
    fmt = format_of(quantizer)
    if fmt is None or fmt.name not in ("int8", "int6", "fp8_e4m3"):
        raise SegQuantError(f"{name}: SegQuant supports INT8, INT6 and FP8 (e4m3) input quantizers, got "
                            f"num_bits={quantizer.num_bits}")
    return fmt


@dataclass
class _LayerSettings:
    weight: Tensor
    weight_amax: Tensor
    input_amax: Tensor
    pre_quant_scale: Tensor | None
    neg_amax: Tensor | None
    dual_mask: Tensor | None
    layer: LinearPlan | None = None
    per_channel: bool = False
    stats: Any = None  # per-segment ranges of the smoothed input, for the reference fake quantization
    smooth: Tensor | None = None
    folded: bool = False


def _settings(name: str, module: nn.Module, layer: LinearPlan, observer: SegmentAmaxObserver, realisation: str,
              alpha: float | None) -> _LayerSettings:
    """Quantizer settings of one layer. ModelOpt's scale is ``amax / qmax``, so every SegQuant scale s
    (``segquant.numerics``: per segment, ``s+``/``s-`` on DualScale segments) is set as ``amax = s * qmax``."""
    fmt = _format(module.input_quantizer, name)
    w = module.weight.detach().float()
    stats, smooth = static_calibration(observer, w, layer_alpha(layer, alpha))  # stats.center: the shift
    act_scale, neg_scale = stats.scales(layer, fmt)
    segs = layer.in_segments
    dual = layer.dual_scale_segments if layer.dual_scale else ()
    is_dual = torch.tensor([i in dual for i in range(len(segs))], device=w.device)
    dual_mask = expand_segments(is_dual, segs) if dual else None
    shape = [1] * (observer.ndim - 1) + [layer.in_features]
    neg_amax = None
    if realisation == "folded":  # a_s (s+ on DualScale segments) folded into the weight columns
        weight, divisor = fold_activation_scales(w, act_scale, segs, smooth)
        pre_quant_scale = 1 / divisor
        input_amax = torch.tensor(fmt.qmax)
        if dual:  # x- / s+ is quantized with scale s- / s+
            ratio = torch.where(is_dual, neg_scale / act_scale, torch.ones_like(act_scale))
            neg_amax = expand_segments(ratio * fmt.qmax, segs).reshape(shape)
    else:
        weight = w if smooth is None else w / smooth
        pre_quant_scale = smooth
        amax = act_scale * fmt.qmax
        input_amax = amax[0].clone() if len(segs) == 1 else expand_segments(amax, segs).reshape(shape)
        if dual:
            neg = torch.where(is_dual, neg_scale, torch.ones_like(neg_scale)) * fmt.qmax
            neg_amax = neg[0].clone() if len(segs) == 1 else expand_segments(neg, segs).reshape(shape)
    per_channel = module.weight_quantizer.axis == 0
    weight = weight.to(module.weight.dtype)
    return _LayerSettings(weight, weight_amax(weight, layer.out_segments, per_channel), input_amax,
                          pre_quant_scale, neg_amax, dual_mask, layer, per_channel, stats,
                          smooth.to(module.weight.dtype) if smooth is not None else None, realisation == "folded")


def _set_amax(quantizer: TensorQuantizer, amax: Tensor, axis: int | None) -> None:
    if hasattr(quantizer, "_amax"):
        delattr(quantizer, "_amax")
    quantizer.axis = axis
    quantizer.amax = amax


def _apply(module: nn.Module, s: _LayerSettings) -> None:
    module.weight.data = s.weight  # replaced, not written in place: a failed step restores the old data
    _set_amax(module.weight_quantizer, s.weight_amax.to(module.weight.device), 0)
    mark(module.weight_quantizer).set_weight_role(list(s.layer.out_segments), s.per_channel)
    quantizer = mark(module.input_quantizer)
    quantizer.set_input_role(list(s.layer.in_segments), list(s.layer.dual_scale_segments) if s.layer.dual_scale else [],
                             s.stats, s.smooth, s.folded)
    quantizer.set_shift(s.layer.shift, list(s.layer.shift_segments))
    _set_amax(quantizer, s.input_amax.to(module.weight.device), None if s.input_amax.dim() == 0 else -1)
    if s.pre_quant_scale is not None:
        if hasattr(quantizer, "_pre_quant_scale"):
            delattr(quantizer, "_pre_quant_scale")
        quantizer.pre_quant_scale = s.pre_quant_scale.to(module.weight.dtype)
    if s.neg_amax is not None:
        quantizer.set_dual_scale(s.neg_amax.to(module.weight.device), s.dual_mask)


def _apply_dynamic(module: nn.Module, layer: LinearPlan, observer: SegmentAmaxObserver | None) -> None:
    """Per-token input scales; a shifted layer keeps the calibrated centres of its ``observer``."""
    per_channel = module.weight_quantizer.axis == 0
    _set_amax(module.weight_quantizer, weight_amax(module.weight, layer.out_segments, per_channel), 0)
    mark(module.weight_quantizer).set_weight_role(list(layer.out_segments), per_channel)
    quantizer = mark(module.input_quantizer)
    quantizer.set_input_role(list(layer.in_segments), list(layer.dual_scale_segments) if layer.dual_scale else [],
                             observer.stats() if observer is not None else None, None, False, dynamic=True)
    quantizer.set_shift(layer.shift, list(layer.shift_segments))


def _check_shift_calibration(enabled: dict[str, nn.Module], plan: SegQuantPlan, forward_loop: Callable | None) -> None:
    """A shifted dynamic layer still takes its centres from calibration data."""
    shifted = [n for n, m in enabled.items() if m.input_quantizer._dynamic and plan[n].shift is not None]
    if shifted and forward_loop is None:
        raise SegQuantError(f"{shifted[0]} ({len(shifted)} layers) has an activation shift, whose centre comes from "
                            "calibration even with dynamic activation scales: pass a forward_loop to mtq.quantize, "
                            "or drop the shift from the plan (plan.ablate(shift=False))")


def _resolve_plan(model: nn.Module, layers: dict[str, nn.Module], forward_loop: Callable | None,
                  plan: dict | None, seg_linear: bool | None, dual_scale: bool | None, overrides: dict | None,
                  head_segments: bool) -> SegQuantPlan:
    """The plan to quantize by: the given one exactly as it is (technique switches that would change it, and
    overrides, are refused: they belong to the plan), else the analysis of the first calibration batch, in
    which layers whose quantizers the config switches off stay in high precision."""
    if plan is not None:
        resolved = SegQuantPlan.from_dict(plan)
        missing = [n for n in layers if n not in resolved and layers[n].input_quantizer.is_enabled]
        if missing:
            raise SegQuantError(f"the given plan has no entry for {missing[0]} ({len(missing)} quantized layers); "
                                "it is not a plan of this model")
        switched = resolved.ablate(seg_linear=seg_linear is not False, dual_scale=dual_scale is not False)
        if overrides or switched != resolved:
            raise SegQuantError("the algorithm was given a plan and also seg_linear/dual_scale switches or overrides "
                                "that would change it; apply them to the plan (plan.ablate, plan.with_overrides or "
                                "the recipe) and pass the result")
        off = [n for n, m in layers.items() if n in resolved and resolved[n].quantized
               and not m.input_quantizer.is_enabled and not m.weight_quantizer.is_enabled]
        if off:
            raise SegQuantError(f"the plan quantizes {off[0]} ({len(off)} layers), but the ModelOpt config switches "
                                "its quantizers off; keep layers in high precision in the plan (a recipe's skip) "
                                "and use segquant_modelopt.config_for_plan")
        return resolved
    if forward_loop is None:
        args, kwargs_in = (), example_inputs(model)
    else:
        args, kwargs_in = _first_batch(model, forward_loop)
    options = AnalysisOptions(seg_linear=seg_linear is not False, dual_scale=dual_scale is not False,
                              head_segments=head_segments)
    with _quantizers_off(model):
        resolved = analyze(model, *args, analysis_options=options, **kwargs_in)
    resolved = resolved.with_overrides(overrides or {})
    off = [n for n, m in layers.items() if n in resolved and not m.input_quantizer.is_enabled
           and not m.weight_quantizer.is_enabled]
    return resolved.keep_high_precision(off) if off else resolved


def _check_precision(name: str, module: nn.Module, precision: str) -> None:
    """The ModelOpt quantizers of a layer must realise the precision the plan gives it."""
    spec = get_precision(precision)
    weight, act = format_of(module.weight_quantizer), format_of(module.input_quantizer)
    found = (weight and weight.name, "per_channel" if module.weight_quantizer.axis == 0 else "per_tensor",
             act and act.name, "dynamic" if module.input_quantizer._dynamic else "static")
    wanted = (get_format(spec.weight_format).name, spec.weight_granularity, get_format(spec.act_format).name,
              spec.activation)
    if found != wanted:
        raise SegQuantError(f"{name}: the plan quantizes it as {precision} {wanted}, the ModelOpt config as {found}; "
                            "use the config of that precision (segquant_modelopt.config_for_plan)")


def _check_layers(enabled: dict[str, nn.Module], plan: SegQuantPlan) -> None:
    for name, module in enabled.items():
        plan[name].check_module(module)
        if plan[name].precision is not None:
            _check_precision(name, module, plan[name].precision)
        if format_of(module.weight_quantizer) is None:
            raise SegQuantError(f"{name}: SegQuant has no reference format for weight num_bits="
                                f"{module.weight_quantizer.num_bits}; use INT8, INT6, INT4 or FP8 (e4m3)")
        if module.input_quantizer._dynamic and module.input_quantizer.num_bits != 8:
            raise SegQuantError(f"{name}: dynamic SegQuant activations support INT8 only")
        if not module.input_quantizer._dynamic:
            _format(module.input_quantizer, name)


def _keep_high_precision(layers: dict[str, nn.Module], plan: SegQuantPlan) -> None:
    for name, module in layers.items():
        if name in plan and plan[name].high_precision:
            module.input_quantizer.disable()
            module.weight_quantizer.disable()


def _observe(model: nn.Module, forward_loop: Callable | None, observers: dict[str, SegmentAmaxObserver],
             show_progress: bool) -> None:
    """Run the calibration loop (ModelOpt's max calibration of the remaining quantizers included) with
    every observed layer's input (static or shifted) going to its observer."""
    progress = _progress(model, show_progress)
    try:
        with record_linears(model, observers, keep=False, on_input=lambda n, x: observers[n].update(x)):
            max_calibrate(model, None if forward_loop is None else lambda m: _run_loop(forward_loop, m, "calibration"))
    finally:
        progress.close()


def segquant_calibrate(model: nn.Module, forward_loop: Callable | None = None, seg_linear: bool | None = None,
                       dual_scale: bool | None = None, realisation: str = DEFAULT_REALISATION,
                       alpha: float | None = None, overrides: dict | None = None, head_segments: bool = False,
                       show_progress: bool = True, plan: dict | None = None, keep_degenerate: bool = False,
                       smoothing: str = DEFAULT_SMOOTHING, scale_form: str = DEFAULT_SCALE_FORM,
                       **kwargs: Any) -> None:
    """Calibrate ``model`` (already converted by ``mtq.quantize``'s quantize step) with SegQuant.

    All or nothing: if anything fails (bad input, the user's loop, Ctrl-C), the model is put back as it was
    before ``mtq.quantize``: SegQuant's changes are undone and, when this call's quantize step converted a
    float model, so is the conversion (classes, quantizer children, ModelOpt's state)."""
    layers = _quantized_linears(model)
    twice = [n for n, m in layers.items() if is_marked(m.input_quantizer)]
    if twice:
        _keep_high_precision(layers, plan_of(model))  # mtq's quantize step re-enabled them; leave the model as it was
        raise SegQuantError(f"{twice[0]} is already quantized by SegQuant ({len(twice)} layers); quantize "
                            "a fresh copy of the float model instead")
    modes = [mode for mode, _ in ModeloptStateManager(model).state_dict()]
    fresh = modes == ["quantize"] and not any(hasattr(q, "_amax") for q in model.modules()
                                              if isinstance(q, TensorQuantizer))
    snapshot = ModelSnapshot(model)
    try:
        _calibrate(model, forward_loop, seg_linear, dual_scale, realisation, alpha, overrides, head_segments,
                   show_progress, plan, keep_degenerate, smoothing=smoothing, scale_form=scale_form)
    except BaseException:
        snapshot.restore()
        if fresh:
            undo_conversion(model)
        raise


def undo_conversion(model: nn.Module) -> None:
    """Turn a model that ``mtq.quantize``'s quantize step has just converted back into the float model it was:
    every ModelOpt dynamic module exported to its original class, every quantizer child removed (the model had
    none: ModelOpt's state shows that this call converted it), the original parameter objects put back (export
    re-wraps them), and ModelOpt's state removed."""
    params = {(id(m), n): p for m in model.modules() for n, p in m._parameters.items()}
    for module in reversed(list(model.modules())):
        if isinstance(module, QuantModule):
            module.export()
        for name, param in list(module._parameters.items()):
            original = params.get((id(module), name))
            if original is not None and original is not param:
                module._parameters[name] = original
        for child_name, child in list(module._modules.items()):  # quantizers added outside export's bookkeeping
            if isinstance(child, (TensorQuantizer, SequentialQuantizer)):
                del module._modules[child_name]
        module.__dict__.pop("_parallel_state", None)  # a plain attribute of ModelOpt's QuantModule that export keeps
    for key in ("_modelopt_state", "_modelopt_state_version"):
        model.__dict__.pop(key, None)


def _calibrate(model: nn.Module, forward_loop: Callable | None, seg_linear: bool | None, dual_scale: bool | None,
               realisation: str, alpha: float | None, overrides: dict | None, head_segments: bool,
               show_progress: bool, plan: dict | None, keep_degenerate: bool, *,
               smoothing: str = DEFAULT_SMOOTHING, scale_form: str = DEFAULT_SCALE_FORM) -> None:
    reference = is_reference_arithmetic(smoothing, scale_form)
    if reference and realisation != "split_k":
        raise SegQuantError(f"smoothing={smoothing!r}, scale_form={scale_form!r} need realisation='split_k'")
    layers = _quantized_linears(model)
    dynamic_only = all(m.input_quantizer._dynamic for m in layers.values() if m.input_quantizer.is_enabled)
    if forward_loop is None and not dynamic_only:
        raise SegQuantError("SegQuant calibration needs calibration data for static activation scales: call "
                            "mtq.quantize(model, config, forward_loop) with forward_loop(model) running the "
                            "model on a few batches (a dynamic-activation config such as SEGQUANT_W4A8_CFG "
                            "can run without one on a known diffusers model)")
    resolved = _resolve_plan(model, layers, forward_loop, plan, seg_linear, dual_scale, overrides, head_segments)
    enabled = {n: m for n, m in layers.items()
               if n in resolved and resolved[n].quantized and m.input_quantizer.is_enabled}
    _check_layers(enabled, resolved)
    _check_shift_calibration(enabled, resolved, forward_loop)
    static = {n: m for n, m in enabled.items() if not m.input_quantizer._dynamic}
    if reference and len(static) < len(enabled):
        raise SegQuantError(f"smoothing={smoothing!r}, scale_form={scale_form!r} (reference mode) quantize static "
                            "activations only; use a static precision (int8_w8a8, int8_perchannel, fp8)")
    observed = [n for n in enabled if n in static or resolved[n].shift is not None]  # shifts: centres
    observers = {name: SegmentAmaxObserver(resolved[name]) for name in observed}
    _observe(model, forward_loop, observers, show_progress)
    kept = check_calibration(observers, keep_degenerate)
    if kept:
        resolved = resolved.keep_high_precision(kept)
        static = {n: m for n, m in static.items() if n not in kept}
        enabled = {n: m for n, m in enabled.items() if n not in kept}
    if reference:  # per-segment smoothing / reciprocal scales: segment_smoothing.py
        tiles = {n: reference_settings(n, m, resolved[n], observers[n], layer_alpha(resolved[n], alpha), smoothing,
                                       scale_form) for n, m in static.items()}
        for name, module in static.items():
            mark(module.weight_quantizer), mark(module.input_quantizer)
            apply_reference(module, tiles[name])
    else:
        settings = {n: _settings(n, m, resolved[n], observers[n], realisation, alpha) for n, m in static.items()}
        for name, module in static.items():  # nothing above changed a layer: apply all or nothing
            _apply(module, settings[name])
    for name, module in enabled.items():
        if module.input_quantizer._dynamic:
            _apply_dynamic(module, resolved[name], observers.get(name))
    _keep_high_precision(layers, resolved)
    model._segquant_plan = resolved
    logger.info("SegQuant calibrated %d layers (%s, realisation=%s, alpha=%s)", len(enabled), resolved.summary(),
                realisation, alpha)


class _Progress:
    def __init__(self, bar: Any, handle: Any) -> None:
        self.bar, self.handle = bar, handle

    def close(self) -> None:
        self.handle.remove()
        self.bar.close()


def _progress(model: nn.Module, show: bool) -> _Progress:
    from tqdm.auto import tqdm

    bar = tqdm(desc="SegQuant calibration", unit="batch", disable=not show)

    def count(module: nn.Module, args: tuple) -> None:  # a pre-hook's return value replaces the inputs:
        bar.update(1)                                    # tqdm.update returns True whenever it redraws

    handle = model.register_forward_pre_hook(count)
    return _Progress(bar, handle)


@CalibrateModeRegistry.register_mode
class SegQuantModeDescriptor(BaseCalibrateModeDescriptor):
    """Mode ``segquant_calibrate``: registered on ``import segquant_modelopt``."""

    @property
    def config_class(self) -> type[QuantizeAlgorithmConfig]:
        return SegQuantCalibConfig

    _calib_func = segquant_calibrate


def plan_of(model: nn.Module) -> SegQuantPlan:
    """The plan the last ``segquant`` calibration applied to ``model``."""
    plan = getattr(model, "_segquant_plan", None)
    if plan is None:
        raise SegQuantError(f"{type(model).__name__} was not calibrated with the segquant algorithm")
    return plan
