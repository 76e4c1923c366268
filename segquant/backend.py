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
from .options import ACTIVATION_MODES, DEFAULT_REALISATION, REALISATIONS, check_alpha, check_choice
from .plan import SegQuantPlan
from .precision import get_precision

ENTRY_POINT_GROUP = "segquant.backends"

ForwardLoop = Callable[[nn.Module], None]
"""``forward_loop(model)`` runs the model on calibration data (ModelOpt's convention)."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do.

    Args:
        precisions: ``segquant.precision`` names it quantizes.
        activation_modes: ``static`` and/or ``dynamic``.
        onnx_export: ``export_onnx`` writes a Q/DQ ONNX graph.
        save_load: ``quantize_and_save`` writes a checkpoint that ``load`` restores.
    """

    precisions: tuple[str, ...]
    activation_modes: tuple[str, ...] = ACTIVATION_MODES
    onnx_export: bool = False
    save_load: bool = True

    def __post_init__(self) -> None:
        for name in self.precisions:
            get_precision(name)
        for mode in self.activation_modes:
            check_choice(mode, ACTIVATION_MODES, "activation mode")


@dataclass(frozen=True)
class QuantizeOptions:
    """Numeric options of one quantization that are not per-layer facts of the plan.

    Args:
        smoothquant_alpha: SmoothQuant migration strength in [0, 1], or None for no smoothing.
        realisation: input segments as ``split_k`` or ``folded`` (``segquant.options.REALISATIONS``).
        show_progress: tqdm over calibration batches.
    """

    smoothquant_alpha: float | None = None
    realisation: str = DEFAULT_REALISATION
    show_progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "smoothquant_alpha", check_alpha(self.smoothquant_alpha))
        check_choice(self.realisation, REALISATIONS, "realisation")


@dataclass(frozen=True)
class QuantizedLayer:
    """What a backend did to one Linear, read back from the quantized model (for checks and reports)."""

    in_segments: tuple[int, ...] = ()
    out_segments: tuple[int, ...] = ()
    dual_scale_segments: tuple[int, ...] = ()

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

    def load(self, folder: Path, manifest: Mapping[str, Any], float_denoiser: Callable[[], nn.Module],
             dtype: torch.dtype) -> nn.Module:
        """The quantized denoiser of a checkpoint written by ``quantize_and_save``."""

    def export_onnx(self, model: nn.Module, example_kwargs: Mapping[str, Any], path: Path) -> Path:
        """Export a quantized model to ONNX (only when ``capabilities.onnx_export``)."""

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


def check_supported(backend: Backend, plan: SegQuantPlan) -> str:
    """The plan's precision, after checking that ``backend`` supports it and its activation mode.

    Raises:
        SegQuantError: the plan has no precision (apply a recipe first) or the backend cannot run it.
    """
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
    return precision
