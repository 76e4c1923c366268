"""``segquant run``: quantize an embedded model with SegQuant and with the backend's own preset, sample
all rows from the same noise, and write a report folder (metrics.json, report.md, grid.png, layers.png)."""

from __future__ import annotations

import copy
import dataclasses
import logging
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from segquant import Backend, SegQuantError, SegQuantPlan, analyze, backend_names, get_backend
from segquant.backend import check_supported
from segquant.recipe import PRECISIONS, Recipe, load_recipe

from .extras import require
from .outputs import check_output_folder, staged_output
from .parallel import is_main
from .pipelines import check_device
from .quantize_job import DEFAULT_BACKEND

COMMAND = "segquant run"

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class RunSettings:
    """What ``segquant run`` does.

    Args:
        model: an embedded model name (``mnist-flux``, ``mnist-unet``) or a folder in that layout.
        backend: a registered backend (``segquant.backend_names()``).
        recipe: a precision (``int8_w8a8``...; the model's bundled recipe), a bundled recipe name or a file.
        num_samples: images per row (same noise and labels in every row).
        calib_samples: calibration images (their own noise); None = the recipe's.
        steps: Euler steps; None = the recipe's.
        out: report folder.
        device: torch device.
        seed: noise seed of the evaluated images (calibration uses ``seed + 1``).
        progress: one progress bar per sampling and calibration step (a plain line when stderr is not a
            terminal).
        overwrite: replace a non-empty ``out`` that is not an earlier ``segquant run`` report.
    """

    model: str = "mnist-flux"
    backend: str = DEFAULT_BACKEND
    recipe: str = "int8_w8a8"
    num_samples: int = 8
    calib_samples: int | None = None
    steps: int | None = None
    out: str = "segquant-run"
    device: str = "cpu"
    seed: int = 0
    progress: bool = True
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.backend not in backend_names():
            raise SegQuantError(f"unknown backend {self.backend!r}; choose one of {', '.join(backend_names())}")
        if self.num_samples < 1:
            raise SegQuantError(f"--num-samples must be at least 1, got {self.num_samples}")
        if self.calib_samples is not None and self.calib_samples < 1:
            raise SegQuantError(f"--calib-samples must be at least 1, got {self.calib_samples}")
        if self.steps is not None and self.steps < 1:
            raise SegQuantError(f"--steps must be at least 1, got {self.steps}")
        check_device(self.device)


@dataclass
class RowResult:
    label: str
    images: torch.Tensor
    summary: dict[str, Any] = field(default_factory=dict)
    layer_sqnr: dict[str, float] = field(default_factory=dict)
    quantized_layers: set[str] = field(default_factory=set)
    seconds: float = 0.0
    psnr: torch.Tensor | None = None  # per image, against the full-precision row
    kind: str = ""  # one of ROW_KINDS for a quantized row


def resolve_recipe(settings: RunSettings, model_name: str, model_class: str) -> Recipe:
    """A precision name picks the model's bundled recipe; anything else is a recipe name or file."""
    if settings.recipe in PRECISIONS:
        family = model_name if model_name.startswith("mnist-") else \
            ("mnist-flux" if model_class == "FluxTransformer2DModel" else "mnist-unet")
        recipe = load_recipe(f"{family}/{settings.recipe}")
    else:
        recipe = load_recipe(settings.recipe)
    if recipe.model_class != model_class:
        raise SegQuantError(f"recipe {recipe.name} is for a {recipe.model_class}; the model {model_name} is a "
                            f"{model_class}")
    return recipe


ROW_KINDS = ("baseline", "techniques_off", "segquant", "segquant_shift", "segquant_dual_scale")
"""The quantized rows: the library's preset as shipped; the same applied recipe (precision, activation mode,
skip list, SmoothQuant) with SegLinear, DualScale and the shift switched off, through the same backend (the
like-for-like row a gain of SegQuant is measured against); SegQuant as the recipe says; and the recipe's other
choice for the post-GELU/SiLU inputs: the activation shift in place of DualScale (a plain GEMM per layer: the
like-for-like row's cost) for a recipe without a shift, DualScale in place of the shift for a recipe with one
(the bundled INT8 recipes)."""

SHIFT_ROW = "per_tensor"
"""The shift of the ``segquant_shift`` row when the recipe sets none."""


def row_plans(recipe: Recipe, analysed: SegQuantPlan) -> dict[str, SegQuantPlan]:
    """The applied plan of every SegQuant-quantized row kind: ``segquant_shift`` for a recipe without a shift,
    ``segquant_dual_scale`` for a recipe that shifts without DualScale; either is left out when it equals the
    recipe's own plan."""
    plan = recipe.apply(analysed)
    plans = {"techniques_off": plan.ablate(seg_linear=False, dual_scale=False, shift=False), "segquant": plan}
    if recipe.shift is None:
        other = ("segquant_shift", dataclasses.replace(recipe, shift=SHIFT_ROW, dual_scale=False))
    elif not recipe.dual_scale:
        other = ("segquant_dual_scale", dataclasses.replace(recipe, shift=None, dual_scale=True))
    else:
        return plans
    other_plan = other[1].apply(analysed)
    if other_plan != plan:
        plans[other[0]] = other_plan
    return plans


def row_label(kind: str, recipe: Recipe, backend: str) -> str:
    return {"techniques_off": f"{recipe.name} without SegLinear, DualScale and shift ({backend})",
            "segquant": f"SegQuant {recipe.name} ({backend})",
            "segquant_shift": f"SegQuant {recipe.name} with shift instead of DualScale ({backend})",
            "segquant_dual_scale": f"SegQuant {recipe.name} with DualScale instead of the shift ({backend})"}[kind]


def _quantize(backend: Backend, kind: str, den, recipe: Recipe, plans: dict[str, SegQuantPlan], forward_loop,
              settings: RunSettings):
    if kind == "baseline":
        return backend.quantize_baseline(den.model, recipe.precision, forward_loop)
    options = recipe.quantize_options(show_progress=False)  # the forward loop's bar is this step's only one
    return backend.quantize(den.model, plans[kind], options, forward_loop), row_label(kind, recipe, settings.backend)


@dataclass
class _Job:
    """What every row of one run shares."""

    settings: RunSettings
    fp: Any
    recipe: Recipe
    plans: dict[str, SegQuantPlan]
    backend: Backend
    steps: int
    labels: torch.Tensor
    calib_labels: torch.Tensor
    example: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def plan(self) -> SegQuantPlan:
        """The recipe's applied plan (the SegQuant row's)."""
        return self.plans["segquant"]

    def forward_loop_for(self, den, kind: str):
        from .embedded import sample

        def forward_loop(model):
            sample(den, self.calib_labels, seed=self.settings.seed + 1, steps=self.steps,
                   progress=self.settings.progress, desc=f"calibrating {kind}")
        return forward_loop

    def sample(self, den, desc: str) -> torch.Tensor:
        from .embedded import sample

        return sample(den, self.labels, seed=self.settings.seed, steps=self.steps, progress=self.settings.progress,
                      desc=desc)


def _prepare(settings: RunSettings) -> _Job:
    from .embedded import load_denoiser, sample_labels

    fp = load_denoiser(settings.model, settings.device)
    model_class = type(fp.model).__name__
    recipe = resolve_recipe(settings, settings.model, model_class)
    backend = get_backend(settings.backend)
    example = fp.example_inputs(2)
    plans = row_plans(recipe, analyze(fp.model, **example))  # analysed once; the rows quantize these plans
    for plan in plans.values():
        check_supported(backend, plan)
    job = _Job(settings, fp, recipe, plans, backend, settings.steps or recipe.calibration.steps,
               sample_labels(settings.num_samples),
               sample_labels(settings.calib_samples or recipe.calibration.num_prompts), example)
    if recipe.choose == "auto" or recipe.alpha_search:
        job.plans, job.notes = _per_layer_choices(job)
    return job


def _per_layer_choices(job: _Job) -> tuple[dict[str, SegQuantPlan], list[str]]:
    """The recipe's alpha search and per-layer technique choice on every row's plan, from one calibration pass."""
    from segquant.choose import recipe_choices

    loop = job.forward_loop_for(job.fp, "per-layer choices")
    plans, notes = recipe_choices(job.fp.model, job.plans, job.recipe, loop)
    return plans, [f"{row_label(kind, job.recipe, job.settings.backend)}: {n}" for kind in plans for n in notes[kind]]


def _quantized_row(job: _Job, kind: str, reference_io, failed: dict[str, str]) -> RowResult | None:
    """One quantized row; a baseline that cannot run here is recorded in ``failed`` instead of raised."""
    from .evaluation import layer_sqnr

    t = time.time()
    den = copy.deepcopy(job.fp)
    try:
        den.model, label = _quantize(job.backend, kind, den, job.recipe, job.plans, job.forward_loop_for(den, kind),
                                     job.settings)
    except Exception as e:  # noqa: BLE001 - a baseline that cannot run here is reported, not fatal
        if kind != "baseline":
            raise
        what = f"{job.settings.backend} baseline for {job.recipe.precision}"
        logger.warning("the %s could not run here: %s", what, e)
        failed[what] = f"{type(e).__name__}: {e}"
        return None
    images = job.sample(den, f"sampling {kind}")
    row = RowResult(label, images, layer_sqnr=layer_sqnr(den.model, reference_io),
                    quantized_layers=set(job.backend.quantized_linears(den.model)), kind=kind)
    row.seconds = time.time() - t
    return row


def _score(job: _Job, rows: list[RowResult], flops: dict[str, int]) -> list[str]:
    """Fill every row's summary; returns the layers SegQuant changes that the SegQuant row quantizes."""
    from .embedded import load_classifier, mnist_test_feature_stats
    from .evaluation import mean_sqnr, quantized_flop_fraction, score_images

    classifier, mnist = load_classifier(job.settings.device), mnist_test_feature_stats()
    fp_scores = score_images(rows[0].images, rows[0].images, job.labels, classifier)
    changed = [n for n in sorted(job.plan.quantized_layers()) if not job.plan[n].is_plain]
    for row in rows:  # the contract, checked where it is reported
        planned = job.plans.get(row.kind)
        if planned is not None and row.quantized_layers != set(planned.quantized_layers()):
            diff = sorted(row.quantized_layers ^ set(planned.quantized_layers()))
            raise SegQuantError(f"backend {job.settings.backend} quantized other layers than the applied plan of "
                                f"{row.label}: {diff[:5]}")
    for i, row in enumerate(rows):
        scores = fp_scores if i == 0 else score_images(row.images, rows[0].images, job.labels, classifier)
        row.psnr = scores.psnr
        row.summary = scores.summary(None if i == 0 else fp_scores, mnist)
        if i > 0:
            row.summary["quantized_linear_flop_fraction"] = quantized_flop_fraction(flops, row.quantized_layers)
            row.summary["mean_sqnr_db_changed_layers"] = mean_sqnr(row.layer_sqnr, changed, row.quantized_layers)
        row.summary["seconds"] = row.seconds
    return changed


def compare_rows(rows: list[RowResult], changed: list[str]) -> dict[str, Any]:
    """SegQuant (the ``segquant`` row) against every other quantized row: the paired per-image PSNR difference with
    its 95% bootstrap interval, and, per layer SegQuant changes, its SQNR against that row's on the same inputs."""
    from .metrics import paired_interval

    seg = next((row for row in rows if row.kind == "segquant"), None)
    out: dict[str, Any] = {}
    for other in rows[1:] if seg is not None else []:
        if other is seg:
            continue
        entry: dict[str, Any] = {"against": other.label, "like_for_like": other.kind == "techniques_off"}
        try:
            interval = paired_interval(seg.psnr, other.psnr)
            entry.update(psnr_db_difference=interval.mean, low=interval.low, high=interval.high, n=interval.n,
                         verdict=("better" if interval.low > 0 else "worse" if interval.high < 0 else "within noise"))
        except SegQuantError as e:  # e.g. identical images (infinite PSNR)
            entry["verdict"] = f"no interval: {e}"
        entry["layers"] = {n: {"segquant_db": seg.layer_sqnr.get(n), "other_db": other.layer_sqnr.get(n)}
                           for n in changed}
        out[other.label] = entry
    return out


ATTRIBUTION = (("total", "segquant", "baseline"), ("recipe", "techniques_off", "baseline"),
               ("method", "segquant", "techniques_off"), ("shift", "segquant_shift", "techniques_off"),
               ("shift_vs_segquant", "segquant_shift", "segquant"),
               ("dual_scale", "segquant_dual_scale", "techniques_off"),
               ("dual_scale_vs_segquant", "segquant_dual_scale", "segquant"))
"""The attribution parts: (key, row kind, row kind it is measured against)."""


def attribute_gain(rows: list[RowResult]) -> dict[str, Any]:
    """Split SegQuant's PSNR gain over the backend's preset into the recipe's part (the same recipe without
    SegQuant's techniques against the preset) and the method's part (SegQuant against that row), and the shift
    row's gain over the same like-for-like row; each a paired per-image difference with its 95% bootstrap
    interval. A part whose rows are missing (or have no interval) is left out; empty without total, recipe and
    method."""
    from .metrics import paired_interval

    by_kind = {row.kind: row for row in rows if row.kind}
    parts = {}
    for key, better_kind, worse_kind in ATTRIBUTION:
        if better_kind not in by_kind or worse_kind not in by_kind:
            continue
        better, worse = by_kind[better_kind], by_kind[worse_kind]
        try:
            iv = paired_interval(better.psnr, worse.psnr)
        except SegQuantError:
            continue
        parts[key] = {"psnr_db_difference": iv.mean, "low": iv.low, "high": iv.high, "n": iv.n,
                      "better": better.label, "worse": worse.label}
    return parts if all(k in parts for k in ("total", "recipe", "method")) else {}


def layer_techniques(plan: SegQuantPlan) -> dict[str, list[str]]:
    """Per quantized layer that SegQuant changes, the techniques acting on it (``segments``, ``dual_scale``,
    ``shift``): what ``layers.png`` marks."""
    out = {}
    for name in plan.quantized_layers():
        p = plan[name]
        found = [t for t, on in (("segments", p.seg_linear), ("dual_scale", p.dual_scale),
                                 ("shift", p.shift is not None)) if on]
        if found:
            out[name] = found
    return out


def run(settings: RunSettings) -> dict[str, Any]:
    """Do the whole job; returns the metrics written to ``metrics.json``."""
    from .evaluation import linear_flops, record_linear_io
    from .report import write_report

    require("run", "segquant run")
    main = is_main()  # under --num-gpus every rank computes, rank 0 writes
    out = check_output_folder(settings.out, [settings.model], COMMAND, settings.overwrite) if main else None
    start = time.time()
    job = _prepare(settings)
    reference_io = record_linear_io(job.fp.model, lambda: job.fp.model(**job.example))
    flops = linear_flops(reference_io)
    t = time.time()
    rows = [RowResult("full precision", job.sample(job.fp, "sampling full precision"))]
    rows[0].seconds = time.time() - t
    failed: dict[str, str] = {}
    kinds = [kind for kind in ROW_KINDS if kind == "baseline" or kind in job.plans]  # the recipe's rows only
    rows += [row for kind in kinds if (row := _quantized_row(job, kind, reference_io, failed))]
    changed = _score(job, rows, flops)
    comparisons = compare_rows(rows, changed)
    attribution = attribute_gain(rows)
    metrics = {
        "settings": asdict(settings), "recipe": job.recipe.name, "model_class": type(job.fp.model).__name__,
        "steps": job.steps, "calib_samples": len(job.calib_labels), "plan": job.plan.summary(), "notes": job.notes,
        "rows": {row.label: row.summary for row in rows}, "failed_rows": failed,
        "layer_sqnr_db": {row.label: row.layer_sqnr for row in rows[1:]},
        "segquant_changed_layers": changed, "comparisons": comparisons, "attribution": attribution,
        "techniques": {row_label(kind, job.recipe, settings.backend): layer_techniques(plan)
                       for kind, plan in job.plans.items() if kind != "techniques_off"},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "device": torch.cuda.get_device_name() if settings.device.startswith("cuda")
                        else platform.processor() or "cpu", "command": " ".join(sys.argv)},
        "seconds": time.time() - start,
    }
    if main:
        with staged_output(out, COMMAND) as stage:  # an earlier report stays until the new one is complete
            write_report(stage, metrics, rows)
    return metrics
