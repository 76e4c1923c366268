"""The file formats SegQuant reads (plans, recipes), as pydantic schemas: strict types, required keys, ranges,
unknown keys rejected by name.

Files are untrusted input: YAML turns ``'false'`` into a string and a cut-off file into nulls, JSON hand-edits
turn ``1`` into ``"1"``. ``parse`` validates raw data against a schema without coercion and turns pydantic's
report into one line that says where the problem is, what was found and what to write instead. The
dataclasses (``LinearPlan``, ``Recipe``) then check what only they can (segments that sum to the width, ...).

Example:
    >>> parse(LayerFile, {"in_features": 8, "out_features": 4, "dual_scale": "false"}, "plan.json", "x")
    Traceback (most recent call last):
    ...
    segquant.errors.SegQuantError: plan.json: x: dual_scale must be true or false (not quoted), got 'false'
"""

from __future__ import annotations

from types import UnionType
from typing import Annotated, Any, Literal, Mapping, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from .errors import SegQuantError
from .options import ACTIVATIONS, CHOICES, DEFAULT_REALISATION, REALISATIONS, SHIFTS
from .precision import PRECISIONS

MAX_CALIBRATION_PROMPTS = 100_000
MAX_STEPS = 1_000
MAX_IMAGE_SIZE = 16_384


def _tuple_as_list(value: Any) -> Any:
    """Python callers pass tuples where JSON and YAML have lists; both are sequences here, strings are not."""
    return list(value) if isinstance(value, tuple) else value


Sizes = Annotated[list[Annotated[int, Field(gt=0)]], BeforeValidator(_tuple_as_list)]
Indices = Annotated[list[Annotated[int, Field(ge=0)]], BeforeValidator(_tuple_as_list)]
Names = Annotated[list[str], BeforeValidator(_tuple_as_list)]


class _Schema(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class LayerFile(_Schema):
    """One layer of a plan (``LinearPlan``'s fields)."""

    in_features: Annotated[int, Field(gt=0)]
    out_features: Annotated[int, Field(gt=0)]
    in_segments: Sizes = []
    out_segments: Sizes = []
    dual_scale: bool = False
    dual_scale_segments: Indices = []
    activation: Literal[ACTIVATIONS] | None = None
    patterns: Names = []
    nodes: Names = []
    high_precision: bool = False
    precision: Literal[tuple(PRECISIONS)] | None = None
    shift: Literal[SHIFTS] | None = None
    shift_segments: Indices = []
    smoothquant_alpha: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None


class PlanFile(_Schema):
    """A plan file (``SegQuantPlan.to_dict``)."""

    version: Literal[1, 2, 3]
    model_class: str = ""
    capture: Literal["export", "eager"] = "export"
    recipe: str = ""
    layers: dict[str, LayerFile]


class OverrideFile(_Schema):
    """The ``LinearPlan`` fields a recipe's ``overrides`` (and ``plan.override``) may change."""

    in_segments: Sizes | None = None
    out_segments: Sizes | None = None
    dual_scale: bool | None = None
    dual_scale_segments: Indices | None = None
    activation: Literal[ACTIVATIONS] | None = None
    high_precision: bool | None = None
    precision: Literal[tuple(PRECISIONS)] | None = None
    shift: Literal[SHIFTS] | None = None
    shift_segments: Indices | None = None
    smoothquant_alpha: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None


class CalibrationFile(_Schema):
    """A recipe's ``calibration`` settings."""

    num_prompts: Annotated[int, Field(ge=1, le=MAX_CALIBRATION_PROMPTS)] = 32
    steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] = 28
    guidance: Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)] = 3.5
    height: Annotated[int, Field(ge=16, le=MAX_IMAGE_SIZE, multiple_of=8)] = 1024
    width: Annotated[int, Field(ge=16, le=MAX_IMAGE_SIZE, multiple_of=8)] = 1024


class RecipeFile(_Schema):
    """A complete recipe (``Recipe``'s fields)."""

    name: Annotated[str, Field(min_length=1)]
    model_class: Annotated[str, Field(min_length=1)]
    config: Annotated[str, Field(min_length=1)]
    precision: Literal[tuple(PRECISIONS)]
    skip: Annotated[Names, Field(description="layer-name globs")] = []
    overrides: Annotated[dict[str, OverrideFile], Field(description="layer-name globs to LinearPlan fields")] = {}
    smoothquant_alpha: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None
    realisation: Literal[REALISATIONS] = DEFAULT_REALISATION
    seg_linear: bool = True
    dual_scale: bool = True
    shift: Literal[SHIFTS] | None = None
    choose: Literal[CHOICES] = "fixed"
    alpha_search: bool = False
    calibration: CalibrationFile = CalibrationFile()


S = TypeVar("S", bound=_Schema)

_TYPE_NAMES = {"bool_type": "true or false (not quoted)", "int_type": "an integer", "float_type": "a number",
               "string_type": "a string", "list_type": "a list", "dict_type": "a mapping",
               "model_type": "a mapping", "int_from_float": "an integer", "finite_number": "a finite number"}


def parse(schema: type[S], data: Any, source: str, where: str = "", error: type[SegQuantError] = SegQuantError) -> S:
    """``data`` validated against ``schema``, or ``error`` with one line naming ``source``, the key and the fix."""
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise error(_message(schema, e, source, where)) from None


def _message(schema: type[_Schema], exc: ValidationError, source: str, where: str) -> str:
    errors = exc.errors(include_url=False)
    first = errors[0]
    owner, prefix, path = _locate(schema, first["loc"], where)
    head = ": ".join(p for p in (source, prefix) if p)
    key = ".".join(path) or "the entry"
    kind, value = first["type"], first.get("input")
    if kind == "extra_forbidden":
        unknown = sorted(str(e["loc"][-1]) for e in errors if e["type"] == "extra_forbidden"
                         and e["loc"][:-1] == first["loc"][:-1])
        parent = ".".join(path[:-1])
        known = list(owner.model_fields) if owner else []
        return f"{head}: unknown {parent + ' ' if parent else ''}keys {unknown}; known: {known}"
    if kind == "missing":
        return f"{head}: required key {key!r} is missing"
    field = owner.model_fields.get(path[-1]) if owner and path else None
    if kind in _TYPE_NAMES:
        what = _TYPE_NAMES[kind]
        if field is not None and field.description and kind in ("list_type", "dict_type"):
            what += f" of {field.description}"
        return f"{head}: {key} must be {what}, got {value!r}"
    if kind == "literal_error":
        return f"{head}: {key} must be one of {first['ctx']['expected']}; got {value!r}"
    if kind in _RANGE_ERRORS and field is not None:
        bounds = _bounds(field)
        if bounds:
            return f"{head}: {key} must be {bounds}, got {value!r}"
    message = first["msg"].replace("Input should be", "must be").replace("Value error, ", "")
    return f"{head}: {key} {message[0].lower() + message[1:]}, got {value!r}"


_RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "multiple_of")


def _bounds(field: Any) -> str:
    """A field's range as a reader writes it: ``in [0, 1]``, ``at least 1``, ``a multiple of 8 in [16, 16384]``."""
    low = high = step = None
    for item in _constraints(field):
        for name in ("ge", "gt"):
            if getattr(item, name, None) is not None:
                low = ("[" if name == "ge" else "(", getattr(item, name))
        for name in ("le", "lt"):
            if getattr(item, name, None) is not None:
                high = ("]" if name == "le" else ")", getattr(item, name))
        if getattr(item, "multiple_of", None) is not None:
            step = item.multiple_of
    if low is None and high is None:
        return ""
    if high is None:
        text = f"{'at least' if low[0] == '[' else 'greater than'} {low[1]}"
    elif low is None:
        text = f"{'at most' if high[0] == ']' else 'less than'} {high[1]}"
    else:
        text = f"in {low[0]}{low[1]}, {high[1]}{high[0]}"
    return f"a multiple of {step} {text}" if step else text


def _constraints(field: Any) -> list[Any]:
    """The constraint objects of a field, including those inside ``Annotated[X, Field(...)] | None``."""
    found, stack = list(field.metadata), [field.annotation]
    while stack:
        annotation = stack.pop()
        if get_origin(annotation) is Annotated:
            for item in get_args(annotation)[1:]:
                found.extend(getattr(item, "metadata", [item]))
            stack.append(get_args(annotation)[0])
        elif get_origin(annotation) in (Union, UnionType):
            stack.extend(get_args(annotation))
    return found


def _locate(schema: type[_Schema], loc: tuple, where: str) -> tuple[type[_Schema] | None, str, list[str]]:
    """The schema that owns the failing key, a prefix naming the mapping entry it sits in (a layer name, an
    override glob) and the key path below that entry."""
    owner: Any = schema
    prefix, path = where, []
    index = 0
    while index < len(loc):
        part = loc[index]
        field = owner.model_fields.get(part) if _is_schema(owner) else None
        path.append(str(part))
        index += 1
        if field is None:
            break
        annotation = _unwrap(field.annotation)
        if get_origin(annotation) is dict and index < len(loc):  # a named entry: the name becomes the prefix
            prefix = f"{prefix + ' ' if prefix else ''}{part} {loc[index]!r}" if part != "layers" else str(loc[index])
            path, index = [], index + 1
            annotation = _unwrap(get_args(annotation)[1])
        if _is_schema(annotation) and index < len(loc):
            owner = annotation
    return (owner if _is_schema(owner) else None), prefix, path


def _unwrap(annotation: Any) -> Any:
    """``X`` from ``Annotated[X, ...]`` and ``X | None``."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
            continue
        if origin in (Union, UnionType):
            args = [a for a in get_args(annotation) if a is not type(None)]
            if len(args) == 1:
                annotation = args[0]
                continue
        return annotation


def _is_schema(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, _Schema)


def fields_set(model: _Schema, data: Mapping[str, Any]) -> dict[str, Any]:
    """The validated values of the keys ``data`` gave (lists as tuples, for the frozen dataclasses)."""
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in model.model_dump().items() if k in data}
