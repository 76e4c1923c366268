"""Recipes: per model family x precision settings, as data (``recipes/<family>/<precision>.yaml``).

A recipe says which layers stay in high precision (``skip`` globs), how the plan is overridden, the
quantization settings and the calibration settings. ``validate`` checks it against a plan of the full-size
model (built on ``meta``): every glob must match at least one layer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from .errors import PlanError, SegQuantError
from .plan import SegQuantPlan

SCHEMA_LINE = "# schema: segquant.recipe.Recipe"
PRECISIONS = ("int8_w8a8", "int8_perchannel", "fp8", "w4a8")
"""int8_w8a8: INT8 per-tensor weights and static activations (the paper's W8A8); int8_perchannel: per-channel
INT8 weights; fp8: e4m3 per-tensor; w4a8: INT4 per-channel weights, INT8 per-token dynamic activations."""


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
        if self.num_prompts < 1 or self.steps < 1 or self.height < 16 or self.width < 16:
            raise SegQuantError(f"calibration settings out of range: {self}")


@dataclass(frozen=True)
class Recipe:
    """One model family x precision.

    Args:
        name: ``<model>/<precision>``, e.g. ``flux.1-dev/int8_w8a8``.
        model_class: the diffusers denoiser class.
        config: the bundled full-size config the recipe is validated against (``segquant/configs``).
        precision: one of ``PRECISIONS``.
        skip: globs of layers kept in high precision.
        overrides: ``{glob: {LinearPlan field: value}}`` applied to the analysed plan.
        smoothquant_alpha: SmoothQuant alpha, or None for no smoothing.
        realisation: input segments as ``split_k`` or ``folded``.
        seg_linear, dual_scale: SegQuant's two techniques on or off.
        calibration: ``CalibrationSettings``.
    """

    name: str
    model_class: str
    config: str
    precision: str
    skip: tuple[str, ...] = ()
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    smoothquant_alpha: float | None = None
    realisation: str = "split_k"
    seg_linear: bool = True
    dual_scale: bool = True
    calibration: CalibrationSettings = CalibrationSettings()

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise SegQuantError(f"recipe {self.name}: precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.realisation not in ("split_k", "folded"):
            raise SegQuantError(f"recipe {self.name}: realisation must be split_k or folded")
        if self.smoothquant_alpha is not None and not 0 <= self.smoothquant_alpha <= 1:
            raise SegQuantError(f"recipe {self.name}: smoothquant_alpha must be in [0, 1]")
        object.__setattr__(self, "skip", tuple(self.skip))

    def validate(self, plan: SegQuantPlan) -> None:
        """Raise ``PlanError`` if the plan is of another model class or a glob matches no layer."""
        if plan.model_class and plan.model_class != self.model_class:
            raise PlanError(f"recipe {self.name} is for {self.model_class}, the model is a {plan.model_class}")
        for pattern in (*self.skip, *self.overrides):
            if not plan.matching(pattern):
                raise PlanError(f"recipe {self.name}: {pattern!r} matches no layer of {self.model_class}")

    def apply(self, plan: SegQuantPlan) -> SegQuantPlan:
        """The plan with the recipe's overrides and technique switches applied (after ``validate``)."""
        self.validate(plan)
        return plan.with_overrides(self.overrides).ablate(seg_linear=self.seg_linear, dual_scale=self.dual_scale)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> "Recipe":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise SegQuantError(f"{source}: unknown recipe keys {sorted(unknown)}; known: {sorted(known)}")
        missing = [k for k in ("name", "model_class", "config", "precision") if k not in data]
        if missing:
            raise SegQuantError(f"{source}: recipe lacks {missing}")
        values = dict(data)
        calibration = values.pop("calibration", None) or {}
        try:
            values["calibration"] = CalibrationSettings(**calibration)
        except TypeError as e:
            raise SegQuantError(f"{source}: bad calibration settings: {e}") from None
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        import yaml

        path = Path(path)
        text = path.read_text()
        if not text.startswith(SCHEMA_LINE):
            raise SegQuantError(f"{path}: a recipe starts with the line '{SCHEMA_LINE}'")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise SegQuantError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise SegQuantError(f"{path}: a recipe is a YAML mapping")
        return cls.from_dict(data, str(path))


def bundled_recipes() -> dict[str, Path]:
    """``<model>/<precision>`` -> recipe file, for every recipe shipped with SegQuant."""
    root = resources.files("segquant_recipes")
    out = {}
    for model_dir in root.iterdir():
        if model_dir.is_dir() and not model_dir.name.startswith(("_", ".")):
            for item in model_dir.iterdir():
                if item.name.endswith(".yaml"):
                    out[f"{model_dir.name}/{item.name.removesuffix('.yaml')}"] = Path(str(item))
    return dict(sorted(out.items()))


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A bundled recipe by name (``flux.1-dev/int8_w8a8``) or a recipe file by path."""
    recipes = bundled_recipes()
    if str(name_or_path) in recipes:
        return Recipe.load(recipes[str(name_or_path)])
    path = Path(name_or_path)
    if path.is_file():
        return Recipe.load(path)
    raise SegQuantError(f"unknown recipe {name_or_path!r}: not a file and not one of {', '.join(recipes)}")
