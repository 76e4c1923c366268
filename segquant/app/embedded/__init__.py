"""Small real diffusion models trained on MNIST and shipped inside the package (fp16 safetensors in
diffusers format), so that the main job, the tests and the quality benchmark run offline.

``mnist-flux``: a class-conditional FluxTransformer2DModel (15.7M parameters; 3 double + 5 single blocks).
``mnist-unet``: a class-conditional SDXL-style UNet2DConditionModel (2.7M parameters).
``mnist-classifier``: a small CNN, the feature network of the feature-FID and the class-accuracy judge.
Trained by ``examples/train_mnist_models.py`` (command and statistics in each folder's ``training.json``).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

from segquant.errors import SegQuantError
from .models import (FLUX_CONFIG, IMAGE_SIZE, NULL_CLASS, NUM_CLASSES, UNET_CONFIG, ClassConditioner, Denoiser,
                     MnistClassifier, build_denoiser, pack, unpack)
from .sampler import fixed_noise, sample, sample_labels

EMBEDDED_DENOISERS = ("mnist-flux", "mnist-unet")
DEFAULT_DENOISER = "mnist-flux"
_SUBFOLDERS = {"transformer": "FluxTransformer2DModel", "unet": "UNet2DConditionModel"}


def weights_dir() -> Path:
    return Path(str(resources.files("segquant.app") / "embedded" / "weights"))


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(path)).items()}


def resolve_model(model: str) -> Path:
    """An embedded name or a folder in the embedded layout -> the folder."""
    if model in EMBEDDED_DENOISERS:
        return weights_dir() / model
    folder = Path(model)
    if not folder.is_dir():
        raise SegQuantError(f"--model {model!r} is neither an embedded model ({', '.join(EMBEDDED_DENOISERS)}) "
                            "nor a folder")
    return folder


def load_denoiser(model: str = DEFAULT_DENOISER, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> Denoiser:
    """Load an embedded denoiser (or a folder written by ``examples/train_mnist_models.py``): a diffusers
    ``transformer/`` or ``unet/`` subfolder plus ``conditioner.safetensors``."""
    folder = resolve_model(model)
    found = [sub for sub in _SUBFOLDERS if (folder / sub / "config.json").is_file()]
    if not found:
        raise SegQuantError(f"{folder} is not a diffusers model folder of the embedded layout: expected "
                            "transformer/config.json or unet/config.json (a FluxTransformer2DModel or "
                            "UNet2DConditionModel saved with save_pretrained) and conditioner.safetensors")
    sub = found[0]
    config = json.loads((folder / sub / "config.json").read_text())
    if config.get("_class_name") != _SUBFOLDERS[sub]:
        raise SegQuantError(f"{folder / sub}: expected a {_SUBFOLDERS[sub]}, found {config.get('_class_name')}")
    if not (folder / "conditioner.safetensors").is_file():
        raise SegQuantError(f"{folder}: conditioner.safetensors (the class -> text-token table) is missing")
    try:
        import diffusers
    except ImportError:
        raise SegQuantError("the embedded models need diffusers: pip install 'segquant[diffusers]'") from None
    try:
        model_module = getattr(diffusers, _SUBFOLDERS[sub]).from_pretrained(folder / sub, dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:
        raise SegQuantError(f"{folder / sub}: could not load the diffusers model: {e}") from None
    state = _load_safetensors(folder / "conditioner.safetensors")
    rows, width = state["token_table.weight"].shape
    dim = config.get("joint_attention_dim") or config.get("cross_attention_dim")
    conditioner = ClassConditioner(dim, width // dim, state["pooled_table.weight"].shape[1])
    conditioner.load_state_dict(state)
    family = "flux" if sub == "transformer" else "unet"
    return Denoiser(model_module.to(device).eval(), conditioner.to(device).eval(), family)


def load_classifier(device: str | torch.device = "cpu") -> MnistClassifier:
    """The embedded MNIST classifier (feature network), in eval mode."""
    clf = MnistClassifier()
    clf.load_state_dict(_load_safetensors(weights_dir() / "mnist-classifier" / "classifier.safetensors"))
    return clf.to(device).eval()


def mnist_test_feature_stats() -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of the classifier's features over the 10,000 MNIST test digits (computed at
    training time and shipped, so feature-FID against real data needs no dataset)."""
    stats = _load_safetensors(weights_dir() / "mnist-classifier" / "mnist_test_features.safetensors")
    return stats["mean"].double(), stats["cov"].double()


__all__ = ["EMBEDDED_DENOISERS", "DEFAULT_DENOISER", "Denoiser", "MnistClassifier", "load_denoiser",
           "load_classifier", "mnist_test_feature_stats", "sample", "sample_labels", "fixed_noise", "pack",
           "unpack", "build_denoiser", "IMAGE_SIZE", "NUM_CLASSES", "NULL_CLASS", "FLUX_CONFIG", "UNET_CONFIG"]
