"""Per-layer choices from calibration data: the technique of activation-fed inputs and the SmoothQuant alpha.

Both measure a layer's output error the way the backends will quantize it: static per-segment scales
calibrated on the same inputs (``SegmentAmaxObserver`` + ``static_calibration``), through the reference numerics
(``segquant.numerics.reference_linear``), against the float layer. The result is an edited plan, so both backends
quantize the choice without knowing it was made.

- ``choose_techniques``: per layer with activation-fed inputs, the best of ``plain`` / ``shift`` / ``dual_scale``
  / ``both`` that the plan enables. The shift costs nothing at run time (a bias); DualScale adds GEMM work
  (``segquant.cost.CostModel``), so it is kept only when its gain over the best free candidate reaches
  ``threshold`` dB of SQNR per percent of the model's quantized GEMM time.
- ``search_alpha``: per quantized layer, the SmoothQuant alpha of a grid (0 to 1, step 0.1) with the smallest
  output error, written to ``LinearPlan.smoothquant_alpha``.

Example:
    >>> inputs = capture_linear_inputs(model, calibration_batches)
    >>> plan, report = choose_techniques(model, recipe.apply(analyze(model, **example)), inputs)
    >>> plan, alphas = search_alpha(model, plan, inputs)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterable, Mapping, Sequence, TypeVar

import torch
from torch import Tensor, nn

from .calib import SegmentAmaxObserver, layer_alpha, static_calibration
from .cost import CostModel, subsample_rows
from .distributed import gather_rows, merge_observers
from .errors import SegQuantError
from .numerics import ActivationStats, QuantSpec, reference_linear, sqnr_db
from .plan import LinearPlan, SegQuantPlan
from .precision import get_precision
from .recording import record_linears

if TYPE_CHECKING:  # choose only reads a recipe's fields
    from .recipe import Recipe

K = TypeVar("K", bound=Hashable)

logger = logging.getLogger(__name__)

CANDIDATES = ("plain", "shift", "dual_scale", "both")
"""The techniques an activation-fed input can get; ``both`` = DualScale on ``x - c``."""

ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(11))
"""SPEC section 4: SmoothQuant alpha from 0 to 1 in steps of 0.1."""


@dataclass(frozen=True)
class LayerChoice:
    """What was measured and chosen on one layer.

    Args:
        name: module name.
        sqnr_db: candidate -> layer output SQNR (dB) against the float layer on the calibration inputs.
        extra_cost_pct: candidate -> extra GEMM time, percent of the model's quantized GEMM time.
        chosen: the candidate kept.
    """

    name: str
    sqnr_db: Mapping[str, float]
    extra_cost_pct: Mapping[str, float]
    chosen: str


def layer_error(linear: nn.Linear, layer: LinearPlan, x: Tensor, spec: QuantSpec = QuantSpec(),
                alpha: float | None = None, ranges: ActivationStats | None = None) -> float:
    """SQNR (dB) of ``layer`` quantized as the backends do (static scales calibrated on ``x``, or on ``ranges``,
    the per-channel ranges of every calibration row when ``x`` is a subsample of them; SmoothQuant ``alpha``: the
    layer's own when the plan sets one) against the float ``linear`` on ``x`` ``(rows, K)``."""
    w = linear.weight.detach().float()
    b = None if linear.bias is None else linear.bias.detach().float()
    x = x.detach().float().to(w.device).reshape(-1, layer.in_features)  # captured on the CPU; weights may be on a GPU
    observer = SegmentAmaxObserver(layer)
    observer.update(x)
    if ranges is not None:  # the scales the backend will compute: from all rows, not from the subsample
        observer.channels = ActivationStats(*(t.to(w.device) for t in (ranges.amax, ranges.pos_amax,
                                                                     ranges.neg_amax)))
    stats, smooth = static_calibration(observer, w, layer_alpha(layer, alpha))
    y = reference_linear(x, w, b, layer, spec, stats, smooth)
    return sqnr_db(torch.nn.functional.linear(x, w, b), y)


def candidate_entries(layer: LinearPlan) -> dict[str, LinearPlan]:
    """The plan entries of the candidates ``layer`` enables: its activation-fed segments (``activation_segments``)
    with nothing, its shift, DualScale, or both. ``dual_scale``/``both`` only when
    the entry has DualScale; ``shift``/``both`` only when it has a shift (``Recipe(dual_scale=True,
    shift=...)`` enables all four)."""
    segs = layer.activation_segments
    if not segs:
        return {"plain": layer}
    kind = layer.shift
    has_dual, has_shift = layer.dual_scale, layer.shift is not None
    entries = {"plain": layer.replace(dual_scale=False, shift=None, activation=layer.activation)}
    if has_shift:
        entries["shift"] = layer.replace(dual_scale=False, shift=kind, shift_segments=segs, activation=layer.activation)
    if has_dual:
        entries["dual_scale"] = layer.replace(shift=None, dual_scale=True, dual_scale_segments=segs,
                                              activation=layer.activation)
    if has_dual and has_shift:
        entries["both"] = layer.replace(dual_scale=True, dual_scale_segments=segs, shift=kind, shift_segments=segs,
                                        activation=layer.activation)
    return entries


def _pick(sqnr: Mapping[str, float], cost_pct: Mapping[str, float], threshold: float) -> str:
    """The best free candidate, unless a costly one gains at least ``threshold`` dB per percent of GEMM time."""
    free = [c for c in sqnr if cost_pct[c] == 0]
    best = max(free, key=lambda c: sqnr[c])
    for c in sorted((c for c in sqnr if cost_pct[c] > 0), key=lambda c: -sqnr[c]):
        gain = sqnr[c] - sqnr[best]
        if gain > 0 and gain / cost_pct[c] >= threshold:
            return c
    return best


def choose_techniques(model: nn.Module, plan: SegQuantPlan, inputs: Mapping[str, Tensor],
                      spec: QuantSpec = QuantSpec(), cost: CostModel = CostModel(), threshold: float = 0.5,
                      alpha: float | None = None, ranges: Mapping[str, ActivationStats] | None = None,
                      ) -> tuple[SegQuantPlan, list[LayerChoice]]:
    """The plan with, per quantized layer with activation-fed inputs, the candidate kept by measured SQNR and cost.

    Args:
        inputs: layer name -> calibration inputs (``segquant.cost.capture_linear_inputs``); layers without
            inputs keep their entry.
        spec: the formats the layers will be quantized with (weights per tensor or per channel ...).
        cost: prices DualScale's extra GEMM work (the shift is free).
        threshold: dB of SQNR per percent of the model's GEMM time a costly candidate must buy; 0 keeps the
            best-scoring candidate whatever it costs.
        alpha: the quantize options' SmoothQuant alpha (a layer's own alpha wins).
        ranges: layer name -> per-channel ranges of all calibration rows (``capture_from_loop(ranges=...)``),
            when ``inputs`` are a subsample: scales as the backend will compute them.
    Returns:
        ``(plan, choices)``.
    Raises:
        SegQuantError: bad ``threshold`` or a planned layer that is not an ``nn.Linear`` of ``model``.
    """
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not threshold >= 0:
        raise SegQuantError(f"threshold must be a number >= 0 (dB per % of GEMM time), got {threshold!r}")
    modules = dict(model.named_modules())
    tokens = {n: (inputs[n].numel() // inputs[n].shape[-1] if n in inputs else cost.tokens) for n in plan.layers}
    total = sum(cost.base(p, tokens[n]) for n, p in plan.layers.items() if p.quantized) or 1.0
    layers, choices = dict(plan.layers), []
    with torch.no_grad():
        for name in plan.quantized_layers():
            layer = plan[name]
            if not layer.activation_segments or name not in inputs:
                continue
            linear = _linear(modules, name, model)
            entries = candidate_entries(layer)
            full = None if ranges is None else ranges.get(name)
            sqnr = {c: _finite(layer_error(linear, e, inputs[name], spec, alpha, full)) for c, e in entries.items()}
            frac = cost.base(layer, tokens[name]) / total
            cost_pct = {c: 100.0 * cost.extra(e)[0] * frac for c, e in entries.items()}
            chosen = _pick(sqnr, cost_pct, threshold)
            layers[name] = dataclasses.replace(entries[chosen], patterns=layer.patterns)
            choices.append(LayerChoice(name, sqnr, cost_pct, chosen))
            logger.debug("%s: %s -> %s", name, {c: round(v, 2) for c, v in sqnr.items()}, chosen)
    logger.info("per-layer choice: %s", _count(choices))
    return dataclasses.replace(plan, layers=layers), choices


def search_alpha(model: nn.Module, plan: SegQuantPlan, inputs: Mapping[str, Tensor], spec: QuantSpec = QuantSpec(),
                 grid: Sequence[float] = ALPHA_GRID, ranges: Mapping[str, ActivationStats] | None = None,
                 ) -> tuple[SegQuantPlan, dict[str, dict[float, float]]]:
    """The plan with each quantized layer's ``smoothquant_alpha`` set to the grid value with the best output SQNR
    on its calibration inputs (layers without inputs keep theirs; ``ranges`` as in ``choose_techniques``).

    Returns:
        ``(plan, {layer: {alpha: SQNR dB}})``.
    Raises:
        SegQuantError: an empty grid or a value outside [0, 1].
    """
    grid = tuple(grid)
    if not grid or not all(isinstance(a, (int, float)) and not isinstance(a, bool) and 0 <= a <= 1 for a in grid):
        raise SegQuantError(f"the alpha grid must be a non-empty list of numbers in [0, 1], got {list(grid)!r}")
    modules = dict(model.named_modules())
    layers, scores = dict(plan.layers), {}
    with torch.no_grad():
        for name in plan.quantized_layers():
            if name not in inputs:
                continue
            linear = _linear(modules, name, model)
            layer = plan[name]
            full = None if ranges is None else ranges.get(name)
            scores[name] = {float(a): _finite(layer_error(linear, layer.replace(smoothquant_alpha=float(a)),
                                                          inputs[name], spec, None, full)) for a in grid}
            best = max(scores[name], key=scores[name].get)
            layers[name] = layer.replace(smoothquant_alpha=best)
    logger.info("alpha search on %d layers: %s", len(scores),
                _count([LayerChoice(n, {}, {}, f"{layers[n].smoothquant_alpha:g}") for n in scores]))
    return dataclasses.replace(plan, layers=layers), scores


def _linear(modules: Mapping[str, nn.Module], name: str, model: nn.Module) -> nn.Linear:
    module = modules.get(name)
    if not isinstance(module, nn.Linear):
        raise SegQuantError(f"{name}: in the plan but not an nn.Linear of {type(model).__name__}; re-run "
                            "segquant.analyze on this model")
    return module


def _finite(v: float) -> float:
    return v if math.isfinite(v) else 200.0  # an exact layer (no noise) scores as very good, not as NaN


def _count(choices: Sequence[LayerChoice]) -> str:
    counts: dict[str, int] = {}
    for c in choices:
        counts[c.chosen] = counts.get(c.chosen, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "no layer"


def capture_from_loop(model: nn.Module, forward_loop: Callable[[nn.Module], Any], names: Iterable[str],
                      rows_per_call: int = 256, max_rows: int = 4096,
                      ranges: dict[str, ActivationStats] | None = None) -> dict[str, Tensor]:
    """Inputs of the named Linears while ``forward_loop(model)`` runs (the calibration loop a backend takes):
    at most ``rows_per_call`` evenly spaced rows per call and ``max_rows`` in all, on the CPU (a FLUX-size model
    over 50 steps would otherwise hold gigabytes). In a process group, every rank's rows, gathered in rank order.
    ``ranges``, when given, receives each layer's per-channel ranges over EVERY row (merged across ranks): the
    static scales the backend will compute, which a subsample's own ranges underestimate."""
    names = list(names)
    observers = {n: None for n in names}

    def observe(name: str, x: Tensor) -> None:
        if observers[name] is None:
            observers[name] = SegmentAmaxObserver(segments=(x.shape[-1],), name=name)
        observers[name].update(x.detach())

    with record_linears(model, names, transform=lambda x: subsample_rows(x, rows_per_call).float(),
                        on_input=None if ranges is None else observe) as rec, torch.no_grad():
        forward_loop(model)
    if ranges is not None:
        reached = {n: o for n, o in observers.items() if o is not None}
        merge_observers(reached)  # a collective under torch.distributed (every rank reached the same layers)
        ranges.update({n: o.channel_stats() for n, o in reached.items()})
    local = {n: torch.cat(parts) for n, parts in rec.inputs.items() if parts}
    return {n: subsample_rows(x, max_rows) for n, x in gather_rows(local).items()}  # every rank's, when distributed


def apply_choices(model: nn.Module, plan: SegQuantPlan, inputs: Mapping[str, Tensor], choose: str = "fixed",
                  alpha_search: bool = False, alpha: float | None = None, realisation: str = "split_k",
                  cost: CostModel = CostModel(), threshold: float = 0.5,
                  ranges: Mapping[str, ActivationStats] | None = None) -> tuple[SegQuantPlan, list[str]]:
    """What a recipe's ``alpha_search: true`` and ``choose: auto`` do to its applied plan, in that order, on
    calibration inputs (``capture_from_loop`` over the float model). Returns the plan and one line per step for
    the job's notes; the plan unchanged when neither is asked for.

    Raises:
        SegQuantError: the plan has no precision (apply a recipe first) or ``choose`` is unknown.
    """
    if choose not in ("fixed", "auto"):
        raise SegQuantError(f"choose must be 'fixed' or 'auto', got {choose!r}")
    if choose == "fixed" and not alpha_search:
        return plan, []
    precision = plan.precision()
    if precision is None:
        raise SegQuantError("per-layer choices need an applied plan (a recipe's precision): apply the recipe first")
    spec = get_precision(precision).quant_spec(realisation)
    notes = []
    if alpha_search:
        plan, scores = search_alpha(model, plan, inputs, spec, ranges=ranges)
        alphas = [LayerChoice(n, {}, {}, f"alpha {plan[n].smoothquant_alpha:g}") for n in scores]
        notes.append(f"alpha search on {len(scores)} layers: {_count(alphas)}")
    if choose == "auto":
        plan, choices = choose_techniques(model, plan, inputs, spec, cost, threshold, alpha, ranges)
        notes.append(f"per-layer technique choice on {len(choices)} layers: {_count(choices)}")
    return plan, notes


def recipe_choices(model: nn.Module, plans: Mapping[K, SegQuantPlan], recipe: Recipe,
                   forward_loop: Callable[[nn.Module], Any]) -> tuple[dict[K, SegQuantPlan], dict[K, list[str]]]:
    """A recipe's ``alpha_search`` and ``choose: auto`` on each of ``plans`` (its applied plan, or ablations of it),
    from ONE pass of the calibration loop over the float ``model``; the plans as they are when the recipe asks for
    neither. Returns the plans and each one's notes."""
    if recipe.choose == "fixed" and not recipe.alpha_search:
        return dict(plans), {key: [] for key in plans}
    ranges: dict[str, ActivationStats] = {}
    names = set().union(*(p.quantized_layers() for p in plans.values()))
    inputs = capture_from_loop(model, forward_loop, names, ranges=ranges)
    out, notes = {}, {}
    for key, plan in plans.items():
        out[key], notes[key] = apply_choices(model, plan, inputs, recipe.choose, recipe.alpha_search,
                                             recipe.smoothquant_alpha, recipe.realisation, ranges=ranges)
    return out, notes
