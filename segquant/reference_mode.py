"""Reference mode: SegQuant set up to reproduce the fake quantization of the paper's reference code.

The reference code (github OptiSys-ZJU/segquant) and SegQuant implement the same method with different
conventions. Reference mode is SegQuant's own code with the reference's conventions as options:

- plan (``analyze``, ``reference_plan``): every Linear quantized (embedders and the final ``proj_out`` too), one
  input segment per attention head on a Linear fed by merged heads, one segment per input of a concatenation
  (no heads inside it), segments only where they are of equal size, DualScale only on a Linear whose whole input
  comes from an activation;
- numerics (``reference_options``): per-segment SmoothQuant (``smoothing="per_segment"``) and reciprocal scales
  (``scale_form="reciprocal"``: ``q = round(x * 127 / amax)``, ``x_hat = q / (127 / amax)``), split-K input
  segments, static max calibration of the float model.

The ModelOpt backend implements it (fake quantization); torchao implements per-segment SmoothQuant in the
``step`` scale form only, so it refuses ``reference_options`` (its ``scale_form="reciprocal"``).
``benchmarks/reference_parity.py`` checks it against the reference's own outputs
(``benchmarks/results/reference_parity.md``).

Example:
    >>> import segquant
    >>> from segquant import reference_mode
    >>> plan = reference_mode.analyze(transformer, **example_kwargs).with_precision("int8_w8a8")
    >>> options = reference_mode.reference_options(smoothquant_alpha=0.5)
    >>> segquant.get_backend("modelopt").quantize(transformer, plan, options, forward_loop)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from .backend import QuantizeOptions
from .graph import AnalysisOptions
from .graph import analyze as _analyze
from .plan import LinearPlan, SegQuantPlan

ANALYSIS_OPTIONS = AnalysisOptions(head_segments=True, keep_output_layer=False, nested_segments=False)
"""Graph analysis as the reference detects patterns: heads as segments, whole concatenated inputs, no layer kept."""


def reference_options(smoothquant_alpha: float | None = None, show_progress: bool = False) -> QuantizeOptions:
    """The ``QuantizeOptions`` of the reference code's numerics (alpha 0.5 is its SmoothQuant setting)."""
    return QuantizeOptions(smoothquant_alpha=smoothquant_alpha, realisation="split_k", show_progress=show_progress,
                           smoothing="per_segment", scale_form="reciprocal")


def _equal(sizes: tuple[int, ...]) -> bool:
    return len(set(sizes)) == 1


def reference_layer(layer: LinearPlan) -> LinearPlan:
    """One plan entry under the reference's conventions: unequal input (output) segments merged into one, DualScale
    only when every input segment is activation-fed, quantized."""
    changes: dict[str, Any] = {}
    if not _equal(layer.out_segments):
        changes["out_segments"] = ()
    whole_dual = layer.dual_scale and len(layer.dual_scale_segments) == len(layer.in_segments)
    if not _equal(layer.in_segments):
        changes.update(in_segments=(), dual_scale=whole_dual)
    elif layer.dual_scale and not whole_dual:
        changes["dual_scale"] = False
    if layer.high_precision:
        changes["high_precision"] = False
    return layer.replace(**changes) if changes else layer


def reference_plan(plan: SegQuantPlan) -> SegQuantPlan:
    """``plan`` under the reference's conventions (``reference_layer`` on every entry)."""
    return dataclasses.replace(plan, layers={n: reference_layer(p) for n, p in plan.layers.items()})


def analyze(model: nn.Module, *example_args: Any, **example_kwargs: Any) -> SegQuantPlan:
    """``segquant.analyze`` with ``ANALYSIS_OPTIONS``, then ``reference_plan``."""
    return reference_plan(_analyze(model, *example_args, analysis_options=ANALYSIS_OPTIONS, **example_kwargs))
