"""The diffusers configs bundled with SegQuant (``segquant/configs/*.json``): full-size denoisers that recipes
are validated against on the ``meta`` device, the embedded models, and a tiny FLUX for quick analyses."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import SegQuantError


def bundled_configs() -> dict[str, Path]:
    """Names -> config files of the models bundled with the package."""
    folder = resources.files("segquant") / "configs"
    return {p.name.removesuffix(".json"): Path(str(p)) for p in folder.iterdir() if p.name.endswith(".json")}


def load_bundled_config(name: str) -> dict[str, Any]:
    """The bundled config called ``name`` as a dict.

    Raises:
        SegQuantError: no such bundled config.
    """
    configs = bundled_configs()
    if name not in configs:
        raise SegQuantError(f"unknown bundled model config {name!r}; bundled: {', '.join(sorted(configs))}")
    return json.loads(configs[name].read_text())
