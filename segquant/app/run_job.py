"""``segquant run``: quantize an embedded model with SegQuant and with the backend's own preset, sample
all rows from the same noise, and write a report folder (metrics.json, report.md, grid.png, layers.png)."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import SegQuantError
from .quantize_job import BACKENDS, backend_module
from .recipe import PRECISIONS, Recipe, load_recipe

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class RunSettings:
    """What ``segquant run`` does.

    Args:
        model: an embedded model name (``mnist-flux``, ``mnist-unet``) or a folder in that layout.
        backend: ``modelopt`` or ``torchao``.
        recipe: a precision (``int8_w8a8``...; the model's bundled recipe), a bundled recipe name or a file.
        num_samples: images per row (same noise and labels in every row).
        calib_samples: calibration images (their own noise); None = the recipe's.
        steps: Euler steps; None = the recipe's.
        out: report folder.
        device: torch device.
        seed: noise seed of the evaluated images (calibration uses ``seed + 1``).
    """

    model: str = "mnist-flux"
    backend: str = "modelopt"
    recipe: str = "int8_w8a8"
    num_samples: int = 8
    calib_samples: int | None = None
    steps: int | None = None
    out: str = "segquant-run"
    device: str = "cpu"
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:  # the backends of segquant quantize
            raise SegQuantError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.num_samples < 1:
            raise SegQuantError(f"--num-samples must be at least 1, got {self.num_samples}")
        if self.calib_samples is not None and self.calib_samples < 1:
            raise SegQuantError(f"--calib-samples must be at least 1, got {self.calib_samples}")
        if self.steps is not None and self.steps < 1:
            raise SegQuantError(f"--steps must be at least 1, got {self.steps}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise SegQuantError(f"--device {self.device}: no CUDA device is available")


@dataclass
class RowResult:
    label: str
    images: torch.Tensor
    summary: dict[str, Any] = field(default_factory=dict)
    layer_sqnr: dict[str, float] = field(default_factory=dict)
    quantized_layers: set[str] = field(default_factory=set)
    seconds: float = 0.0


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


def _quantize(backend, kind: str, den, recipe: Recipe, plan, forward_loop, settings: RunSettings):
    if kind == "baseline":
        return backend.quantize_baseline(den.model, recipe.precision, forward_loop)
    model = backend.quantize_segquant(den.model, recipe, plan, forward_loop, show_progress=settings.progress)
    return model, f"SegQuant {recipe.name} ({settings.backend})"


def run(settings: RunSettings) -> dict[str, Any]:
    """Do the whole job; returns the metrics written to ``metrics.json``."""
    from .embedded import load_classifier, load_denoiser, mnist_test_feature_stats, sample, sample_labels
    from .evaluation import (layer_sqnr, linear_flops, mean_sqnr, quantized_flop_fraction, record_linear_io,
                             score_images)
    from .graph import analyze
    from .report import write_report

    out = Path(settings.out)
    if out.exists() and not out.is_dir():
        raise SegQuantError(f"--out {out} exists and is not a folder")
    start = time.time()
    fp = load_denoiser(settings.model, settings.device)
    model_class = type(fp.model).__name__
    recipe = resolve_recipe(settings, settings.model, model_class)
    backend = backend_module(settings.backend)
    steps = settings.steps or recipe.calibration.steps
    n_calib = settings.calib_samples or recipe.calibration.num_prompts
    labels = sample_labels(settings.num_samples)
    calib_labels = sample_labels(n_calib)
    classifier = load_classifier(settings.device)
    mnist = mnist_test_feature_stats()

    example = fp.example_inputs(2)
    plan = recipe.apply(analyze(fp.model, **example))

    reference_io = record_linear_io(fp.model, lambda: fp.model(**example))
    flops = linear_flops(reference_io)

    def forward_loop_for(den):
        def forward_loop(model):
            sample(den, calib_labels, seed=settings.seed + 1, steps=steps, progress=settings.progress,
                   desc="calibrating")
        return forward_loop

    t = time.time()
    rows = [RowResult("full precision", sample(fp, labels, seed=settings.seed, steps=steps,
                                               progress=settings.progress, desc="sampling full precision"))]
    rows[0].seconds = time.time() - t

    failed: dict[str, str] = {}
    for kind in ("baseline", "segquant"):
        t = time.time()
        den = copy.deepcopy(fp)
        quiet = contextlib.nullcontext() if settings.progress else contextlib.redirect_stdout(io.StringIO())
        try:
            with quiet:  # ModelOpt prints what it inserts
                den.model, label = _quantize(backend, kind, den, recipe, plan, forward_loop_for(den), settings)
        except Exception as e:  # noqa: BLE001 - a baseline that cannot run here is reported, not fatal
            if kind != "baseline":
                raise
            logger.warning("the %s baseline for %s could not run here: %s", settings.backend, recipe.precision, e)
            failed[f"{settings.backend} baseline for {recipe.precision}"] = f"{type(e).__name__}: {e}"
            continue
        images = sample(den, labels, seed=settings.seed, steps=steps, progress=settings.progress,
                        desc=f"sampling {kind}")
        row = RowResult(label, images, layer_sqnr=layer_sqnr(den.model, reference_io),
                        quantized_layers=backend.quantized_linears(den.model))
        row.seconds = time.time() - t
        rows.append(row)

    fp_scores = score_images(rows[0].images, rows[0].images, labels, classifier)
    changed = sorted(name for name, lp in plan.layers.items() if not lp.is_plain)
    changed = [c for c in changed if c in rows[-1].quantized_layers]
    for i, row in enumerate(rows):
        scores = fp_scores if i == 0 else score_images(row.images, rows[0].images, labels, classifier)
        row.summary = scores.summary(None if i == 0 else fp_scores, mnist)
        if i > 0:
            row.summary["quantized_linear_flop_fraction"] = quantized_flop_fraction(flops, row.quantized_layers)
            row.summary["mean_sqnr_db_changed_layers"] = mean_sqnr(row.layer_sqnr, changed, row.quantized_layers)
        row.summary["seconds"] = row.seconds

    metrics = {
        "settings": asdict(settings), "recipe": recipe.name, "model_class": model_class, "steps": steps,
        "calib_samples": n_calib, "rows": {row.label: row.summary for row in rows},
        "failed_rows": failed,
        "layer_sqnr_db": {row.label: row.layer_sqnr for row in rows[1:]},
        "segquant_changed_layers": changed,
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "device": torch.cuda.get_device_name() if settings.device.startswith("cuda")
                        else platform.processor() or "cpu", "command": " ".join(sys.argv)},
        "seconds": time.time() - start,
    }
    write_report(out, metrics, rows)
    return metrics
