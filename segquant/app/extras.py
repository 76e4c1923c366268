"""What each ``segquant`` command needs beyond the core, and the one-line error that names the extra to install.

``EXTRA_MODULES`` is checked against ``pyproject.toml`` by ``tests/core/test_packaging.py``: every module a command
requires is installed by the extra its error names.
"""

from __future__ import annotations

import importlib.util

from segquant import SegQuantError

DISTRIBUTIONS = {"diffusers": "diffusers", "safetensors": "safetensors", "accelerate": "accelerate",
                 "huggingface_hub": "huggingface_hub", "matplotlib": "matplotlib", "PIL": "pillow",
                 "transformers": "transformers", "tokenizers": "tokenizers", "onnx": "onnx",
                 "modelopt": "nvidia-modelopt", "torchao": "torchao"}
"""Import name -> distribution name of every optional module the application imports."""

EXTRA_MODULES = {
    "diffusers": ("diffusers", "safetensors", "accelerate", "huggingface_hub"),
    "run": ("diffusers", "safetensors", "matplotlib", "PIL"),
    "quantize": ("diffusers", "safetensors", "accelerate", "huggingface_hub", "transformers", "tokenizers"),
    "onnx": ("onnx",),
}
"""The modules each extra must provide before its command starts (backends check their own library)."""


def missing_modules(extra: str) -> list[str]:
    """Distributions of ``extra``'s modules that are not importable."""
    return [DISTRIBUTIONS[m] for m in EXTRA_MODULES[extra] if importlib.util.find_spec(m) is None]


def require(extra: str, what: str) -> None:
    """Raise one line naming the missing distributions and ``pip install 'segquant[extra]'``.

    Raises:
        SegQuantError: something ``extra`` installs is missing.
    """
    if extra not in EXTRA_MODULES:
        raise SegQuantError(f"unknown extra {extra!r}; one of {', '.join(EXTRA_MODULES)}")
    missing = missing_modules(extra)
    if missing:
        raise SegQuantError(f"{what} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
                            f"installed: pip install 'segquant[{extra}]'")
