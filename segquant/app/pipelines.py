"""Diffusers pipelines for ``segquant quantize``: loading (local files only when offline), the denoiser,
the recipe family of a model, calibration prompts and the calibration loop.

diffusers is imported inside the functions, so ``segquant`` itself needs only torch.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from segquant.distributed import shard
from segquant.errors import SegQuantError
from segquant.model_configs import bundled_configs
from segquant.recipe import CalibrationSettings, bundled_recipes, load_recipe

from .console import is_terminal, progress

logger = logging.getLogger(__name__)

HUB_FAMILIES = {
    "black-forest-labs/flux.1-dev": "flux.1-dev",
    "black-forest-labs/flux.1-schnell": "flux.1-schnell",
    "stabilityai/stable-diffusion-3.5-large": "sd3.5-large",
    "stabilityai/stable-diffusion-3.5-medium": "sd3.5-medium",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl-base",
    "pixart-alpha/pixart-sigma-xl-2-1024-ms": "pixart-sigma",
    "efficient-large-model/sana_1600m_1024px_diffusers": "sana-1600m",
}
"""Hub ids (lower case) of the models the bundled recipes are written for -> recipe family."""

DENOISERS = ("transformer", "unet")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_PROMPTS = "coco_style_64.txt"


def _offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def dtype_of(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise SegQuantError(f"unknown dtype {name!r}; one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _not_available(model: str, offline: bool, error: Exception) -> SegQuantError:
    if Path(model).is_dir():
        where = (f"the folder {model} is not a complete diffusers pipeline (model_index.json and every "
                 "component's config and weights)")
    else:
        where = (f"{model!r} is not a local folder and its weights are not in the local Hugging Face cache"
                 + (" (offline: HF_HUB_OFFLINE is set, local files only)" if offline else ""))
    return SegQuantError(f"cannot load {model}: {where}. Download it first (`hf download "
                         f"{model}`) or pass --model /path/to/pipeline [{type(error).__name__}: {error}]")


MAX_REPEATS = 512      # blocks / layers of one kind; FLUX.1-dev has 57, SDXL's UNet fewer
MAX_WIDTH = 65_536     # hidden sizes and head dims multiplied out


def check_config_size(config: dict[str, Any], source: str, allow_large: bool = False) -> None:
    """Refuse, within a second, configs whose block counts or widths would build modules for minutes even on
    ``meta`` (``--allow-large`` for the brave)."""
    if allow_large:
        return
    counts = {k: v for k, v in config.items() if isinstance(v, int) and not isinstance(v, bool)
              and ("layers" in k or "blocks" in k)}
    widths = {k: v for k, v in config.items() if isinstance(v, int) and not isinstance(v, bool)
              and ("dim" in k or "channels" in k or k.endswith("_size"))}
    heads = config.get("num_attention_heads"), config.get("attention_head_dim")
    if all(isinstance(h, int) and not isinstance(h, bool) for h in heads):
        widths["num_attention_heads x attention_head_dim"] = heads[0] * heads[1]
    too_many = {k: v for k, v in counts.items() if v > MAX_REPEATS}
    too_wide = {k: v for k, v in widths.items() if v > MAX_WIDTH}
    if too_many or too_wide:
        found = ", ".join(f"{k}={v}" for k, v in {**too_many, **too_wide}.items())
        raise SegQuantError(f"{source}: {found} is far beyond any released denoiser (at most {MAX_REPEATS} blocks, "
                            f"width {MAX_WIDTH}); building it would take minutes: check the config, or pass "
                            "--allow-large")


def check_device(name: str) -> None:
    """``--device`` names a device this machine has (checked before any work; torch would fail late and
    with a message about its build)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise SegQuantError(f"--device {name!r} is not a torch device ({e}); e.g. cpu, cuda, cuda:1") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise SegQuantError(f"--device {name}: no CUDA device is available here; use --device cpu")
        if device.index is not None and device.index >= count:
            raise SegQuantError(f"--device {name}: this machine has {count} CUDA device(s) (cuda:0 to "
                                f"cuda:{count - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise SegQuantError(f"--device {name}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise SegQuantError(f"--device {name}: SegQuant runs on cpu, cuda or mps, not {device.type}")


def read_json_object(path: Path, what: str = "") -> dict[str, Any]:
    """The JSON object in ``path``; ``SegQuantError`` naming the file if it is not valid JSON or not an object
    (``what`` says what the object should be)."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SegQuantError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise SegQuantError(f"{path} must hold a JSON object{f' ({what})' if what else ''}")
    return config


def check_model_folder(model: str, allow_large: bool = False) -> None:
    """Before any loading: a local pipeline folder must have a readable ``model_index.json`` and a denoiser
    config of a sane size (``check_config_size``); a hub id is left to the loader."""
    folder = Path(model)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise SegQuantError(f"--model {model} is a file; pass a diffusers pipeline folder or a hub id")
    index = folder / "model_index.json"
    if not index.is_file():
        raise SegQuantError(f"{folder} is not a diffusers pipeline folder: it has no model_index.json")
    for path in (index, *(folder / name / "config.json" for name in DENOISERS)):
        if not path.is_file():
            continue
        config = read_json_object(path)
        if path is not index:
            check_config_size(config, str(path), allow_large)


def load_pipeline(model: str, dtype: str = "bfloat16", device: str = "cpu", *, show_progress: bool = True,
                  **components: Any):
    """``DiffusionPipeline.from_pretrained`` with local files only when offline (``HF_HUB_OFFLINE``), without
    diffusers' and transformers' nested loading bars (``_loading_bars``).

    Args:
        model: a hub id or a local diffusers pipeline folder.
        show_progress: Hugging Face Hub download bars, when stderr is a terminal.
        components: components passed to ``from_pretrained`` instead of being loaded (e.g. a quantized
            ``transformer``).
    Raises:
        SegQuantError: the weights are not available locally, or the folder is not a pipeline.
    """
    try:
        from diffusers import DiffusionPipeline
    except ImportError:
        raise SegQuantError("segquant quantize needs diffusers: pip install 'segquant[diffusers]'") from None
    offline = _offline()
    try:
        with _loading_bars(show_progress):
            pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype_of(dtype), local_files_only=offline,
                                                     **components)
    except (OSError, ValueError) as e:  # HF hub errors are OSErrors; invalid ids are ValueErrors
        raise _not_available(model, offline, e) from None
    return pipe.to(device)


@contextlib.contextmanager
def _loading_bars(show_progress: bool) -> Iterator[None]:
    """diffusers' bar over pipeline components and transformers' bar over each checkpoint's weights (one inside
    the other) off while loading; the Hub's download bars only with ``show_progress`` on a terminal. The
    libraries' switches are put back afterwards."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub import utils as hub_utils

    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:
        transformers_logging = None
    diffusers_on = diffusers_logging.is_progress_bar_enabled()
    transformers_on = transformers_logging is not None and transformers_logging.is_progress_bar_enabled()
    hub_off = hub_utils.are_progress_bars_disabled()
    diffusers_logging.disable_progress_bar()
    if transformers_logging is not None:
        transformers_logging.disable_progress_bar()  # also switches the Hub's off
    if show_progress and is_terminal(sys.stderr) and not hub_off:
        hub_utils.enable_progress_bars()
    else:
        hub_utils.disable_progress_bars()
    try:
        yield
    finally:
        if diffusers_on:
            diffusers_logging.enable_progress_bar()
        if transformers_on:
            transformers_logging.enable_progress_bar()
        (hub_utils.disable_progress_bars if hub_off else hub_utils.enable_progress_bars)()


def load_component(model: str, subfolder: str, class_name: str, dtype: str = "bfloat16") -> nn.Module:
    """One diffusers model of a pipeline (``transformer``, ``unet``), loaded as ``load_pipeline`` does."""
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise SegQuantError(f"{class_name} is not a diffusers model class")
    offline = _offline()
    try:
        with _loading_bars(show_progress=True):
            return cls.from_pretrained(model, subfolder=subfolder, dtype=dtype_of(dtype), local_files_only=offline)
    except (OSError, ValueError) as e:
        raise _not_available(model, offline, e) from None


def denoiser_name(pipe: Any) -> str:
    """``"transformer"`` or ``"unet"``: the component SegQuant quantizes."""
    for name in DENOISERS:
        if isinstance(getattr(pipe, name, None), nn.Module):
            return name
    raise SegQuantError(f"{type(pipe).__name__} has no transformer or unet component to quantize")


def family_of(model: str, denoiser: nn.Module) -> str:
    """The recipe family of a model: from its hub id (or a folder named like one), else the bundled
    full-size config of the denoiser's class that shares the most config values with it."""
    key = model.strip("/").lower()
    for hub_id, family in HUB_FAMILIES.items():
        if key == hub_id or key.rsplit("/", 1)[-1] == hub_id.rsplit("/", 1)[-1]:
            return family
    class_name = type(denoiser).__name__
    config = dict(denoiser.config)
    best, best_score = None, -1
    for family in sorted({name.split("/")[0] for name in bundled_recipes()}):
        if family.startswith("mnist-"):  # the embedded models' recipes are for segquant run, not pipelines
            continue
        full = json.loads(bundled_configs()[load_recipe(f"{family}/fp8").config].read_text())
        if full.get("_class_name") != class_name:
            continue
        score = sum(1 for k, v in full.items() if not k.startswith("_") and _same(config.get(k), v))
        if score > best_score:
            best, best_score = family, score
    if best is None:
        raise SegQuantError(f"no bundled recipe for a {class_name} ({model}); pass --recipe with a recipe file")
    return best


def _same(a: Any, b: Any) -> bool:
    return (list(a) if isinstance(a, (list, tuple)) else a) == (list(b) if isinstance(b, (list, tuple)) else b)


def read_prompts(path: str | Path | None = None) -> list[str]:
    """Non-blank lines of a prompt file; the bundled 64 COCO-style captions when ``path`` is None."""
    if path is None:
        return read_prompts(Path(str(resources.files("segquant.app") / "prompts" / DEFAULT_PROMPTS)))
    path = Path(path)
    if not path.is_file():
        raise SegQuantError(f"prompt file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SegQuantError(f"prompt file {path} is not UTF-8 text ({e.reason} at byte {e.start}); write one "
                            "prompt per line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise SegQuantError(f"prompt file {path} holds no prompts; write one prompt per line")
    return prompts


def call_kwargs(pipe: Any, settings: CalibrationSettings) -> dict[str, Any]:
    """Keyword arguments of a pipeline call with the recipe's steps, guidance and size. Resolution
    binning is off: the size is used as given (SDXL-style pipelines have no binning)."""
    kwargs = dict(num_inference_steps=settings.steps, guidance_scale=settings.guidance, height=settings.height,
                  width=settings.width)
    if "use_resolution_binning" in inspect.signature(pipe.__call__).parameters:
        kwargs["use_resolution_binning"] = False
    return kwargs


def calibration_loop(pipe: Any, prompts: list[str], settings: CalibrationSettings, seed: int = 0,
                     show_progress: bool = True) -> Callable[[nn.Module], None]:
    """A ``forward_loop(denoiser)`` that runs the pipeline on every prompt (one fixed seed per prompt),
    so that every sampling step's denoiser input is a calibration batch. Images are not decoded. In a process
    group (``--num-gpus``) each rank runs its share of the prompts; the backends merge the statistics."""
    kwargs = call_kwargs(pipe, settings)
    pipe.set_progress_bar_config(disable=True)  # one bar: over the prompts, none inside per sampling step

    def forward_loop(denoiser: nn.Module) -> None:
        mine = shard(list(enumerate(prompts)))  # under --num-gpus: this rank's prompts, each with its own seed
        with torch.no_grad():
            for i, prompt in progress(mine, "calibration prompts", "prompt", show_progress):
                generator = torch.Generator(pipe.device).manual_seed(seed + i)
                pipe(prompt, generator=generator, output_type="latent", **kwargs)

    return forward_loop
