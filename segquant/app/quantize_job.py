"""``segquant quantize``: load a diffusers pipeline, calibrate on prompts, quantize its denoiser with a
recipe through a backend, save a checkpoint that loads back (``load_quantized``), optionally export ONNX.

The model is analysed once (on ``meta``), the recipe applied to that plan, and the applied plan handed to the
backend (``segquant.get_backend``), which quantizes exactly what it says; the checkpoint stores it as
``plan.json``. Everything but the backend's own part is here.

Example:
    >>> job = QuantizeJob(model="black-forest-labs/FLUX.1-dev", out="flux_int8", backend="modelopt")
    >>> result = quantize_pipeline(job)
    >>> pipe = load_quantized("flux_int8")      # later, in a fresh process
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segquant import Backend, SegQuantError, SegQuantPlan, analyze, backend_names, example_inputs, get_backend
from segquant.backend import DEFAULT_ONNX_MODE, ONNX_MODES, QuantizeOptions, check_supported
from segquant.files import atomic_write_text
from segquant.options import check_choice
from segquant.recipe import PRECISIONS, CalibrationSettings, Recipe, load_recipe

from .console import Progress
from .extras import require
from .outputs import check_output_folder, staged_output
from .parallel import is_main
from .pipelines import (DTYPES, calibration_loop, check_device, check_model_folder, denoiser_name, family_of,
                        load_component, load_pipeline, read_prompts)

logger = logging.getLogger(__name__)

DEFAULT_BACKEND = "modelopt"
"""The backend of ``segquant quantize`` and ``segquant run`` when none is named (the ModelOpt deployment path)."""
MANIFEST = "segquant.json"
MANIFEST_VERSION = 1
PLAN_FILE = "plan.json"
COMMAND = "segquant quantize"


@dataclass(frozen=True)
class QuantizeJob:
    """One ``segquant quantize`` run.

    Args:
        model: hub id or local diffusers pipeline folder.
        out: output folder (created).
        backend: a registered backend (``segquant.backend_names()``: ``modelopt``, ``torchao``).
        precision: one of ``segquant.recipe.PRECISIONS`` (default ``int8_w8a8``, the paper's W8A8).
        recipe: a recipe name (``flux.1-dev/fp8``) or file; default: ``<family of model>/<precision>``.
        prompts: calibration prompt file, one per line; default: the bundled 64 COCO-style captions.
        num_prompts, steps, guidance, height, width: override the recipe's calibration settings.
        dtype: weights dtype for loading (``bfloat16``, ``float16``, ``float32``).
        device: where the pipeline runs.
        seed: the first calibration prompt's seed (prompt i uses ``seed + i``).
        onnx: also export the quantized denoiser to ONNX (ModelOpt only).
        onnx_mode: ``tensorrt`` (default: per-tensor activation Q/DQ only; the job then quantizes with the folded
            realisation and DualScale off, see ``tensorrt_ready``) or ``qdq`` (the recipe as it is: per-channel
            activation Q/DQ for split_k segments, two Q/DQ branches for DualScale).
        show_progress: one progress bar each for loading and the calibration prompts (a plain line each when
            stderr is not a terminal; ``segquant.app.console.Progress``).
        overwrite: replace a non-empty ``out`` that is not an earlier ``segquant quantize`` checkpoint.
        keep_degenerate: keep layers without a usable calibration range in high precision instead of failing.
    """

    model: str
    out: str | Path
    backend: str = DEFAULT_BACKEND
    precision: str = "int8_w8a8"
    recipe: str | Path | None = None
    prompts: str | Path | None = None
    num_prompts: int | None = None
    steps: int | None = None
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    dtype: str = "bfloat16"
    device: str = "cpu"
    seed: int = 0
    onnx: bool = False
    onnx_mode: str = DEFAULT_ONNX_MODE
    show_progress: bool = True
    overwrite: bool = False
    keep_degenerate: bool = False

    def __post_init__(self) -> None:
        if self.backend not in backend_names():
            raise SegQuantError(f"unknown backend {self.backend!r}; one of {', '.join(backend_names())}")
        if self.precision not in PRECISIONS:
            raise SegQuantError(f"unknown precision {self.precision!r}; one of {', '.join(PRECISIONS)}")
        if self.dtype not in DTYPES:
            raise SegQuantError(f"unknown dtype {self.dtype!r}; one of {', '.join(DTYPES)}")
        dataclasses.replace(CalibrationSettings(), **self._calibration_overrides())  # their types and ranges
        check_device(self.device)
        check_choice(self.onnx_mode, ONNX_MODES, "onnx_mode")

    def calibration(self, recipe: Recipe) -> CalibrationSettings:
        """The recipe's calibration settings with this job's overrides."""
        return dataclasses.replace(recipe.calibration, **self._calibration_overrides())

    def _calibration_overrides(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("num_prompts", "steps", "guidance", "height", "width")
                if getattr(self, k) is not None}


@dataclass
class QuantizeResult:
    """What ``quantize_pipeline`` produced: the quantized pipeline (in memory), its recipe, the
    calibration settings used, the applied plan, the files written and one line per change the job made to
    the recipe's quantization (``tensorrt_ready``)."""

    pipe: Any
    recipe: Recipe
    calibration: CalibrationSettings
    plan: SegQuantPlan
    files: list[Path]
    notes: list[str] = dataclasses.field(default_factory=list)


def meta_plan(denoiser: nn.Module) -> SegQuantPlan:
    """The SegQuant plan of ``denoiser``'s architecture, analysed on a copy built on ``meta`` (no weights)."""
    with torch.device("meta"):
        skeleton = type(denoiser).from_config(denoiser.config)
    return analyze(skeleton, **example_inputs(skeleton))


def resolve_recipe(job: QuantizeJob, denoiser: nn.Module, plan: SegQuantPlan, given: Recipe | None = None) -> Recipe:
    """The job's recipe (``given``: already loaded), checked against the model: its class and every glob must
    match."""
    if given is not None:
        recipe = given
    elif job.recipe is not None:
        recipe = load_recipe(job.recipe)
    else:
        recipe = load_recipe(f"{family_of(job.model, denoiser)}/{job.precision}")
    recipe.validate(plan)
    return recipe


def _call_capture(denoiser: nn.Module) -> tuple[dict[str, Any], Any]:
    """Record the first call's arguments by name (ONNX example inputs); returns (store, hook handle)."""
    store: dict[str, Any] = {}
    signature = inspect.signature(denoiser.forward)

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not store:
            store.update(signature.bind_partial(*args, **kwargs).arguments)

    return store, denoiser.register_forward_pre_hook(hook, with_kwargs=True)


def _check_backend(job: QuantizeJob) -> Backend:
    backend = get_backend(job.backend)
    caps = backend.capabilities
    if job.precision not in caps.precisions and job.recipe is None:
        raise SegQuantError(f"backend {job.backend} supports {', '.join(caps.precisions)}, not {job.precision}")
    if job.onnx and not caps.onnx_export:
        raise SegQuantError(f"backend {job.backend} has no ONNX export; use a backend that has one "
                            f"({', '.join(n for n in backend_names() if n != job.backend)}) with --onnx")
    return backend


def quantize_pipeline(job: QuantizeJob) -> QuantizeResult:
    """Load, analyse once, apply the recipe, calibrate, quantize, save (and optionally export ONNX).

    Raises:
        SegQuantError: weights not available locally, a recipe for another model, an empty prompt file,
            a precision the backend does not support, or a backend that is not installed.
    """
    require("quantize", "segquant quantize")
    if job.onnx:
        require("onnx", "segquant quantize --onnx")
    backend = _check_backend(job)
    main = is_main()  # under --num-gpus every rank calibrates its prompts, rank 0 writes
    out = check_output_folder(job.out, [p for p in (job.model, job.prompts, job.recipe) if p], COMMAND,
                              job.overwrite) if main else None
    prompts = read_prompts(job.prompts)
    given = load_recipe(job.recipe) if job.recipe is not None else None  # every input checked before loading
    check_model_folder(job.model)
    with Progress(f"loading {job.model}", unit="pipeline", enabled=job.show_progress) as bar:
        pipe = load_pipeline(job.model, job.dtype, job.device, show_progress=job.show_progress)
        bar.update()
    name = denoiser_name(pipe)
    denoiser = getattr(pipe, name)
    analysed = meta_plan(denoiser)
    recipe = resolve_recipe(job, denoiser, analysed, given)
    plan = recipe.apply(analysed)
    check_supported(backend, plan)
    settings = job.calibration(recipe)
    prompts = prompts[:settings.num_prompts]
    logger.info("calibrating %s (%s) on %d prompts x %d steps", recipe.name, job.backend, len(prompts), settings.steps)
    forward_loop = calibration_loop(pipe, prompts, settings, job.seed, job.show_progress)
    if not main:
        plan, notes = _quantize_only(job, backend, pipe, name, plan, recipe, forward_loop)
        return QuantizeResult(pipe, recipe, settings, plan, [], notes)
    with staged_output(out, COMMAND) as stage:  # the old checkpoint stays until the new one is complete
        plan, files, notes = _quantize_into(stage, job, backend, pipe, name, plan, recipe, forward_loop)
    return QuantizeResult(pipe, recipe, settings, plan, [out / f.relative_to(stage) for f in files], notes)


def _prepare_plan(job: QuantizeJob, denoiser: nn.Module, plan: SegQuantPlan, recipe: Recipe,
                  forward_loop: Any) -> tuple[SegQuantPlan, QuantizeOptions, list[str]]:
    """The plan and options the backend quantizes with: the recipe's per-layer choices, then (ONNX for TensorRT)
    ``tensorrt_ready``; and the notes of both."""
    # no bar per batch from the backend: the job's bar over the prompts is the one of this step
    options = recipe.quantize_options(False, job.keep_degenerate)
    notes: list[str] = []
    if recipe.choose == "auto" or recipe.alpha_search:
        plan, notes = per_layer_choices(denoiser, plan, recipe, forward_loop)
    if job.onnx and job.onnx_mode == "tensorrt":
        plan, options, trt_notes = tensorrt_ready(plan, options)
        notes += trt_notes
    for note in notes:
        logger.info(note)
    return plan, options, notes


def _quantize_only(job: QuantizeJob, backend: Backend, pipe: Any, name: str, plan: SegQuantPlan, recipe: Recipe,
                   forward_loop: Any) -> tuple[SegQuantPlan, list[str]]:
    """A rank other than 0 under --num-gpus: the same calibration (its prompts; statistics merged inside the
    backend) and quantization, nothing written."""
    denoiser = getattr(pipe, name)
    plan, options, notes = _prepare_plan(job, denoiser, plan, recipe, forward_loop)
    setattr(pipe, name, backend.quantize(denoiser, plan, options, forward_loop))
    return plan, notes


def tensorrt_ready(plan: SegQuantPlan, options: QuantizeOptions) -> tuple[SegQuantPlan, QuantizeOptions, list[str]]:
    """The plan and options that ``--onnx-mode tensorrt`` quantizes with, so that every activation Q/DQ of the
    ONNX is per tensor: DualScale off (``plan.ablate``) and the folded realisation (per-segment scales folded
    into the weights, one ``pre_quant_scale`` Mul before the Q/DQ); and a line saying what changed, if anything.
    The checkpoint, its plan.json and the ONNX then agree."""
    dual = plan.dual_scaled()
    changes = [f"DualScale switched off on {len(dual)} layers"] if dual else []
    if options.realisation != "folded":
        changes.append(f"realisation {options.realisation} -> folded")
    note = f"ONNX for TensorRT: {', '.join(changes)} (--onnx-mode qdq keeps the recipe's)"
    return (plan.ablate(dual_scale=False), dataclasses.replace(options, realisation="folded"),
            [note] if changes else [])


def per_layer_choices(model: nn.Module, plan: SegQuantPlan, recipe: Recipe,
                      forward_loop: Any) -> tuple[SegQuantPlan, list[str]]:
    """The recipe's ``alpha_search`` and ``choose: auto`` on its applied plan, from one pass of the calibration loop
    over the float model (``segquant.choose``); returns the plan and a note per step."""
    from segquant.choose import recipe_choices

    logger.info("measuring per-layer choices of %s on the calibration inputs", recipe.name)
    plans, notes = recipe_choices(model, {"plan": plan}, recipe, forward_loop)
    return plans["plan"], notes["plan"]


def _quantize_into(stage: Path, job: QuantizeJob, backend: Backend, pipe: Any, name: str, plan: SegQuantPlan,
                   recipe: Recipe, forward_loop: Any) -> tuple[SegQuantPlan, list[Path], list[str]]:
    """Quantize, save, optionally export and write the manifest last, all inside ``stage``; returns the plan
    the checkpoint holds, its files and the notes of ``tensorrt_ready``."""
    denoiser = getattr(pipe, name)
    inputs, handle = _call_capture(denoiser)
    try:
        plan, options, notes = _prepare_plan(job, denoiser, plan, recipe, forward_loop)
        quantized, files = backend.quantize_and_save(denoiser, plan, options, forward_loop, stage, name)
    finally:
        handle.remove()
    setattr(pipe, name, quantized)
    converted = backend.quantized_linears(quantized)
    kept = [n for n in plan.quantized_layers() if n not in converted]
    if kept:  # --keep-degenerate-layers: the saved plan says what the checkpoint really holds
        plan = plan.keep_high_precision(kept)
    plan.save(stage / PLAN_FILE)
    files.append(stage / PLAN_FILE)
    if job.onnx:
        files.append(backend.export_onnx(quantized, inputs, stage / f"{name}.onnx", mode=job.onnx_mode))
    manifest = {"version": MANIFEST_VERSION, "backend": job.backend, "recipe": recipe.name,
                "base_model": _base_reference(job.model), "denoiser": name,
                "denoiser_class": type(denoiser).__name__, "dtype": job.dtype, "files": [f.name for f in files]}
    if job.onnx:
        manifest.update(onnx_mode=job.onnx_mode, notes=notes)
    atomic_write_text(stage / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return plan, [stage / MANIFEST, *files], notes


def _base_reference(model: str) -> str:
    """A hub id as given; a local folder as an absolute path (the checkpoint refers to it)."""
    return str(Path(model).resolve()) if Path(model).is_dir() else model


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise SegQuantError(f"{folder} is not a SegQuant checkpoint: no {MANIFEST} (write one with segquant quantize)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SegQuantError(f"{path} cannot be read as a SegQuant manifest: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        version = manifest.get("version") if isinstance(manifest, dict) else None
        raise SegQuantError(f"{path}: version {version}, this SegQuant reads {MANIFEST_VERSION}")
    missing = [k for k in ("backend", "base_model", "denoiser", "denoiser_class", "dtype") if k not in manifest]
    if missing:
        raise SegQuantError(f"{path} lacks {missing}: not a complete SegQuant manifest")
    return manifest


def load_quantized(folder: str | Path, device: str = "cpu", dtype: str | None = None):
    """A fresh pipeline from a ``segquant quantize`` checkpoint: the base model's components (loaded as
    ``load_pipeline`` does) with the quantized denoiser restored by its backend."""
    manifest = read_manifest(folder)
    backend = get_backend(manifest["backend"])
    dtype = dtype or manifest["dtype"]
    name, base = manifest["denoiser"], manifest["base_model"]

    def float_denoiser() -> nn.Module:
        return load_component(base, name, manifest["denoiser_class"], dtype)

    denoiser = backend.load(Path(folder), name, manifest["denoiser_class"], float_denoiser, DTYPES[dtype])
    return load_pipeline(base, dtype, device, **{name: denoiser})


def add_job_arguments(parser: argparse.ArgumentParser, model: str | None = None, backend: str = DEFAULT_BACKEND,
                      precision: str = "int8_w8a8") -> None:
    """The arguments of ``QuantizeJob`` (shared by ``segquant quantize`` and the examples)."""
    parser.add_argument("--model", default=model, required=model is None,
                        help="hub id or local diffusers pipeline folder" + (f" (default {model})" if model else ""))
    parser.add_argument("--out", type=Path, required=True, help="output folder for the checkpoint")
    parser.add_argument("--backend", default=backend, choices=backend_names(), help=f"default {backend}")
    parser.add_argument("--precision", default=precision, choices=PRECISIONS, help=f"default {precision}")
    parser.add_argument("--recipe", help="recipe name (flux.1-dev/fp8) or file; default: the model's family")
    parser.add_argument("--prompts", type=Path, help="calibration prompts, one per line (default: bundled 64)")
    parser.add_argument("--num-prompts", type=int, help="override the recipe's number of prompts")
    parser.add_argument("--steps", type=int, help="override the recipe's sampling steps")
    parser.add_argument("--guidance", type=float, help="override the recipe's guidance scale")
    parser.add_argument("--height", type=int, help="override the recipe's image height")
    parser.add_argument("--width", type=int, help="override the recipe's image width")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="default bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--onnx", action="store_true", help="also export the denoiser to ONNX (backends with ONNX "
                        "export: modelopt)")
    parser.add_argument("--onnx-mode", default=DEFAULT_ONNX_MODE, choices=ONNX_MODES,
                        help="tensorrt (default): per-tensor activation Q/DQ only, so the denoiser is quantized with "
                        "the folded realisation and DualScale off; qdq: the recipe as it is (per-channel activation "
                        "Q/DQ, DualScale as two Q/DQ branches)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out that is not an "
                        "earlier segquant quantize checkpoint")
    parser.add_argument("--keep-degenerate-layers", action="store_true", help="keep layers that calibration never "
                        "reached, or saw only zeros on, in high precision (a warning names them) instead of failing")


def job_from_args(args: argparse.Namespace) -> QuantizeJob:
    return QuantizeJob(model=args.model, out=args.out, backend=args.backend, precision=args.precision,
                       recipe=args.recipe, prompts=args.prompts, num_prompts=args.num_prompts, steps=args.steps,
                       guidance=args.guidance, height=args.height, width=args.width, dtype=args.dtype,
                       device=args.device, seed=args.seed, onnx=args.onnx, onnx_mode=args.onnx_mode,
                       show_progress=not args.no_progress, overwrite=args.overwrite,
                       keep_degenerate=args.keep_degenerate_layers)
