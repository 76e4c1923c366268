"""The SegQuant plan: per Linear, which segments get their own scale and which inputs get DualScale.

The plan is plain data keyed by module name (as ``named_modules()`` yields it). Graph analysis writes
it, ``Recipe.apply`` decides per layer whether it stays in high precision and its precision, and every
backend quantizes exactly what the applied plan says. It round-trips through JSON (schema version 3; versions
1 and 2, which predate ``high_precision`` / ``precision`` and ``shift`` / ``smoothquant_alpha``, are read as well).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import PlanError
from .files import atomic_write_text
from .options import ACTIVATIONS, SHIFTS
from .precision import PRECISIONS
from .schema import LayerFile, PlanFile, fields_set, parse

PLAN_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)

PATTERNS = ("linear->chunk", "linear->split", "linear->unbind", "cat->linear", "stack->linear",
            "reshape->linear", "act->linear", "act->cat->linear", "linear->output", "override")
"""Names of the graph patterns that produce plan entries (see SPEC section 2)."""

OVERRIDABLE = ("in_segments", "out_segments", "dual_scale", "dual_scale_segments", "activation", "high_precision",
               "precision", "shift", "shift_segments", "smoothquant_alpha")


def _as_ints(value: Iterable[int], what: str, name: str, expected: str) -> tuple[int, ...]:
    """``value`` as a tuple of integers (not bools); ``PlanError`` saying ``expected`` otherwise."""
    items = None if isinstance(value, (str, bytes)) or not isinstance(value, Iterable) else tuple(value)
    if items is None or not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        shown = repr(value) if items is None else list(items)
        raise PlanError(f"{name}: {what} must be a list of {expected}, got {shown}")
    return items


def _as_sizes(value: Iterable[int], what: str, name: str) -> tuple[int, ...]:
    sizes = _as_ints(value, what, name, "positive integers")
    if any(s <= 0 for s in sizes):
        raise PlanError(f"{name}: {what} must be positive sizes, got {list(sizes)}")
    return sizes


@dataclass(frozen=True)
class LinearPlan:
    """How one ``nn.Linear`` is quantized.

    Args:
        in_features: K of the layer.
        out_features: N of the layer.
        in_segments: K sizes, each with its own activation scale; ``(in_features,)`` = unsegmented.
        out_segments: N sizes, each with its own weight scale; ``(out_features,)`` = unsegmented.
        dual_scale: whether some input segment gets separate positive/negative scales.
        dual_scale_segments: indices into ``in_segments`` of the segments that get DualScale.
        activation: the activation that produced the DualScale input (one of ``ACTIVATIONS``).
        patterns: graph patterns that produced this entry (``PATTERNS``), for provenance.
        nodes: names of the graph nodes where the patterns were found, for provenance.
        high_precision: the layer is not quantized (a recipe's ``skip``, or the model's output layer).
        precision: the precision the layer is quantized with (a ``segquant.precision`` name), set by
            ``Recipe.apply``; None on an analysed plan (the backend's config decides).
        shift: activation shift (``SHIFTS``): input segments ``shift_segments`` are quantized as ``x - c`` with
            ``c`` the centre of their calibrated range, per segment (``per_tensor``) or per channel
            (``per_channel``), and ``W c`` joins the bias; None = no shift. Combines with DualScale.
        shift_segments: indices into ``in_segments`` of the shifted segments (all of them when ``shift`` is set
            without it).
        smoothquant_alpha: this layer's SmoothQuant alpha (``segquant.choose.search_alpha`` writes it); None =
            the quantize options' alpha.
    """

    in_features: int
    out_features: int
    in_segments: tuple[int, ...] = ()
    out_segments: tuple[int, ...] = ()
    dual_scale: bool = False
    dual_scale_segments: tuple[int, ...] = ()
    activation: str | None = None
    patterns: tuple[str, ...] = ()
    nodes: tuple[str, ...] = ()
    high_precision: bool = False
    precision: str | None = None
    shift: str | None = None
    shift_segments: tuple[int, ...] = ()
    smoothquant_alpha: float | None = None
    name: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        name = self.name or "<layer>"
        for key in ("in_features", "out_features"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise PlanError(f"{name}: {key} must be a positive integer, got {value!r}")
        for key in ("dual_scale", "high_precision"):
            if not isinstance(getattr(self, key), bool):
                raise PlanError(f"{name}: {key} must be true or false, got {getattr(self, key)!r}")
        if self.in_features <= 0 or self.out_features <= 0:
            raise PlanError(f"{name}: features must be positive, got in={self.in_features} "
                            f"out={self.out_features}")
        set_ = object.__setattr__
        set_(self, "in_segments", _as_sizes(self.in_segments or (self.in_features,), "in_segments", name))
        set_(self, "out_segments", _as_sizes(self.out_segments or (self.out_features,), "out_segments", name))
        dual = _as_ints(self.dual_scale_segments, "dual_scale_segments", name, "segment indices")
        set_(self, "dual_scale_segments", tuple(sorted(set(dual))))
        for key in ("patterns", "nodes"):
            value = getattr(self, key)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise PlanError(f"{name}: {key} must be a list of strings, got {value!r}")
            set_(self, key, tuple(value))
        if sum(self.in_segments) != self.in_features:
            raise PlanError(f"{name}: in_segments {list(self.in_segments)} sum to {sum(self.in_segments)}, "
                            f"in_features is {self.in_features}")
        if sum(self.out_segments) != self.out_features:
            raise PlanError(f"{name}: out_segments {list(self.out_segments)} sum to "
                            f"{sum(self.out_segments)}, out_features is {self.out_features}")
        if self.dual_scale and not self.dual_scale_segments:
            set_(self, "dual_scale_segments", tuple(range(len(self.in_segments))))
        if not self.dual_scale and self.dual_scale_segments:
            raise PlanError(f"{name}: dual_scale_segments {list(self.dual_scale_segments)} given but "
                            "dual_scale is False; set dual_scale=True or drop the segments")
        bad = [i for i in self.dual_scale_segments if not 0 <= i < len(self.in_segments)]
        if bad:
            raise PlanError(f"{name}: dual_scale_segments {bad} out of range for "
                            f"{len(self.in_segments)} input segments")
        self._check_shift_and_alpha(name)
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise PlanError(f"{name}: unknown activation {self.activation!r}; expected one of {ACTIVATIONS}")
        if self.precision is not None:
            if self.precision not in PRECISIONS:
                raise PlanError(f"{name}: unknown precision {self.precision!r}; one of {', '.join(PRECISIONS)}")
            if self.high_precision:
                raise PlanError(f"{name}: a layer kept in high precision has no precision (got "
                                f"{self.precision!r}); set precision to null or high_precision to false")

    def _check_shift_and_alpha(self, name: str) -> None:
        set_ = object.__setattr__
        shifted = _as_ints(self.shift_segments, "shift_segments", name, "segment indices")
        set_(self, "shift_segments", tuple(sorted(set(shifted))))
        if self.shift is not None and self.shift not in SHIFTS:
            raise PlanError(f"{name}: unknown shift {self.shift!r}; one of {', '.join(SHIFTS)} or null (no shift)")
        if self.shift is not None and not self.shift_segments:
            set_(self, "shift_segments", tuple(range(len(self.in_segments))))
        if self.shift is None and self.shift_segments:
            raise PlanError(f"{name}: shift_segments {list(self.shift_segments)} given but shift is null; set "
                            f"shift to one of {', '.join(SHIFTS)} or drop the segments")
        bad = [i for i in self.shift_segments if not 0 <= i < len(self.in_segments)]
        if bad:
            raise PlanError(f"{name}: shift_segments {bad} out of range for {len(self.in_segments)} input segments")
        alpha = self.smoothquant_alpha
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                                  or not 0 <= alpha <= 1):
            raise PlanError(f"{name}: smoothquant_alpha must be a number in [0, 1] or null, got {alpha!r}")
        if alpha is not None:
            set_(self, "smoothquant_alpha", float(alpha))

    @property
    def seg_linear(self) -> bool:
        """True when the layer has more than one input or output segment."""
        return len(self.in_segments) > 1 or len(self.out_segments) > 1

    @property
    def is_plain(self) -> bool:
        """True when SegQuant's techniques change nothing for this layer (no segments, DualScale or shift)."""
        return not self.seg_linear and not self.dual_scale and self.shift is None

    @property
    def activation_segments(self) -> tuple[int, ...]:
        """Input segments fed by an activation (the graph's DualScale candidates), shifted or dual-scaled."""
        return tuple(sorted(set(self.dual_scale_segments) | set(self.shift_segments)))

    @property
    def applied(self) -> bool:
        """True once a recipe or a precision was applied to the layer."""
        return self.high_precision or self.precision is not None

    @property
    def quantized(self) -> bool:
        """True unless the layer stays in high precision."""
        return not self.high_precision

    def without_segments(self) -> "LinearPlan":
        """One input and one output segment. DualScale survives the merge only when every merged input
        segment was DualScale (one scale pair cannot serve a segment that is not activation-fed)."""
        if not self.seg_linear:
            return self
        all_dual = self.dual_scale and len(self.dual_scale_segments) == len(self.in_segments)
        all_shift = self.shift if len(self.shift_segments) == len(self.in_segments) else None
        return self.replace(in_segments=(), out_segments=(), dual_scale=all_dual, shift=all_shift)

    def check_module(self, module: Any) -> None:
        """Raise ``PlanError`` unless ``module`` is an ``nn.Linear`` of the planned shape."""
        from torch import nn

        name = self.name or "<layer>"
        if not isinstance(module, nn.Linear):
            raise PlanError(f"{name}: planned as a Linear but is a {type(module).__name__}")
        if (module.in_features, module.out_features) != (self.in_features, self.out_features):
            raise PlanError(f"{name}: the plan says {self.in_features}->{self.out_features}, the module is "
                            f"{module.in_features}->{module.out_features}; re-run segquant.analyze on this model")

    def replace(self, **changes: Any) -> "LinearPlan":
        """A copy with ``changes`` applied and checked (``dual_scale_segments`` is re-derived when
        ``dual_scale`` or ``in_segments`` change without it)."""
        if ("dual_scale" in changes or "in_segments" in changes) and "dual_scale_segments" not in changes:
            changes["dual_scale_segments"] = ()
        if ("shift" in changes or "in_segments" in changes) and "shift_segments" not in changes:
            changes["shift_segments"] = ()
        if changes.get("dual_scale") is False:
            changes.setdefault("activation", None)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "in_segments": list(self.in_segments),
            "out_segments": list(self.out_segments),
            "dual_scale": self.dual_scale,
            "dual_scale_segments": list(self.dual_scale_segments),
            "activation": self.activation,
            "patterns": list(self.patterns),
            "nodes": list(self.nodes),
            "high_precision": self.high_precision,
            "precision": self.precision,
            "shift": self.shift,
            "shift_segments": list(self.shift_segments),
            "smoothquant_alpha": self.smoothquant_alpha,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], name: str = "", source: str = "") -> "LinearPlan":
        """A plan entry from JSON-like data, validated by ``segquant.schema.LayerFile``."""
        if not isinstance(data, Mapping):
            raise PlanError(f"{name or '<layer>'}: a plan entry is a mapping of LinearPlan fields, got "
                            f"{type(data).__name__}")
        entry = parse(LayerFile, dict(data), source, name or "<layer>", PlanError)
        return cls(name=name, **fields_set(entry, data))


@dataclass(frozen=True)
class SegQuantPlan:
    """Per-Linear SegQuant decisions for one model, keyed by module name.

    Args:
        layers: module name -> ``LinearPlan``; every ``nn.Linear`` the analysis saw is present.
        model_class: class name of the analysed model.
        capture: how the graph was captured: ``"export"`` or ``"eager"``.
        recipe: the recipe applied to the plan (``Recipe.apply``), or ``""`` for an analysed plan.
    """

    layers: Mapping[str, LinearPlan]
    model_class: str = ""
    capture: str = "export"
    recipe: str = ""
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.version, int) or isinstance(self.version, bool) or self.version not in READABLE_VERSIONS:
            raise PlanError(f"plan version {self.version!r} is not supported; this SegQuant reads versions "
                            f"{', '.join(map(str, READABLE_VERSIONS))} (an integer). Re-run `segquant analyze` "
                            "to regenerate the plan")
        object.__setattr__(self, "version", PLAN_VERSION)
        if self.capture not in ("export", "eager"):
            raise PlanError(f"plan capture must be 'export' or 'eager', got {self.capture!r}")
        if not isinstance(self.layers, Mapping) or not all(isinstance(n, str) for n in self.layers):
            raise PlanError("plan layers map module names (strings) to LinearPlan entries")
        layers = {}
        for name, layer in self.layers.items():
            if not isinstance(layer, LinearPlan):
                raise PlanError(f"{name}: expected a LinearPlan, got {type(layer).__name__}")
            layers[name] = layer if layer.name == name else dataclasses.replace(layer, name=name)
        object.__setattr__(self, "layers", layers)

    def __getitem__(self, name: str) -> LinearPlan:
        try:
            return self.layers[name]
        except KeyError:
            raise PlanError(f"{name}: no such layer in the plan of {self.model_class or 'the model'} "
                            f"({len(self.layers)} layers)") from None

    def __contains__(self, name: object) -> bool:
        return name in self.layers

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    # ---- summaries ---------------------------------------------------------------------------
    def output_segmented(self) -> list[str]:
        """Quantized layers with more than one output segment."""
        return [n for n, p in self.layers.items() if len(p.out_segments) > 1 and p.quantized]

    def input_segmented(self) -> list[str]:
        """Quantized layers with more than one input segment."""
        return [n for n, p in self.layers.items() if len(p.in_segments) > 1 and p.quantized]

    def dual_scaled(self) -> list[str]:
        """Quantized layers with DualScale (a layer kept in high precision has none in effect)."""
        return [n for n, p in self.layers.items() if p.dual_scale and p.quantized]

    def shifted(self) -> list[str]:
        """Quantized layers with an activation shift."""
        return [n for n, p in self.layers.items() if p.shift is not None and p.quantized]

    def quantized_layers(self) -> list[str]:
        return [n for n, p in self.layers.items() if p.quantized]

    def high_precision_layers(self) -> list[str]:
        return [n for n, p in self.layers.items() if p.high_precision]

    @property
    def applied(self) -> bool:
        """True for a plan that a recipe (or ``with_precision``) has applied: it says every layer's fate."""
        return bool(self.recipe) or any(p.precision is not None for p in self.layers.values())

    def precision(self) -> str | None:
        """The one precision of the quantized layers (None on an analysed plan).

        Raises:
            PlanError: the quantized layers mix precisions, or some have one and others none.
        """
        found = {p.precision for p in self.layers.values() if p.quantized}
        if len(found) > 1:
            raise PlanError(f"the plan mixes precisions {sorted(map(str, found))}; the backends quantize one "
                            "precision per model")
        return next(iter(found), None)

    def summary(self) -> str:
        high = len(self.high_precision_layers())
        kept = f", {high} kept in high precision" if high else ""
        shifted = f", {len(self.shifted())} shifted" if self.shifted() else ""
        return (f"{len(self.output_segmented())} output-segmented, {len(self.input_segmented())} "
                f"input-segmented, {len(self.dual_scaled())} DualScale{shifted} of {len(self.layers)} Linear{kept}")

    def __str__(self) -> str:
        return format_table(self)

    def check_model(self, model: Any, complete: bool = False) -> None:
        """Raise ``PlanError`` unless every planned layer exists in ``model`` as an ``nn.Linear`` of the planned
        shape (and, with ``complete``, every ``nn.Linear`` of the model is planned). Backends call this before
        they change anything, so a plan of another model leaves the model as it was."""
        from torch import nn

        model_class = type(model).__name__
        if self.model_class and self.model_class != model_class:
            raise PlanError(f"the plan was made for {self.model_class}, the model is a {model_class}: "
                            "re-run segquant.analyze on this model")
        modules = dict(model.named_modules())
        for name, layer in self.layers.items():
            if name not in modules:
                raise PlanError(f"{name}: in the plan but not in {model_class}; the plan belongs to "
                                f"{self.model_class or 'another model'}: re-run segquant.analyze on this model")
            layer.check_module(modules[name])
        if complete:
            missing = [n for n, m in modules.items() if isinstance(m, nn.Linear) and n not in self.layers]
            if missing:
                raise PlanError(f"the plan has no entry for {missing[0]} ({len(missing)} Linear layers of "
                                f"{model_class}); it is not a plan of this model")

    # ---- edits ------------------------------------------------------------------------------
    def matching(self, pattern: str) -> list[str]:
        """Layer names matching an ``fnmatch`` glob (``*`` also crosses dots)."""
        return [n for n in self.layers if fnmatch.fnmatchcase(n, pattern)]

    def override(self, pattern: str, **changes: Any) -> "SegQuantPlan":
        """A new plan with ``changes`` (fields of ``LinearPlan``) applied to every layer matching
        ``pattern``. Raises ``PlanError`` if nothing matches or a field cannot be overridden.

        Example: ``plan.override("single_transformer_blocks.*.proj_out", dual_scale=False)``.
        """
        if not isinstance(pattern, str):
            raise PlanError(f"an override pattern is a glob string, got {pattern!r}")
        bad = set(changes) - set(OVERRIDABLE)
        if bad:
            raise PlanError(f"cannot override {sorted(bad)}; overridable fields: {list(OVERRIDABLE)}")
        names = self.matching(pattern)
        if not names:
            raise PlanError(f"override pattern {pattern!r} matches no layer of {self.model_class or 'the plan'}")
        layers = dict(self.layers)
        for name in names:
            patterns = layers[name].patterns + (() if "override" in layers[name].patterns else ("override",))
            try:
                layers[name] = layers[name].replace(**changes, patterns=patterns)
            except TypeError as e:
                raise PlanError(f"{name}: bad override {changes}: {e}") from None
        return dataclasses.replace(self, layers=layers)

    def with_overrides(self, overrides: Mapping[str, Mapping[str, Any]]) -> "SegQuantPlan":
        """Apply ``{glob: {field: value}}`` in order; later globs win."""
        if not isinstance(overrides, Mapping) or not all(isinstance(v, Mapping) for v in overrides.values()):
            raise PlanError(f"overrides map layer globs to {{field: value}}, got {overrides!r}")
        plan = self
        for pattern, changes in overrides.items():
            plan = plan.override(pattern, **changes)
        return plan

    def ablate(self, seg_linear: bool = True, dual_scale: bool = True, shift: bool = True) -> "SegQuantPlan":
        """The plan with SegLinear, DualScale and/or the shift switched off everywhere (the paper's ablation).
        Idempotent: ablating an ablated plan changes nothing."""
        layers = {}
        for name, p in self.layers.items():
            if not seg_linear:
                p = p.without_segments()
            if not dual_scale and p.dual_scale:
                p = p.replace(dual_scale=False)
            if not shift and p.shift is not None:
                p = p.replace(shift=None)
            layers[name] = p
        return dataclasses.replace(self, layers=layers)

    def with_shift(self, shift: str | None, keep_dual_scale: bool = True) -> "SegQuantPlan":
        """The plan with ``shift`` (``SHIFTS``, None = none) on every activation-fed input segment (the graph's
        DualScale candidates), keeping DualScale on them or not. Layers without such inputs are unchanged."""
        if shift is not None and shift not in SHIFTS:
            raise PlanError(f"unknown shift {shift!r}; one of {', '.join(SHIFTS)} or None")
        layers = {}
        for name, p in self.layers.items():
            segs = p.activation_segments
            if segs:
                p = p.replace(shift=shift, shift_segments=segs if shift else (),
                              dual_scale=keep_dual_scale and bool(p.dual_scale_segments),
                              dual_scale_segments=p.dual_scale_segments if keep_dual_scale else (),
                              activation=p.activation)
            layers[name] = p
        return dataclasses.replace(self, layers=layers)

    def keep_high_precision(self, patterns: Iterable[str]) -> "SegQuantPlan":
        if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
            raise PlanError(f"high-precision patterns are a list of layer-name globs, got {patterns!r}")
        return self._keep_high_precision(patterns)

    def _keep_high_precision(self, patterns: Iterable[str]) -> "SegQuantPlan":
        """The plan with every layer matching one of the globs kept in high precision (no precision).

        Raises:
            PlanError: a glob matches no layer.
        """
        layers = dict(self.layers)
        for pattern in patterns:
            names = self.matching(pattern)
            if not names:
                raise PlanError(f"high-precision pattern {pattern!r} matches no layer of "
                                f"{self.model_class or 'the plan'}")
            for name in names:
                layers[name] = layers[name].replace(high_precision=True, precision=None)
        return dataclasses.replace(self, layers=layers)

    def with_precision(self, precision: str, recipe: str = "") -> "SegQuantPlan":
        """The plan with every quantized layer set to ``precision`` (a ``segquant.precision`` name)."""
        if not isinstance(precision, str) or precision not in PRECISIONS:
            raise PlanError(f"unknown precision {precision!r}; one of {', '.join(PRECISIONS)}")
        layers = {n: p if p.high_precision else p.replace(precision=precision) for n, p in self.layers.items()}
        return dataclasses.replace(self, layers=layers, recipe=recipe or self.recipe)

    # ---- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "model_class": self.model_class, "capture": self.capture,
                "recipe": self.recipe, "layers": {n: p.to_dict() for n, p in self.layers.items()}}

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "plan") -> "SegQuantPlan":
        """A plan from JSON-like data, validated by ``segquant.schema.PlanFile`` (strict types, no unknown keys)."""
        if not isinstance(data, Mapping) or "layers" not in data:
            raise PlanError(f"{source}: not a SegQuant plan: expected a mapping with 'version' and 'layers'")
        if "version" not in data:
            raise PlanError(f"{source}: plan has no 'version' field; re-run `segquant analyze` to regenerate it")
        version = data["version"]
        if isinstance(version, str) and version.strip().isdigit() and int(version) in READABLE_VERSIONS:
            raise PlanError(f"{source}: plan version must be an integer: write {int(version)}, not {version!r}")
        if isinstance(version, bool) or not isinstance(version, int) or version not in READABLE_VERSIONS:
            try:
                cls(layers={}, version=version)
            except PlanError as e:
                raise PlanError(f"{source}: {e}") from None
        checked = parse(PlanFile, dict(data), source, "", PlanError)
        try:  # what only the dataclass checks (segments that sum to the width ...), with the file named too
            layers = {name: LinearPlan(name=name, **fields_set(entry, data["layers"][name]))
                      for name, entry in checked.layers.items()}
        except PlanError as e:
            raise PlanError(f"{source}: {e}") from None
        return cls(layers=layers, model_class=checked.model_class, capture=checked.capture, recipe=checked.recipe,
                   version=checked.version)

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> "SegQuantPlan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"{source} is not valid JSON: {e}") from None
        return cls.from_dict(data, source)

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON, atomically (an interrupted save leaves the previous file)."""
        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "SegQuantPlan":
        if not isinstance(path, (str, Path)):
            raise PlanError(f"a plan is loaded from a file path, got {type(path).__name__}")
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise PlanError(f"cannot read plan {path}: {e}") from None
        return cls.from_json(text, str(path))


def _fmt_sizes(sizes: tuple[int, ...]) -> str:
    if len(sizes) == 1:
        return "-"
    if len(set(sizes)) == 1:
        return f"{len(sizes)}x{sizes[0]}"
    return "|".join(map(str, sizes))


def format_table(plan: SegQuantPlan, only_changed: bool = True) -> str:
    """A readable table of the layers SegQuant changes (all layers with ``only_changed=False``)."""
    rows = [(n, p) for n, p in plan.layers.items() if not (only_changed and p.is_plain and not p.high_precision)]
    header = ("layer", "K x N", "precision", "in segments", "out segments", "DualScale", "shift", "patterns")
    body = []
    for name, p in rows:
        dual = "-"
        if p.dual_scale:
            segs = "" if len(p.in_segments) == 1 else " seg " + ",".join(map(str, p.dual_scale_segments))
            dual = f"{p.activation or 'yes'}{segs}"
        shift = "-"
        if p.shift is not None:
            shift = p.shift + ("" if len(p.in_segments) == 1 else " seg " + ",".join(map(str, p.shift_segments)))
        precision = "high" if p.high_precision else (p.precision or "-")
        body.append((name, f"{p.in_features}x{p.out_features}", precision, _fmt_sizes(p.in_segments),
                     _fmt_sizes(p.out_segments), dual, shift, ",".join(x for x in p.patterns)))
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    recipe = f", recipe {plan.recipe}" if plan.recipe else ""
    title = f"SegQuant plan for {plan.model_class or 'model'} ({plan.capture}{recipe}): {plan.summary()}"
    out = [title, line(header), line(tuple("-" * w for w in widths))] + [line(r) for r in body]
    if only_changed:
        out.append(f"({len(plan.layers) - len(rows)} plain Linear layers not shown)")
    return "\n".join(out)
