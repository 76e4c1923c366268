"""Recipes: per model x precision settings, as data, composed from a per-model base and per-precision deltas.

``recipes/<model>.yaml`` holds what every precision of a model shares (which layers stay in high precision,
the calibration settings); ``recipes/precisions.yaml`` what each precision adds (SmoothQuant alpha,
DualScale on or off); a base may override a precision's settings under ``precisions: {<precision>: {...}}``.
``load_recipe("flux.1-dev/fp8")`` resolves the three into one ``Recipe``. A user's recipe file is either
complete or names a bundled recipe under ``base:`` and changes some keys.

``Recipe.apply(plan)`` gives the applied plan, the one contract every backend quantizes by: per layer,
whether it stays in high precision and its precision, with the recipe's overrides and technique switches.
``validate`` checks a recipe against a plan of the full-size model (built on ``meta``): every glob must match.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from .backend import QuantizeOptions
from .errors import PlanError, SegQuantError
from .options import CHOICES, DEFAULT_REALISATION, REALISATIONS, SHIFTS, check_alpha, check_choice
from .plan import OVERRIDABLE, SegQuantPlan
from .precision import PRECISIONS as _REGISTRY
from .schema import CalibrationFile, RecipeFile, fields_set, parse

SCHEMA_LINE = "# schema: segquant.recipe.Recipe"
BASE_SCHEMA_LINE = "# schema: segquant.recipe.RecipeBase"
DELTAS_FILE = "precisions.yaml"
PRECISIONS = tuple(_REGISTRY)
"""The precision names recipes take (``segquant.precision.PRECISIONS`` describes each)."""


@dataclass(frozen=True)
class CalibrationSettings:
    """How calibration data is produced from the pipeline.

    Args:
        num_prompts: prompts from the prompt file used for calibration.
        steps: sampling steps per prompt (every step's denoiser input is a calibration batch).
        guidance: classifier-free guidance scale.
        height, width: image size in pixels.
    """

    num_prompts: int = 32
    steps: int = 28
    guidance: float = 3.5
    height: int = 1024
    width: int = 1024

    def __post_init__(self) -> None:
        parse(CalibrationFile, dataclasses.asdict(self), "calibration settings")


_BOOL_KEYS = ("seg_linear", "dual_scale", "alpha_search")
_STR_KEYS = ("name", "model_class", "config", "precision", "realisation", "choose")


@dataclass(frozen=True)
class Recipe:
    """One model family x precision.

    Args:
        name: ``<model>/<precision>``, e.g. ``flux.1-dev/int8_w8a8``.
        model_class: the diffusers denoiser class.
        config: the bundled full-size config the recipe is validated against (``segquant/configs``).
        precision: a ``segquant.precision`` name.
        skip: globs of layers kept in high precision.
        overrides: ``{glob: {LinearPlan field: value}}`` applied to the analysed plan.
        smoothquant_alpha: SmoothQuant alpha in [0, 1], or None for no smoothing.
        realisation: input segments as ``split_k`` or ``folded``.
        seg_linear, dual_scale: SegQuant's two techniques on or off.
        shift: activation shift (``per_tensor`` / ``per_channel``) on the activation-fed inputs, or None.
        choose: ``fixed`` (every activation-fed layer gets what the recipe says) or ``auto`` (``segquant.choose``
            keeps, per layer, the best of plain / shift / DualScale / both that the recipe enables, from measured
            output error and GEMM cost; it needs calibration data, so jobs run it before quantizing).
        alpha_search: per layer, the SmoothQuant alpha of the grid 0..1 step 0.1 with the smallest output error on
            calibration data (``segquant.choose.search_alpha``), instead of ``smoothquant_alpha`` everywhere.
        calibration: ``CalibrationSettings``.
    """

    name: str
    model_class: str
    config: str
    precision: str
    skip: tuple[str, ...] = ()
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    smoothquant_alpha: float | None = None
    realisation: str = DEFAULT_REALISATION
    seg_linear: bool = True
    dual_scale: bool = True
    shift: str | None = None
    choose: str = "fixed"
    alpha_search: bool = False
    calibration: CalibrationSettings = CalibrationSettings()

    def __post_init__(self) -> None:
        where = f"recipe {self.name}"
        for key in _STR_KEYS:
            if not isinstance(getattr(self, key), str):
                raise SegQuantError(f"{where}: {key} must be a string, got {getattr(self, key)!r}")
        for key in _BOOL_KEYS:
            if not isinstance(getattr(self, key), bool):
                raise SegQuantError(f"{where}: {key} must be true or false, got {getattr(self, key)!r}")
        check_choice(self.precision, PRECISIONS, f"{where}: precision")
        check_choice(self.realisation, REALISATIONS, f"{where}: realisation")
        check_choice(self.choose, CHOICES, f"{where}: choose")
        if self.shift is not None:
            check_choice(self.shift, SHIFTS, f"{where}: shift")
        alpha = check_alpha(self.smoothquant_alpha, f"{where}: smoothquant_alpha")
        object.__setattr__(self, "smoothquant_alpha", alpha)
        if not isinstance(self.skip, (list, tuple)) or not all(isinstance(g, str) for g in self.skip):
            raise SegQuantError(f"{where}: skip must be a list of layer-name globs, got {self.skip!r}")
        if not isinstance(self.overrides, Mapping) or not all(isinstance(k, str) and isinstance(v, Mapping)
                                                              for k, v in self.overrides.items()):
            raise SegQuantError(f"{where}: overrides must map globs to {{field: value}}, got {self.overrides!r}")
        bad = sorted({f for v in self.overrides.values() for f in v} - set(OVERRIDABLE))
        if bad:
            raise SegQuantError(f"{where}: overrides name {bad}, which cannot be overridden; fields: {OVERRIDABLE}")
        if not isinstance(self.calibration, CalibrationSettings):
            raise SegQuantError(f"{where}: calibration must be CalibrationSettings")
        object.__setattr__(self, "skip", tuple(self.skip or ()))

    def validate(self, plan: SegQuantPlan) -> None:
        """Raise ``PlanError`` if the plan is of another model class or a glob matches no layer."""
        if plan.model_class and plan.model_class != self.model_class:
            raise PlanError(f"recipe {self.name} is for {self.model_class}, the model is a {plan.model_class}")
        for pattern in (*self.skip, *self.overrides):
            if not plan.matching(pattern):
                raise PlanError(f"recipe {self.name}: {pattern!r} matches no layer of {self.model_class}")

    def apply(self, plan: SegQuantPlan) -> SegQuantPlan:
        """The applied plan: overrides, then the technique switches, then the skipped layers kept in high
        precision and every other layer given the recipe's precision.

        Raises:
            PlanError: ``plan`` is of another model, a glob matches nothing, or the plan was applied already
                (apply a recipe to the analysed plan: a second recipe would inherit the first one's choices).
        """
        if plan.applied:
            raise PlanError(f"recipe {self.name}: the plan was already applied"
                            f"{f' (recipe {plan.recipe})' if plan.recipe else ''}; apply recipes to the analysed "
                            "plan (segquant.analyze) only")
        self.validate(plan)
        applied = plan.with_overrides(self.overrides)
        if self.shift is not None:
            applied = applied.with_shift(self.shift)
        applied = applied.ablate(seg_linear=self.seg_linear, dual_scale=self.dual_scale)
        return applied.keep_high_precision(self.skip).with_precision(self.precision, recipe=self.name)

    def quantize_options(self, show_progress: bool = True, keep_degenerate: bool = False) -> QuantizeOptions:
        """The numeric options a backend takes beside the applied plan."""
        return QuantizeOptions(smoothquant_alpha=self.smoothquant_alpha, realisation=self.realisation,
                               show_progress=show_progress, keep_degenerate=keep_degenerate)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["skip"] = list(self.skip)
        data["overrides"] = {k: dict(v) for k, v in self.overrides.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> "Recipe":
        """A recipe from YAML-like data, validated by ``segquant.schema.RecipeFile`` (strict types, ranges,
        required keys, no unknown keys)."""
        if not isinstance(data, Mapping):
            raise SegQuantError(f"{source}: a recipe is a mapping of settings, got {type(data).__name__}")
        checked = parse(RecipeFile, dict(data), source)
        values = fields_set(checked, data)
        values["calibration"] = CalibrationSettings(**checked.calibration.model_dump())
        values["overrides"] = {glob: fields_set(entry, data["overrides"][glob])
                               for glob, entry in checked.overrides.items()}
        try:
            return cls(**values)
        except SegQuantError as e:
            raise SegQuantError(f"{source}: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        """A recipe file: complete, or ``base: <bundled recipe name>`` plus the keys it changes."""
        path = Path(path)
        data = _read_yaml(path, SCHEMA_LINE)
        if "base" in data:
            base = data.pop("base")
            if not isinstance(base, str) or base not in bundled_recipes():
                raise SegQuantError(f"{path}: base must name a bundled recipe ({', '.join(bundled_recipes())}), "
                                    f"got {base!r}")
            precision = data.get("precision")
            if isinstance(precision, str) and precision in PRECISIONS:  # that precision's deltas, not the base's
                base = f"{base.partition('/')[0]}/{precision}"
            merged = bundled_recipe(base).to_dict()
            merged["name"] = f"{base}+{path.stem}"
            if isinstance(data.get("calibration"), Mapping):  # calibration settings change key by key
                data["calibration"] = {**merged["calibration"], **data["calibration"]}
            data = {**merged, **data}
        return cls.from_dict(data, str(path))


def _read_yaml(path: Path, schema_line: str) -> dict[str, Any]:
    import yaml

    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SegQuantError(f"cannot read recipe {path}: {e}") from None
    if not text.startswith(schema_line):
        raise SegQuantError(f"{path}: a recipe starts with the line '{schema_line}'")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SegQuantError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SegQuantError(f"{path}: a recipe is a YAML mapping")
    return data


def _recipes_root() -> Path:
    return Path(str(resources.files("segquant_recipes")))


def _model_bases() -> dict[str, Path]:
    return {p.stem: p for p in sorted(_recipes_root().glob("*.yaml")) if p.name != DELTAS_FILE}


def bundled_recipes() -> tuple[str, ...]:
    """``<model>/<precision>`` for every model base and precision shipped with SegQuant."""
    return tuple(f"{model}/{precision}" for model in _model_bases() for precision in PRECISIONS)


def bundled_recipe(name: str) -> Recipe:
    """A bundled recipe: the model's base, the precision's deltas, then the base's own deltas for it."""
    model, _, precision = name.partition("/")
    bases = _model_bases()
    if model not in bases or precision not in PRECISIONS:
        raise SegQuantError(f"unknown recipe {name!r}; bundled: {', '.join(bundled_recipes())}")
    base = _read_yaml(bases[model], BASE_SCHEMA_LINE)
    own = base.pop("precisions", None) or {}
    deltas = _read_yaml(_recipes_root() / DELTAS_FILE, "# schema: segquant.recipe.PrecisionDeltas")
    for where, table in ((bases[model], own), (DELTAS_FILE, deltas)):
        if not isinstance(table, Mapping) or set(table) - set(PRECISIONS) or \
                not all(isinstance(v, Mapping) for v in table.values()):
            raise SegQuantError(f"{where}: precision deltas map precisions ({', '.join(PRECISIONS)}) to settings")
    if precision not in deltas:
        raise SegQuantError(f"{DELTAS_FILE} has no settings for precision {precision}")
    data = {**base, **deltas[precision], **own.get(precision, {}), "name": name, "precision": precision}
    return Recipe.from_dict(data, str(bases[model]))


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A bundled recipe by name (``flux.1-dev/int8_w8a8``) or a recipe file by path."""
    if not isinstance(name_or_path, (str, Path)):
        raise SegQuantError(f"a recipe is a bundled recipe name or a file path, got {name_or_path!r}")
    if str(name_or_path) in bundled_recipes():
        return bundled_recipe(str(name_or_path))
    path = Path(name_or_path)
    if path.is_file():
        return Recipe.load(path)
    raise SegQuantError(f"unknown recipe {name_or_path!r}: not a file and not one of {', '.join(bundled_recipes())}")
