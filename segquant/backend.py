"""What a SegQuant backend is: a typed ``Backend`` protocol and the registry that finds backends.

A backend turns an applied ``SegQuantPlan`` into a quantized model in its library's idiom (ModelOpt quantizers,
torchao tensors...). Backends register under the entry-point group ``segquant.backends`` in their package's
metadata; the library never names one. The application asks ``backend_names()`` for its CLI choices and
``get_backend(name)`` for the object.

Example (a third-party backend's ``pyproject.toml``)::

    [project.entry-points."segquant.backends"]
    mybackend = "my_package.segquant_backend:MyBackend"
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import torch
from torch import nn

from .errors import SegQuantError
from .options import ACTIVATION_MODES, DEFAULT_REALISATION, DEFAULT_SCALE_FORM, DEFAULT_SMOOTHING, REALISATIONS, \
    SCALE_FORMS, SMOOTHINGS, check_alpha, check_choice
from .plan import SegQuantPlan
from .precision import get_precision

ENTRY_POINT_GROUP = "segquant.backends"

ForwardLoop = Callable[[nn.Module], None]
"""``forward_loop(model)`` runs the model on calibration data (ModelOpt's convention)."""

ONNX_MODES = ("tensorrt", "qdq")
"""ONNX export modes: ``tensorrt`` (every activation Q/DQ per tensor, per-segment scales only as the folded
realisation's ``pre_quant_scale`` Mul; per-K scales and DualScale are refused) or ``qdq`` (what the quantizers
hold: per-channel activation Q/DQ for ``split_k`` segments, two Q/DQ branches for DualScale)."""
DEFAULT_ONNX_MODE = "tensorrt"


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do.

    Args:
        precisions: ``segquant.precision`` names it quantizes.
        activation_modes: ``static`` and/or ``dynamic``.
        onnx_export: ``export_onnx`` writes a Q/DQ ONNX graph.
        save_load: ``quantize_and_save`` writes a checkpoint that ``load`` restores.
        smoothings: ``QuantizeOptions.smoothing`` values it implements (default ``per_layer`` only).
        scale_forms: ``QuantizeOptions.scale_form`` values it implements (default ``step`` only).
    """

    precisions: tuple[str, ...]
    activation_modes: tuple[str, ...] = ACTIVATION_MODES
    onnx_export: bool = False
    save_load: bool = True
    smoothings: tuple[str, ...] = (DEFAULT_SMOOTHING,)
    scale_forms: tuple[str, ...] = (DEFAULT_SCALE_FORM,)

    def __post_init__(self) -> None:
        for key in ("precisions", "activation_modes", "smoothings", "scale_forms"):
            if not isinstance(getattr(self, key), tuple):
                raise SegQuantError(f"Capabilities.{key} must be a tuple of names, got {getattr(self, key)!r}")
        for key in ("onnx_export", "save_load"):
            if not isinstance(getattr(self, key), bool):
                raise SegQuantError(f"Capabilities.{key} must be true or false, got {getattr(self, key)!r}")
        for name in self.precisions:
            get_precision(name)
        for mode in self.activation_modes:
            check_choice(mode, ACTIVATION_MODES, "activation mode")
        for smoothing in self.smoothings:
            check_choice(smoothing, SMOOTHINGS, "smoothing")
        for form in self.scale_forms:
            check_choice(form, SCALE_FORMS, "scale_form")


@dataclass(frozen=True)
class QuantizeOptions:
    """Numeric options of one quantization that are not per-layer facts of the plan.

    Args:
        smoothquant_alpha: SmoothQuant migration strength in [0, 1], or None for no smoothing.
        realisation: input segments as ``split_k`` or ``folded`` (``segquant.options.REALISATIONS``).
        show_progress: tqdm over calibration batches.
        keep_degenerate: keep layers that calibration never reached, or whose range is zero on an input
            segment, in high precision (with a warning naming them) instead of refusing to quantize.
        smoothing: ``per_layer`` (default) or ``per_segment`` SmoothQuant factors (``segquant.options.SMOOTHINGS``;
            the paper's reference code smooths per segment). Needs ``smoothquant_alpha`` to change anything.
        scale_form: ``step`` (default) or ``reciprocal`` (``segquant.options.SCALE_FORMS``: how scales and
            SmoothQuant factors are applied, to the last bit; the reference code's is ``reciprocal``).

    ``segquant.reference_mode.reference_options()`` gives the options that reproduce the reference code.
    """

    smoothquant_alpha: float | None = None
    realisation: str = DEFAULT_REALISATION
    show_progress: bool = True
    keep_degenerate: bool = False
    smoothing: str = DEFAULT_SMOOTHING
    scale_form: str = DEFAULT_SCALE_FORM

    def __post_init__(self) -> None:
        object.__setattr__(self, "smoothquant_alpha", check_alpha(self.smoothquant_alpha))
        check_choice(self.realisation, REALISATIONS, "realisation")
        check_choice(self.smoothing, SMOOTHINGS, "QuantizeOptions.smoothing")
        check_choice(self.scale_form, SCALE_FORMS, "QuantizeOptions.scale_form")
        if self.realisation == "folded" and (self.smoothing, self.scale_form) != (DEFAULT_SMOOTHING,
                                                                                   DEFAULT_SCALE_FORM):
            raise SegQuantError(f"realisation 'folded' supports smoothing={DEFAULT_SMOOTHING!r} and scale_form="
                                f"{DEFAULT_SCALE_FORM!r} only (got {self.smoothing!r}, {self.scale_form!r}); use "
                                "realisation='split_k'")
        for key in ("show_progress", "keep_degenerate"):
            if not isinstance(getattr(self, key), bool):
                raise SegQuantError(f"QuantizeOptions.{key} must be True or False, got {getattr(self, key)!r}")


@dataclass(frozen=True)
class QuantizedLayer:
    """What a backend did to one Linear, read back from the quantized model (for checks and reports).

    Args:
        in_segments, out_segments, dual_scale_segments, shift_segments: as in ``LinearPlan`` (empty for a layer
            a library's own preset quantized; ``shift_segments`` empty without a shift).
        weight_format, act_format: ``segquant.numerics`` format names (``int8``, ``fp8_e4m3`` ...).
        weight_granularity: ``per_tensor`` or ``per_channel``; activation: ``static`` or ``dynamic``.
    """

    in_segments: tuple[int, ...] = ()
    out_segments: tuple[int, ...] = ()
    dual_scale_segments: tuple[int, ...] = ()
    weight_format: str = ""
    weight_granularity: str = ""
    act_format: str = ""
    activation: str = ""
    shift_segments: tuple[int, ...] = ()

    @property
    def dual_scale(self) -> bool:
        return bool(self.dual_scale_segments)


@runtime_checkable
class Backend(Protocol):
    """A quantization backend. Every method takes the applied plan as the one description of what to do:
    layers with ``high_precision`` stay as they are, the others are quantized with their ``precision``,
    segments and DualScale exactly as planned."""

    name: str
    capabilities: Capabilities

    def quantize(self, model: nn.Module, plan: SegQuantPlan, options: QuantizeOptions,
                 forward_loop: ForwardLoop | None) -> nn.Module:
        """Calibrate and quantize ``model`` under ``plan`` in memory; returns the quantized model."""

    def quantize_and_save(self, model: nn.Module, plan: SegQuantPlan, options: QuantizeOptions,
                          forward_loop: ForwardLoop | None, folder: Path, name: str) -> tuple[nn.Module, list[Path]]:
        """``quantize`` and write a checkpoint of the denoiser ``name`` into ``folder``; returns the model
        and the files written."""

    def load(self, folder: Path, name: str, denoiser_class: str, float_denoiser: Callable[[], nn.Module],
             dtype: torch.dtype) -> nn.Module:
        """The quantized denoiser ``name`` (a diffusers ``denoiser_class``) of a checkpoint written by
        ``quantize_and_save`` into ``folder``; ``float_denoiser()`` builds the base model's float one."""

    def export_onnx(self, model: nn.Module, example_kwargs: Mapping[str, Any], path: Path,
                    mode: str = DEFAULT_ONNX_MODE) -> Path:
        """Export a quantized model to ONNX (only when ``capabilities.onnx_export``) in one of ``ONNX_MODES``."""

    def quantize_baseline(self, model: nn.Module, precision: str, forward_loop: ForwardLoop | None) \
            -> tuple[nn.Module, str]:
        """Quantize with the library's own preset for ``precision`` (the comparison row); returns the
        model and a label naming the preset."""

    def quantized_linears(self, model: nn.Module) -> dict[str, QuantizedLayer]:
        """Every Linear of ``model`` that runs quantized, with the segments and DualScale it really has."""


_REGISTERED: dict[str, Callable[[], Backend]] = {}


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    """Register a backend in this process (entry points do this for installed packages)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise SegQuantError(f"a backend name is an identifier, got {name!r}")
    if not callable(factory):
        raise SegQuantError(f"backend {name}: register a class or factory that returns the backend, got {factory!r}")
    _REGISTERED[name] = factory


def _entry_points() -> dict[str, metadata.EntryPoint]:
    found: dict[str, metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep)
    return found


def backend_names() -> tuple[str, ...]:
    """Names of every registered backend (installed or not: ``get_backend`` says what is missing)."""
    return tuple(sorted(set(_entry_points()) | set(_REGISTERED)))


def get_backend(name: str) -> Backend:
    """The backend called ``name``.

    Raises:
        SegQuantError: no backend has that name, or its library is not installed (the message says what
            to install).
    """
    names = backend_names()
    if name not in names:
        known = ", ".join(names) or "none (install segquant with pip so its entry points are registered)"
        raise SegQuantError(f"unknown backend {name!r}; registered backends: {known}")
    try:
        factory = _REGISTERED.get(name) or _entry_points()[name].load()
    except ImportError as e:
        raise SegQuantError(f"backend {name} is not available: {e}") from None
    backend = factory()
    if not isinstance(backend, Backend):
        raise SegQuantError(f"backend {name} ({type(backend).__name__}) does not implement segquant.backend.Backend")
    return backend


def check_supported(backend: Backend, plan: SegQuantPlan, options: QuantizeOptions | None = None) -> str:
    """The plan's precision, after checking that ``backend`` supports it and its activation mode, and that
    ``options`` fit it (SmoothQuant and per-segment smoothing need calibrated, static activations).

    Raises:
        SegQuantError: the plan has no precision (apply a recipe first), the backend cannot run it, or the
            options do not fit.
    """
    if not isinstance(plan, SegQuantPlan):
        raise SegQuantError(f"expected a SegQuantPlan (Recipe.apply's), got {type(plan).__name__}")
    if options is not None and not isinstance(options, QuantizeOptions):
        raise SegQuantError(f"expected segquant.QuantizeOptions, got {type(options).__name__}")
    precision = plan.precision()
    if precision is None:
        raise SegQuantError("the plan names no precision: apply a recipe (Recipe.apply) or "
                            "plan.with_precision(...) before quantizing with a backend")
    caps = backend.capabilities
    if precision not in caps.precisions:
        raise SegQuantError(f"backend {backend.name} supports {', '.join(caps.precisions)}, not {precision}")
    mode = get_precision(precision).activation
    if mode not in caps.activation_modes:
        raise SegQuantError(f"backend {backend.name} has no {mode} activations (precision {precision})")
    if options is not None and options.smoothing not in caps.smoothings:
        raise SegQuantError(f"backend {backend.name} implements smoothing {', '.join(caps.smoothings)}, not "
                            f"{options.smoothing!r} (the reference code's per-segment smoothing); use "
                            f"smoothing='{DEFAULT_SMOOTHING}' or a backend that has it (modelopt)")
    if options is not None and options.scale_form not in caps.scale_forms:
        raise SegQuantError(f"backend {backend.name} implements scale_form {', '.join(caps.scale_forms)}, not "
                            f"{options.scale_form!r}; use scale_form='{DEFAULT_SCALE_FORM}' or a backend that has "
                            "it (modelopt)")
    if options is not None and options.smoothing == "per_segment" and mode == "dynamic":
        raise SegQuantError(f"smoothing='per_segment' needs calibrated static activations; precision {precision} "
                            f"quantizes them dynamically: use smoothing='{DEFAULT_SMOOTHING}' or a static precision")
    if options is not None and options.smoothquant_alpha is not None and mode == "dynamic":
        raise SegQuantError(f"SmoothQuant (alpha {options.smoothquant_alpha}) needs calibrated static activations; "
                            f"precision {precision} quantizes them dynamically: set smoothquant_alpha to None")
    return precision


def check_quantize_call(backend: Backend, plan: SegQuantPlan, options: Any, forward_loop: Any) -> str:
    """Everything a backend's ``quantize`` checks before it changes the model (``check_supported``, the
    options' type, a callable ``forward_loop``); returns the plan's precision."""
    if not isinstance(options, QuantizeOptions):
        raise SegQuantError(f"expected segquant.QuantizeOptions, got {type(options).__name__}")
    if forward_loop is not None and not callable(forward_loop):
        raise SegQuantError(f"forward_loop must be a function forward_loop(model), got {type(forward_loop).__name__}")
    return check_supported(backend, plan, options)
